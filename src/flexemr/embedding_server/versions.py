"""Versions of one embedding server's rows: staging, commit, changelog, update log.

    UPDATE (v, token, rows)  -> staged[(v, token)]           (bounded: max_staged_bytes)
    COMMIT (v, token)        -> under the exclusive lock: write staged[(v, token)], version = v,
                                changelog += (v, token, keys changed), other stages <= v dropped
    LOOKUP at version r      -> under the shared lock: answered at r if readable_from <= r <= version
                                (rows written after r read from the history), else STALE

The history keeps, per recent commit, the stored bytes its writes overwrote (bounded:
max_history_bytes), so a ranker keeps reading at its version while commits go on, until it next
syncs; without it every commit would turn the lookups in flight STALE, and a steady stream of
updates would starve reads.

A commit applies versions one at a time, in order: a server behind (it missed a commit while it
was down) answers STALE until someone commits the versions it missed (their tokens come from an
up-to-date server's changelog). A version below the server's is a no-op when its token matches,
and STALE (taken by another update) when it does not.

The update log is an append-only file of the UPDATE and COMMIT frames this server accepted
(`protocol.frames` format), each fsync'ed before it is acknowledged; at start it is replayed, so a
restarted server comes back with its version, its rows, its staged updates (which a healing commit
may still need), its changelog and the last sequence of every source. Without a log a server
refuses updates: it could not come back at its version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from flexemr.config import FrameLimits
from flexemr.embedding_server.store import BadSubrequest, RowImage, ShardStore
from flexemr.protocol.frames import ConnectionClosed, MessageType, ProtocolError, encode, read_frame
from flexemr.protocol.updates import BadUpdate, Changes, StagedRows, version_buffer
from flexemr.rwlock import SharedLock
from flexemr.stats import counts

log = logging.getLogger(__name__)


MAX_HISTORY_VERSIONS = 4096
"""Versions the history remembers at most, however small their writes (each lookup at an old
version merges them)."""


class StaleVersion(Exception):
    """The request named a version this server is not at (or one already decided otherwise)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the server is at version {version}")
        self.version = version


class RowVersions:
    def __init__(
        self,
        store: ShardStore,
        log_path: Path | None = None,
        max_staged_bytes: int = 256 * 2**20,
        max_changelog_keys: int = 1 << 20,
        max_history_bytes: int = 64 * 2**20,
    ) -> None:
        self.store = store
        self.version = 0
        """The committed version (0: the rows as loaded)."""
        self.lock = SharedLock()
        """Lookups hold it shared, a commit's writes exclusive."""
        self._mutex = threading.Lock()
        """Serialises stages and commits (and guards everything below)."""
        self._max_staged_bytes = max_staged_bytes
        self._max_changelog_keys = max_changelog_keys
        self._staged: dict[tuple[int, int], list[StagedRows]] = {}
        self._staged_bytes = 0
        self._sequences: dict[str, int] = {}
        self._changelog: deque[tuple[int, int, np.ndarray]] = deque()
        self._changelog_keys = 0
        self._floor = 0
        """The changelog holds every version after this one."""
        self._max_history_bytes = max_history_bytes
        self._history: deque[tuple[int, RowImage]] = deque()
        """(version, what its commit overwrote) of the versions after `readable_from`."""
        self._history_bytes = 0
        self.readable_from = 0
        """The oldest version a lookup is still answered at."""
        self._images: dict[int, RowImage] = {}
        """Per read version, the merged history a lookup at it reads (until the next commit)."""
        self.rows_applied = self.versions_applied = self.duplicates = 0
        self._log: BinaryIO | None = None
        self.log_path = log_path
        if log_path is not None:
            self._replay(log_path)
            self._log = open(log_path, "ab")  # noqa: SIM115 (open for the server's lifetime)

    # -- the update log -----------------------------------------------------------------------------

    def _replay(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        limits = FrameLimits(max_frame_bytes=2**40)
        good = 0
        with open(path, "rb") as f:
            while True:
                try:
                    frame = read_frame(f.readinto, limits)
                except (ConnectionClosed, ProtocolError):
                    break  # the end, or a record cut short by a crash: dropped below
                if frame.type == MessageType.UPDATE:
                    self._stage(StagedRows.parse(frame, self.store.dim))
                else:
                    self._commit(*(int(x) for x in frame.buffers[0]))
                good = f.tell()
        if good < path.stat().st_size:
            log.warning("update log %s: dropping a record cut short at byte %d", path, good)
            os.truncate(path, good)
        if good:
            log.info("update log %s replayed: version %d", path, self.version)

    def _append(self, views: list[memoryview]) -> None:
        if self._log is None:
            return  # replaying
        for view in views:
            self._log.write(view)
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    # -- stage, commit, changes ---------------------------------------------------------------------

    def stage(self, staged: StagedRows) -> bool:
        """Stage one UPDATE; False when its (source, sequence) is already committed (nothing staged).
        Raises StaleVersion for a version already decided, BadUpdate for bad rows or values."""
        if self.log_path is None:
            raise BadUpdate("this embedding server has no update log (updates.log_dir): it refuses updates")
        with self._mutex:
            if staged.version <= self.version:
                raise StaleVersion(self.version)
            if self._duplicate(staged):
                self.duplicates += 1
                return False
            try:
                self.store.check_write(staged.rows, staged.values)
            except BadSubrequest as exc:
                raise BadUpdate(str(exc)) from None
            if self._staged_bytes + staged.values.nbytes > self._max_staged_bytes:
                raise BadUpdate(
                    f"staging {staged.values.nbytes} bytes would pass the limit of "
                    f"{self._max_staged_bytes} staged bytes: commit first, or send smaller updates"
                )
            self._append(staged.frame(0))
            self._stage(staged)
            return True

    def _stage(self, staged: StagedRows) -> None:
        self._staged.setdefault((staged.version, staged.token), []).append(staged)
        self._staged_bytes += staged.values.nbytes

    def _duplicate(self, staged: StagedRows) -> bool:
        return staged.sequence is not None and staged.sequence <= self._sequences.get(staged.source, -1)

    def commit(self, version: int, token: int) -> int:
        """Apply what (version, token) staged here; returns the server's version. Raises
        StaleVersion when the version was decided with another token, or when this server is
        behind it."""
        with self._mutex:
            if version <= self.version:
                decided = self._token_of(version)
                if decided is not None and decided != token:
                    raise StaleVersion(self.version)
                return self.version
            if version > self.version + 1:
                raise StaleVersion(self.version)
            self._append(encode(MessageType.COMMIT, 0, [version_buffer(version, token)]))
            self._commit(version, token)
            return self.version

    def _commit(self, version: int, token: int) -> None:
        batches = [b for b in self._staged.pop((version, token), []) if not self._duplicate(b)]
        rows = np.unique(np.concatenate([b.rows for b in batches])) if batches else np.empty(0, np.int64)
        with self.lock.exclusive():
            self._remember(version, self.store.image(rows))
            for batch in batches:
                self.store.write(batch.rows, batch.values)
            self.version = version
        for batch in batches:
            if batch.sequence is not None:
                self._sequences[batch.source] = max(batch.sequence, self._sequences.get(batch.source, -1))
        keys = self.store.keys(rows)
        self._changelog.append((version, token, keys))
        self._changelog_keys += keys.size
        while self._changelog_keys > self._max_changelog_keys and len(self._changelog) > 1:
            dropped, _, old = self._changelog.popleft()
            self._changelog_keys -= old.size
            self._floor = dropped
        for key in [k for k in self._staged if k[0] <= version]:  # other attempts at decided versions
            del self._staged[key]
        self._staged_bytes = sum(b.values.nbytes for bs in self._staged.values() for b in bs)
        self.versions_applied += 1
        self.rows_applied += int(rows.size)

    def _remember(self, version: int, image: RowImage) -> None:
        """Keep what `version`'s commit overwrites; forget the oldest versions beyond the bound.
        Under the exclusive lock: no lookup is reading the history."""
        self._history.append((version, image))
        self._history_bytes += image.nbytes
        while self._history and (
            self._history_bytes > self._max_history_bytes or len(self._history) > MAX_HISTORY_VERSIONS
        ):
            dropped, old = self._history.popleft()
            self._history_bytes -= old.nbytes
            self.readable_from = dropped
        self._images.clear()

    def image_at(self, read: int) -> RowImage | None:
        """What a lookup at version `read` reads in place of the rows written since (None: nothing
        was); StaleVersion when this server is behind `read` or no longer remembers what it needs.
        Under the shared lock."""
        if read == self.version:
            return None
        if read > self.version or read < self.readable_from:
            raise StaleVersion(self.version)
        image = self._images.get(read)
        if image is None:
            image = RowImage.earliest([old for v, old in self._history if v > read])
            self._images[read] = image  # lookups at one version share it (a race only repeats the work)
        return image

    def _token_of(self, version: int) -> int | None:
        for v, token, _ in self._changelog:
            if v == version:
                return token
        return None

    def changes(self, since: int) -> Changes:
        with self._mutex:
            after = [entry for entry in self._changelog if entry[0] > since]
            keys = [k for _, _, k in after]
            return Changes(
                self.version,
                since < self._floor,
                np.array([v for v, _, _ in after], dtype=np.int64),
                np.array([t for _, t, _ in after], dtype=np.int64),
                np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64),
            )

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            return {
                "version": self.version,
                "staged_bytes": self._staged_bytes,
                "readable_from": self.readable_from,
                "history_bytes": self._history_bytes,
                **counts(
                    {
                        "versions_applied": self.versions_applied,
                        "rows_applied": self.rows_applied,
                        "duplicates": self.duplicates,
                    }
                ),
            }
