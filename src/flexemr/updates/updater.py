"""`Updater`: applies `RowUpdates` to every embedding server of a cluster as one new version.

    apply:  v = server 0's version + 1 (or, for the next update, the version after the one this
              updater committed last), token = random, written = rows per server
            UPDATE (v, token, rows) to server 0 first (rows or none: it records the attempt, and
              answers at once if its (source, sequence) was applied already), then to every
              replica holding some of the rows                                    (all must ack)
            COMMIT (v, token, written) to server 0: the version is decided there, or not at all
            COMMIT to the rest, all at once (a server behind first commits the versions it
              missed, from server 0's changelog)
            on failure before the decision: ABORT (v, token) on server 0, then on the rest

If another update decided v first (server 0 answers STALE), the rows are staged again at the next
version (asking server 0 for it). An update given without a sequence gets one (source
"<source>/<this updater's id>"), so every update is applied at most once. A server that is down
at commit time is committed by the next ranker that finds it behind (or by itself when it is
back); one that is down at stage time fails the update (nothing is committed, and the stages are
dropped). When server 0 cannot be asked whether it decided, the
update is reported as failed with an unknown outcome, naming its (source, sequence): resending
it with those applies it once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import ServerLink, links
from flexemr.model.source import model_spec
from flexemr.protocol.updates import LATEST, StagedRows
from flexemr.transport.base import LookupFailed, ServerUnavailable, Stale
from flexemr.updates.rows import RowUpdates

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16
"""Versions tried before giving up, each lost to another update that decided it first."""


class UpdateFailed(RuntimeError):
    """The update was not applied (a server holding its rows refused it, or was down)."""


class Sequences:
    """Names updates given without a sequence `(source/<this object's id>, n)`, n = 0, 1, ...: so
    every update is applied at most once, and an unknown outcome can be resolved by resending."""

    def __init__(self) -> None:
        self._id = uuid.uuid4().hex[:12]
        self._next = itertools.count()

    def identify(self, updates: RowUpdates) -> RowUpdates:
        if updates.sequence is not None:
            return updates
        return dataclasses.replace(updates, source=f"{updates.source}/{self._id}", sequence=next(self._next))


class Updater:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.model = model_spec(spec.model)
        self._links = links(spec)
        self._sequences = Sequences()
        self._next = 0
        """The version to try next (the one after this updater's last commit); 0: ask server 0."""
        self._fan_out = ThreadPoolExecutor(max(1, len(self._links) - 1), thread_name_prefix="commit")
        plan = spec.sharding
        self._table_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)

    def version(self) -> int:
        """The cluster's latest version (server 0 decides every version first)."""
        return self._links[0].changes(LATEST).version

    def apply(self, updates: RowUpdates) -> int:
        """Stage `updates` on every replica of their rows, commit them everywhere as one version,
        and return it (for a (source, sequence) applied before: the version that applied it).
        Raises ValueError for rows that do not fit the model (nothing is sent), UpdateFailed when a
        server refuses or cannot be reached (nothing is committed, unless it says otherwise)."""
        updates.check(self.model)
        updates = self._sequences.identify(updates)
        per_server = self._split(updates)
        written = np.zeros(len(self._links), dtype=np.int64)
        for server, (rows, _) in per_server.items():
            written[server] = rows.size
        empty = (np.empty(0, np.int64), np.empty((0, self.model.dim), np.float32))
        for _ in range(MAX_ATTEMPTS):
            version, token = 0, secrets.randbits(63)
            staged_on: list[int] = []
            committing = False
            try:
                version = self._next or self.version() + 1
                self._next = 0
                for server in [0, *(s for s in per_server if s != 0)]:
                    rows, values = per_server.get(server, empty)
                    staged = StagedRows(version, token, rows, values, updates.source, updates.sequence)
                    applied = self._links[server].stage(staged)
                    staged_on.append(server)
                    if applied:  # server 0: this (source, sequence) is applied already
                        self._catch_up(applied)
                        return applied
                committing = True
                applied = self._links[0].commit(version, token, written)
            except Stale:
                if not self._abort(version, token, staged_on, committing, updates):
                    continue  # another update decided this version first: stage again at the next
                applied = version
            except (ServerUnavailable, LookupFailed) as exc:
                if not self._abort(version, token, staged_on, committing, updates):
                    raise UpdateFailed(f"update not applied: {exc}") from None
                applied = version  # server 0 did decide it: its answer was lost
            if applied != version:  # a (source, sequence) applied meanwhile, at `applied`
                self._abort(version, token, staged_on, committing, updates)
                self._catch_up(applied)
                return applied
            self._commit(version, token, written)
            self._next = version + 1
            return version
        raise UpdateFailed(
            f"update not applied: {MAX_ATTEMPTS} versions in a row were taken by other updates"
        )

    def _abort(
        self, version: int, token: int, staged_on: list[int], committing: bool, updates: RowUpdates
    ) -> bool:
        """Drop this attempt's stages, server 0 first (then it is never decided); True when server
        0 answers that it decided it already. UpdateFailed when a COMMIT was sent (`committing`)
        and server 0 cannot say whether it decided."""
        if not staged_on:
            return False
        try:
            if self._links[0].abort(version, token):
                return True
        except (ServerUnavailable, LookupFailed) as exc:
            if committing:
                raise UpdateFailed(
                    f"update outcome unknown (embedding server 0 did not answer: {exc}); it may be "
                    f"applied at version {version}: send it again with source {updates.source!r} and "
                    f"sequence {updates.sequence} to apply it once"
                ) from None
            log.warning("version %d: attempt not aborted on server 0: %s", version, exc)
        for server in staged_on[1:]:
            try:
                self._links[server].abort(version, token)
            except (ServerUnavailable, LookupFailed) as exc:  # its stage goes when v is decided
                log.warning("version %d: attempt not aborted on a server: %s", version, exc)
        return False

    def _split(self, updates: RowUpdates) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Server-local rows and values for every server holding some (each replica gets its copy);
        a row given twice keeps its last value."""
        tables = updates.tables.astype(np.int64)
        rows = updates.rows.astype(np.int64)
        keys = self._table_base[tables] + rows
        _, last = np.unique(keys[::-1], return_index=True)
        keep = np.sort(keys.size - 1 - last)
        tables, rows = tables[keep], rows[keep]
        values = np.ascontiguousarray(updates.values[keep], dtype=np.float32)
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for shard in self.spec.sharding.shards:
            mine = (tables == shard.table) & (rows >= shard.row_start) & (rows < shard.row_end)
            if mine.any():
                local = rows[mine] - shard.row_start + shard.local_start
                parts.setdefault(shard.server, []).append((local, values[mine]))
        return {
            server: (np.concatenate([r for r, _ in got]), np.concatenate([v for _, v in got]))
            for server, got in sorted(parts.items())
        }

    def _commit(self, version: int, token: int, written: np.ndarray) -> None:
        """Commit the version server 0 decided on every other server, in parallel (one that cannot
        is left to the rankers, which commit it when they find it behind, or to its own resync)."""
        for done in [
            self._fan_out.submit(self._commit_on, link, version, token, written) for link in self._links[1:]
        ]:
            done.result()

    def _commit_on(self, link: ServerLink, version: int, token: int, written: np.ndarray) -> None:
        try:
            try:
                link.commit(version, token, written)
            except Stale as behind:  # it missed versions: commit those first
                link.catch_up(behind.version, self._links[0].changes(behind.version))
                link.commit(version, token, written)
        except (ServerUnavailable, LookupFailed) as exc:
            log.warning("version %d: %s; a ranker commits it there when it is back", version, exc)

    def _catch_up(self, version: int) -> None:
        """Commit on every other server the versions up to `version` it missed (an earlier attempt
        at this (source, sequence) may have stopped after server 0 decided it)."""
        for link in self._links[1:]:
            try:
                at = link.changes(LATEST).version
                if at < version:
                    link.catch_up(at, self._links[0].changes(at))
            except (ServerUnavailable, LookupFailed) as exc:
                log.warning("version %d: %s; a ranker commits it there when it is back", version, exc)

    def close(self) -> None:
        self._fan_out.shutdown()
        for link in self._links:
            link.close()
