"""`Updater`: applies `RowUpdates` to every embedding server of a cluster as one new version.

    apply:  v = server 0's version + 1, token = random
            UPDATE (v, token, rows) to every replica holding some of the rows   (all must ack)
            COMMIT (v, token) to server 0 first (the version is decided there), then to the rest
            (a server behind first commits the versions it missed, from server 0's changelog)

If another update decided v first (server 0 answers STALE), the rows are staged again at the next
version. A server that is down at commit time is committed by the next ranker that finds it
behind; one that is down at stage time fails the update (nothing is committed).
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import links
from flexemr.model.source import model_spec
from flexemr.protocol.frames import MessageType
from flexemr.protocol.updates import LATEST, StagedRows
from flexemr.transport.base import LookupFailed, ServerUnavailable, Stale
from flexemr.updates.rows import RowUpdates

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16
"""Versions tried before giving up, each lost to another update that decided it first."""


class UpdateFailed(RuntimeError):
    """The update was not applied (a server holding its rows refused it, or was down)."""


class Updater:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.model = model_spec(spec.model)
        self._links = links(spec)
        plan = spec.sharding
        self._table_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)

    def version(self) -> int:
        """The cluster's latest version (server 0 decides every version first)."""
        return self._links[0].changes(LATEST).version

    def apply(self, updates: RowUpdates) -> int:
        """Stage `updates` on every replica of their rows, commit them everywhere as one version,
        and return it. Raises ValueError for rows that do not fit the model (nothing is sent),
        UpdateFailed when a server refuses or cannot be reached (nothing is committed)."""
        updates.check(self.model)
        per_server = self._split(updates)
        for _ in range(MAX_ATTEMPTS):
            try:
                version, token = self.version() + 1, secrets.randbits(63)
                for server, (rows, values) in per_server.items():
                    staged = StagedRows(version, token, rows, values, updates.source, updates.sequence)
                    self._links[server].request(MessageType.UPDATE, staged.buffers())
                self._commit(version, token)
                return version
            except Stale:
                continue  # another update decided this version first: stage again at the next
            except (ServerUnavailable, LookupFailed) as exc:
                raise UpdateFailed(f"update not applied: {exc}") from None
        raise UpdateFailed(
            f"update not applied: {MAX_ATTEMPTS} versions in a row were taken by other updates"
        )

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

    def _commit(self, version: int, token: int) -> None:
        """Server 0 decides (Stale from it: the version is taken); then every other server."""
        self._links[0].commit(version, token)
        for link in self._links[1:]:
            try:
                try:
                    link.commit(version, token)
                except Stale as behind:  # it missed versions: commit those first
                    link.catch_up(behind.version, self._links[0].changes(behind.version))
                    link.commit(version, token)
            except ServerUnavailable as exc:
                log.warning("version %d: %s; a ranker commits it there when it is back", version, exc)

    def close(self) -> None:
        for link in self._links:
            link.close()
