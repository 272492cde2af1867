"""`ServingUpdater`: row updates for whichever model version a spec file names now.

`flexemr serve --spec-out FILE` rewrites FILE (atomically) with the servers of the model version
about to serve, before every switch (a load, a rollback, an unload of the serving version). So:

    apply(u):  give u its (source, sequence) once
               loop: read FILE -> apply u to the servers it names (an `Updater` per cluster)
                     -> read FILE again: unchanged? done. Changed (a switch meanwhile)? apply u
                        to the new servers too (a repeat on the same servers is a duplicate)

An update acknowledged is thus in the version FILE named at that moment: the serving one, or the
one whose switch is under way. The version switched away from may hold an update that straddled
the switch; no later one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flexemr.config.spec import ClusterSpec
from flexemr.model.spec import ModelSpec
from flexemr.updates.rows import RowUpdates
from flexemr.updates.updater import Sequences, Updater

log = logging.getLogger(__name__)


class ServingUpdater:
    def __init__(self, path: str | Path, prepare: Callable[[ClusterSpec], ClusterSpec] = lambda s: s) -> None:
        """`path`: the spec file; `prepare`: what to do to each spec read (e.g. add the secret file)."""
        self.path = Path(path)
        self.prepare = prepare
        self._sequences = Sequences()
        self._text = ""
        self._updater: Updater | None = None
        self.current()

    def current(self) -> Updater:
        """The updater of the cluster the file names now (re-read; a new one when it changed)."""
        text = self.path.read_text()
        if self._updater is None or text != self._text:
            spec = self.prepare(ClusterSpec.from_text(text, self.path))
            if self._updater is not None:
                log.info("%s names other embedding servers now (a model switch): updates follow", self.path)
                self._updater.close()
                self._updater = None
            self._updater, self._text = Updater(spec), text
        return self._updater

    @property
    def model(self) -> ModelSpec:
        """The model of the version the file names now."""
        return self.current().model

    def apply(self, updates: RowUpdates) -> int:
        """Apply `updates` as one row version of the version the file names (see the module), and
        return that version's row version. Raises what `Updater.apply` raises."""
        updates = self._sequences.identify(updates)
        while True:
            updater = self.current()
            version = updater.apply(updates)
            if self.current() is updater:
                return version

    def close(self) -> None:
        if self._updater is not None:
            self._updater.close()
            self._updater = None
