"""Whole-model versions: a new checkpoint loaded beside the serving one, switched to atomically.

    load(source):  [v1 serving] -> load v2 beside it (own servers, ranker, cache) -> warm v2
                   -> flip: new requests take v2, requests in flight finish on v1
                   -> [v2 serving, v1 kept]: a rollback is a flip back, instant
    a third load first unloads the version not serving (once its last request has finished)

Each version is a whole `Ranker` (dense model, router, transport to its own embedding servers,
cache), so no request ever mixes two versions. Front ends take a version per request with
`use()`, which counts its users: a version is closed only once nobody uses it. The process's front
door (`flexemr.api.front_door`) admits requests for all of them, so to clients they are one ranker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flexemr.batch import InvalidRequest
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.model.source import model_spec
from flexemr.ranker.ranker import Ranker
from flexemr.updates import RowUpdates, Updater

log = logging.getLogger(__name__)

MAX_VERSIONS = 2
"""Versions loaded at once (each holds its own embedding servers): the serving one and one more."""

Loader = Callable[[ModelSource], tuple[Ranker, Callable[[], None], ClusterSpec | None]]
"""Starts a version's embedding tier and ranker; returns the ranker, what stops them both, and the
cluster of its embedding servers (None: its rows are not on flexemr servers)."""


class ModelVersionConflict(RuntimeError):
    """The request does not fit the versions' state (HTTP 409): a load under way, an unknown or
    only version to unload, no loader."""


class UnknownModelVersion(LookupError):
    """No such version is loaded (HTTP 400/404 naming the versions that are)."""


@dataclass
class ModelVersion:
    number: int
    ranker: Ranker
    source: ModelSource | None
    """What it was loaded from (None: not known, for a ranker that cannot load versions)."""
    stop: Callable[[], None]
    cluster: ClusterSpec | None = None
    """Its embedding servers, where its row updates go (None: not flexemr servers)."""
    loaded_at: float = field(default_factory=time.time)
    users: int = 0
    """Requests using it now; it is closed only at zero."""
    _updater: Updater | None = None
    _updating: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return str(self.number)

    def apply(self, updates: RowUpdates) -> int:
        """Apply row updates to this version's servers as one new row version (one at a time:
        each is a version); returns it. ModelVersionConflict when its rows are not on flexemr servers."""
        if self.cluster is None:
            raise ModelVersionConflict("row updates need the flexemr embedding tier (not redis or local)")
        with self._updating:
            if self._updater is None:
                self._updater = Updater(self.cluster)
            committed = self._updater.apply(updates)
        if self.ranker.row_version is not None:  # read your writes: requests after this see the rows
            self.ranker.row_version.read_at_least(committed)
        return committed

    def close(self) -> None:
        self.ranker.close()
        with self._updating:
            if self._updater is not None:
                self._updater.close()
        self.stop()


class ModelVersions:
    """The loaded versions of the served model, and which one serves new requests."""

    def __init__(
        self,
        first: Ranker,
        source: ModelSource | None = None,
        loader: Loader | None = None,
        stop_first: Callable[[], None] = lambda: None,
        cluster: ClusterSpec | None = None,
        drain_timeout_s: float | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.loader = loader
        self.admin_token = admin_token
        """Bearer token of the admin API (model load/unload, updates); None: the admin API is off."""
        self.drain_timeout_s = drain_timeout_s or first.config.deadline_s + first.config.request_timeout_s
        """How long an unload waits for the version's last requests before closing it anyway."""
        self.before_switch: Callable[[ModelVersion], None] = lambda version: None
        """Called with a version about to serve, before it does (under the versions' lock; if it
        raises, the switch does not happen): `flexemr serve` rewrites its `--spec-out` file there."""
        self._serving = ModelVersion(1, first, source, stop_first, cluster)
        self._versions = {1: self._serving}
        self._numbered = 1
        self._changed = threading.Condition()
        self._loading = False
        self.loads = self.rollbacks = 0

    @property
    def serving(self) -> ModelVersion:
        return self._serving

    @property
    def ranker(self) -> Ranker:
        """The serving version's ranker (for what is not per request: readiness, metadata)."""
        return self._serving.ranker

    def names(self) -> list[str]:
        with self._changed:  # reentrant (an RLock)
            return [str(n) for n in sorted(self._versions)]

    def _get(self, version: str) -> ModelVersion:
        """The version named (""/None: the serving one); `UnknownModelVersion` if not loaded."""
        if not version:
            return self._serving
        if version.isdigit() and int(version) in self._versions:
            return self._versions[int(version)]
        raise UnknownModelVersion(f"version {version!r} is not loaded; loaded: {self.names()}")

    @contextmanager
    def use(self, version: str = "") -> Iterator[ModelVersion]:
        """The version to score one request with (default: the serving one), held until the
        request is answered."""
        with self._changed:
            chosen = self._get(version)
            chosen.users += 1
        try:
            yield chosen
        finally:
            with self._changed:
                chosen.users -= 1
                self._changed.notify_all()

    def load(self, source: ModelSource) -> ModelVersion:
        """Load `source` as a new version beside the serving one, warm it, and serve it. Serving
        goes on meanwhile; if anything fails, the serving version stays and nothing changes."""
        if self.loader is None:
            raise ModelVersionConflict(
                "this ranker cannot load versions: its embedding servers are started elsewhere "
                "(model loading needs `flexemr serve` with one ranker process)"
            )
        check_same_inputs(self._serving.ranker, source)
        with self._changed:
            if self._loading:
                raise ModelVersionConflict("another version is being loaded; retry when it is done")
            self._loading = True
            spare = [v for v in self._versions.values() if v is not self._serving]
        try:
            if len(spare) + 1 >= MAX_VERSIONS:  # make room: unload the version not serving
                for version in spare:
                    self._unload(version)
            ranker, stop, cluster = self.loader(source)
            try:
                warm(ranker)
                with self._changed:
                    new = ModelVersion(self._numbered + 1, ranker, source, stop, cluster)
                    self._switch(new)
                    self._numbered = number = new.number  # never reused: a number names one model
                    self._versions[number] = new
                    self.loads += 1
            except BaseException:
                ranker.close()
                stop()
                raise
            log.info("model version %d loaded and serving (%s)", number, source)
            return new
        finally:
            with self._changed:
                self._loading = False

    def serve(self, version: str) -> ModelVersion:
        """Serve a loaded version again (a rollback, or a roll forward); instant."""
        with self._changed:
            chosen = self._get(version)
            if chosen is not self._serving:
                rollback = chosen.number < self._serving.number
                self._switch(chosen)
                self.rollbacks += rollback
                log.info("model version %d serving again", chosen.number)
            return chosen

    def unload(self, version: str = "") -> ModelVersion:
        """Unload a version (default: the serving one). Unloading the serving version rolls back to
        the other one; the only loaded version cannot be unloaded. Returns the serving version."""
        with self._changed:
            if self._loading:
                raise ModelVersionConflict("a version is being loaded; retry when it is done")
            chosen = self._get(version)
            if len(self._versions) == 1:
                raise ModelVersionConflict(
                    f"version {chosen.name} is the only one loaded and keeps serving; load another first"
                )
            if chosen is self._serving:
                self._switch(next(v for v in self._versions.values() if v is not chosen))
                self.rollbacks += 1
                log.info("model version %d serving again (rollback)", self._serving.number)
            del self._versions[chosen.number]  # no new request takes it
        self._drain_and_stop(chosen)
        return self._serving

    def _switch(self, version: ModelVersion) -> None:
        """Serve `version` from now on (under `_changed`), once `before_switch` has taken it."""
        self.before_switch(version)
        self._serving = version

    def _unload(self, version: ModelVersion) -> None:
        with self._changed:
            del self._versions[version.number]
        self._drain_and_stop(version)

    def _drain_and_stop(self, version: ModelVersion) -> None:
        with self._changed:
            drained = self._changed.wait_for(lambda: version.users == 0, self.drain_timeout_s)
        if not drained:
            log.warning("model version %d still had %d requests after %.0f s; closing it",
                        version.number, version.users, self.drain_timeout_s)  # fmt: skip
        version.close()
        log.info("model version %d unloaded", version.number)

    def index(self) -> list[dict[str, str]]:
        """The loaded versions in Triton's repository-index shape."""
        with self._changed:
            versions = sorted(self._versions.values(), key=lambda v: v.number)
            serving = self._serving
        return [
            {
                "name": v.ranker.config.model_name,
                "version": v.name,
                "state": "READY" if v.ranker.ready() else "UNAVAILABLE",
                "reason": "serving" if v is serving else "loaded (not serving)",
            }
            for v in versions
        ]

    def stats(self) -> dict[str, Any]:
        """The serving version's ranker stats, and the versions'."""
        with self._changed:
            serving, loaded = self._serving, len(self._versions)
        return {
            **serving.ranker.stats(),
            "model": {"serving_version": serving.number, "loaded_versions": loaded,
                      "loading": self._loading, "loads": self.loads, "rollbacks": self.rollbacks},
        }  # fmt: skip

    def close(self) -> None:
        with self._changed:
            versions = list(self._versions.values())
            self._versions.clear()
        for version in versions:
            version.close()


def check_same_inputs(ranker: Ranker, source: ModelSource) -> None:
    """A new version must take the requests clients send today: the same dense features and tables
    (table sizes, dim and the dense network may change)."""
    new = model_spec(source)
    old = ranker.spec
    if (new.num_dense, new.num_tables) != (old.num_dense, old.num_tables):
        raise InvalidRequest(
            f"parameters: the new model takes {new.num_dense} dense features and {new.num_tables} "
            f"tables, the served one {old.num_dense} and {old.num_tables}; clients' requests would not fit"
        )


def warm(ranker: Ranker, batch: int = 4) -> None:
    """Score one small batch end to end (connections, servers, dense kernels) before the version
    takes traffic; raises what a request would have got."""
    spec = ranker.spec
    rng = np.random.default_rng(0)
    lengths = np.ones(spec.num_tables * batch, dtype=np.int32)
    indices = np.concatenate([rng.integers(0, rows, batch) for rows in spec.table_rows]).astype(np.int64)
    dense = rng.standard_normal((batch, spec.num_dense)).astype(np.float32)
    ranker.score(dense, indices, lengths)
