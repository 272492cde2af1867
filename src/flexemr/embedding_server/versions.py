"""Versions of one embedding server's rows: staging, commit, abort, changelog, update log.

    UPDATE (v, token, rows)     -> staged[(v, token)]              (bounded: max_staged_bytes)
    COMMIT (v, token, written)  -> if this server staged exactly written[me] rows for (v, token):
                                   under the exclusive lock write them, version = v; changelog +=
                                   (v, token, written, keys changed); other stages <= v dropped
    ABORT  (v, token)           -> staged[(v, token)] dropped (answered: committed or not)
    LOOKUP at version r         -> under the shared lock: answered at r if readable_from <= r <=
                                   version (rows written after r read from the history), else STALE
    ROWS (v, start, stop)       -> (a replica) those rows' stored bytes at v, for a server resyncing

Embedding server 0 decides every version (`protocol.updates`): every attempt stages there first
(with or without rows), it commits only an attempt it holds a stage of, and it keeps the (source,
sequence) pairs it applied (bounded: max_sequences; a pair older than those it remembers is
refused rather than guessed): a pair already applied is answered with its version and never
committed again. The other servers apply what a decided COMMIT names and nothing else: a server
that has not staged exactly the rows the write set gives it refuses the COMMIT (it stays behind
and answers STALE) instead of claiming a version it does not hold.

The history keeps, per recent commit, the stored bytes its writes overwrote (bounded:
max_history_bytes), so a ranker keeps reading at its version while commits go on, until it next
syncs; without it every commit would turn the lookups in flight STALE, and a steady stream of
updates would starve reads.

A commit applies versions one at a time, in order: a server behind (it missed a commit while it
was down) answers STALE until someone commits the versions it missed (their tokens and write sets
come from an up-to-date server's changelog). A version at or below the server's is acknowledged
when its token is the one it was decided with, and STALE otherwise (taken by another update, or so
old that the changelog no longer says).

The update log is an append-only file: a header naming the shards it belongs to (a log written for
other shards or weights is refused), then the UPDATE, COMMIT and ABORT frames this server accepted
(`protocol.frames` format), each followed by its CRC32 and fsync'ed before it is acknowledged. At
start it is replayed, so a restarted server comes back with its version, its rows, its staged
updates (a decided commit may still need them; server 0 drops its own: it decides no attempt
staged before it restarted), its changelog and its applied (source, sequence) pairs. Stages
older than stage_ttl_s are dropped when room is needed (server 0 decides none that old). A
record cut short at the end (a crash while appending, never acknowledged) is dropped; a corrupt
record anywhere else stops the server: dropping it would drop acknowledged commits. A
failed append is cut off again before the update is refused. Without a log a server refuses
updates: it could not come back at its version.

A server that cannot prove it holds a version (`Unproven`: a lost log) or whose missed versions
server 0 forgot resyncs (`embedding_server.resync`): `begin_resync` turns every lookup and commit
STALE, `copy_in` writes a replica's rows, `finish_resync` claims the replica's version (its decided
record from server 0), snapshots the state and answers again. Stages go on meanwhile.

Compaction keeps the log bounded: once it passes max_log_bytes, a commit writes a snapshot (the
version, the stored bytes of every row written since the checkpoint, the remembered tokens and
(source, sequence) pairs, the live stages) beside it, atomically (written, fsync'ed, renamed),
then starts the log afresh the same way. Replay loads the snapshot, then the log's records after
its version (a crash between the two renames leaves records the snapshot holds: skipped). The
disk then holds at most the rows written (bounded by the shard) plus max_log_bytes and one record.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flexemr.config import FrameLimits
from flexemr.embedding_server.store import BadSubrequest, RowImage, ShardStore
from flexemr.protocol.frames import ConnectionClosed, Frame, MessageType, ProtocolError, encode, read_frame
from flexemr.protocol.updates import (
    BadUpdate,
    Changes,
    RowsCopy,
    StagedRows,
    commit_buffer,
    parse_commit,
    version_buffer,
)
from flexemr.rwlock import SharedLock
from flexemr.stats import counts

log = logging.getLogger(__name__)


MAX_HISTORY_VERSIONS = 4096
"""Versions the history remembers at most, however small their writes (each lookup at an old
version merges them)."""
MAX_CHANGELOG_VERSIONS = 1 << 16
"""Versions the changelog remembers at most, however few keys they changed."""
STAGE_TTL_S = 60.0
"""A stage older than this may be dropped to make room for new ones; server 0 decides no attempt
staged on it more than half of it ago (an attempt takes seconds), so no server drops a stage
whose version may still be decided."""
STAGE_RECORD_BYTES = 1024
"""What one stage counts against max_staged_bytes beyond its values (its rows, source, keys)."""
MAX_CHANGES_VERSIONS = 1 << 16
"""Versions one CHANGES answer lists at most (a server further behind catches up in steps)."""
COPY_BYTES = 4 * 2**20
"""Stored bytes one ROWS answer carries at most (a resync copies a shard in ranges of this)."""
LOG_MAGIC = b"flexemr update log 2\n"
CRC = struct.Struct("<I")


class StaleVersion(Exception):
    """The request named a version this server is not at (or one already decided otherwise)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the server is at version {version}")
        self.version = version


class Unproven(BadUpdate):
    """A COMMIT names rows this server has not staged (a lost stage or log): it cannot prove it
    holds that version, and resyncs from a replica (`embedding_server.resync`)."""


class CorruptLog(RuntimeError):
    """The update log cannot be replayed without losing acknowledged commits."""


class Decided(NamedTuple):
    """How one version was decided: what a server behind commits it with."""

    token: int
    written: np.ndarray
    """int64 [S]: the rows it staged on each server."""


class RowVersions:
    def __init__(
        self,
        store: ShardStore,
        log_path: Path | None = None,
        max_staged_bytes: int = 256 * 2**20,
        max_changelog_keys: int = 1 << 20,
        max_history_bytes: int = 64 * 2**20,
        max_sequences: int = 1 << 20,
        fingerprint: str = "",
        max_log_bytes: int = 256 * 2**20,
        stage_ttl_s: float = STAGE_TTL_S,
        max_decided_versions: int = 1 << 18,
    ) -> None:
        """`max_decided_versions`: versions whose token and write set this server remembers (a
        server behind by up to this many catches up from them; a COMMIT or ABORT naming an older
        version is refused, since whether it won cannot be told)."""
        self.store = store
        self.version = 0
        """The committed version (0: the rows as loaded)."""
        self.decides = store.server == 0
        """Embedding server 0 decides every version (and keeps the applied (source, sequence))."""
        self.lock = SharedLock()
        """Lookups hold it shared, a commit's writes exclusive."""
        self._mutex = threading.Lock()
        """Serialises stages, commits and aborts (and guards everything below)."""
        self._max_staged_bytes = max_staged_bytes
        self._max_changelog_keys = max_changelog_keys
        self._max_sequences = max_sequences
        self._staged: dict[tuple[int, int], StagedRows] = {}
        self._staged_at: dict[tuple[int, int], float] = {}
        """time.monotonic() of each stage (replayed ones: the replay's)."""
        self._stage_ttl_s = stage_ttl_s
        self._staged_bytes = 0
        self._applied: OrderedDict[tuple[str, int], int] = OrderedDict()
        """(source, sequence) -> the version that applied it, oldest first (server 0 only)."""
        self._forgotten: dict[str, int] = {}
        """Per source, the highest sequence dropped from `_applied` (older ones cannot be told)."""
        self._decided: deque[Decided] = deque()
        """The last versions committed here, the newest (`version`) last."""
        self._max_decided_versions = max_decided_versions
        self._changelog: deque[tuple[int, np.ndarray]] = deque()
        """(version, the global cache keys it changed here) of the versions after `_floor`."""
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
        """Per read version, the merged history a lookup at it reads (until the next commit); they
        hold at most max_history_bytes together (beyond, a lookup merges its own)."""
        self._images_bytes = 0
        self._written = np.zeros(store.num_rows, dtype=bool)
        """The rows written since the checkpoint (what a snapshot holds)."""
        self._max_log_bytes = max_log_bytes
        self._header = LOG_MAGIC + fingerprint.encode() + b"\n"
        self.rows_applied = self.versions_applied = self.duplicates = self.aborted = self.compactions = 0
        self.resyncs = 0
        self.resyncing = False
        """Rows are being copied in from a replica: every lookup and commit is answered STALE."""
        self._log: int | None = None
        self._log_failed: str | None = None
        self.log_path = log_path
        if log_path is not None:
            self._replay(log_path)
            self._log = os.open(log_path, os.O_WRONLY | os.O_APPEND)

    @property
    def _snapshot_path(self) -> Path:
        assert self.log_path is not None
        return self.log_path.with_name(self.log_path.name + ".snapshot")

    # -- the update log -----------------------------------------------------------------------------

    def _replay(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self._header
        if self._snapshot_path.exists():
            self._restore(self._snapshot_path)
        if not path.exists() or path.stat().st_size == 0:
            _write_atomically(path, header)
        else:
            self._replay_records(path, header)
        if self.decides:  # it decides no attempt staged before it restarted
            for key in list(self._staged):
                self._drop(key)

    def _replay_records(self, path: Path, header: bytes) -> None:
        limits = FrameLimits(max_frame_bytes=2**40)
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                raise CorruptLog(
                    f"update log {path} was not written by this version of flexemr for these shards "
                    f"(server {self.store.server}, shards fingerprint {header!r}): move it away to start "
                    "from the checkpoint"
                )
            good = f.tell()
            while True:
                checked = _Checksummed(f)
                try:
                    frame = read_frame(checked.readinto, limits)
                    crc = f.read(CRC.size)
                    if len(crc) < CRC.size:
                        raise ConnectionClosed("cut short")
                except ConnectionClosed:
                    break  # the end, or a record cut short by a crash (never acknowledged)
                except ProtocolError as exc:
                    raise CorruptLog(f"update log {path}: record at byte {good} is corrupt: {exc}") from None
                if CRC.unpack(crc)[0] != checked.crc:
                    if f.read(1):
                        raise CorruptLog(
                            f"update log {path}: record at byte {good} fails its checksum, and "
                            "acknowledged records follow it: restore this server from a replica"
                        )
                    break  # the last record, torn by a crash: never acknowledged
                self._redo(frame)
                good = f.tell()
        if good < path.stat().st_size:
            log.warning("update log %s: dropping a record cut short at byte %d", path, good)
            os.truncate(path, good)
        log.info("update log %s replayed: version %d", path, self.version)

    def _redo(self, frame: Frame) -> None:
        """Replay one record (one the snapshot already holds changes nothing)."""
        if frame.type == MessageType.UPDATE:
            staged = StagedRows.parse(frame, self.store.dim)
            if staged.version > self.version:
                self._stage(staged)
        elif frame.type == MessageType.COMMIT:
            version, token, written = parse_commit(frame, self.store.server + 1)
            if version > self.version:
                self._commit(version, token, written)
        else:
            version, token = (int(x) for x in frame.buffers[0])
            self._drop((version, token))

    def _append(self, views: list[memoryview]) -> None:
        """Write one record and fsync it; on failure cut the file back (nothing half-written stays
        in the middle of the log) and refuse, and refuse every later update if even that fails."""
        if self._log is None:
            return  # replaying
        if self._log_failed is not None:
            raise BadUpdate(
                f"update log {self.log_path} failed earlier ({self._log_failed}): restart the server"
            )
        record = b"".join(views)
        record += CRC.pack(zlib.crc32(record))
        start = os.lseek(self._log, 0, os.SEEK_END)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._log, view) :]
            os.fsync(self._log)
        except OSError as exc:
            try:
                os.ftruncate(self._log, start)
                os.fsync(self._log)
            except OSError as again:
                self._log_failed = str(again)
            raise BadUpdate(f"update log {self.log_path}: {exc}; nothing applied") from None

    def _compact_if_long(self) -> None:
        """After a commit or an abort (the state in memory is what the log says; not during a
        resync, whose half-copied rows no snapshot may keep)."""
        if self._log is not None and not self.resyncing and os.fstat(self._log).st_size > self._max_log_bytes:
            try:
                self._compact()
            except OSError as exc:
                log.warning("update log %s: compaction failed (the log goes on): %s", self.log_path, exc)

    def _compact(self) -> None:
        """Snapshot this server's state, then start the log afresh (both atomically). OSError
        leaves the old log in place (still correct, only longer)."""
        assert self.log_path is not None and self._log is not None
        image = self.store.image(np.flatnonzero(self._written))
        applied = list(self._applied.items())
        index = {source: i for i, source in enumerate(dict.fromkeys(s for (s, _), _ in applied))}
        sources = list(index)
        stages = list(self._staged.values())
        arrays = {
            "header": np.frombuffer(self._header, dtype=np.uint8),  # the shards it belongs to
            "version": np.array([self.version], dtype=np.int64),
            "written": np.flatnonzero(self._written),
            "tokens": np.array([d.token for d in self._decided], dtype=np.int64),
            "decided": np.array([d.written for d in self._decided], dtype=np.int64).reshape(
                len(self._decided), -1
            ),
            "sources": np.array(sources, dtype=str),  # each source once: pairs name its index
            "applied": np.array(
                [[index[s], q, v] for (s, q), v in applied],
                dtype=np.int64,
            ).reshape(-1, 3),
            "forgotten_sources": np.array(list(self._forgotten), dtype=str),
            "forgotten": np.array(list(self._forgotten.values()), dtype=np.int64),
            "stage_heads": np.array(
                [[b.version, b.token, -1 if b.sequence is None else b.sequence, b.rows.size] for b in stages],
                dtype=np.int64,
            ).reshape(-1, 4),
            "stage_sources": np.array([b.source for b in stages], dtype=str),
            "stage_rows": np.concatenate([b.rows for b in stages] + [np.empty(0, np.int64)]),
            "stage_values": np.concatenate(
                [b.values for b in stages] + [np.empty((0, self.store.dim), np.float32)]
            ),
            **{f"rows{s}": rows for s, (rows, _) in enumerate(image.parts)},
            **{f"stored{s}": stored for s, (_, stored) in enumerate(image.parts)},
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # (numpy types **kwds as its allow_pickle)
        _write_atomically(self._snapshot_path, buffer.getvalue())
        _write_atomically(self.log_path, self._header)
        os.close(self._log)
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        self.compactions += 1

    def _restore(self, path: Path) -> None:
        """Load a snapshot `_compact` wrote (for these shards: a log's header may be gone)."""
        with np.load(path, allow_pickle=False) as data:
            if "header" not in data.files or data["header"].tobytes() != self._header:
                raise CorruptLog(
                    f"update log snapshot {path} was not written by this version of flexemr for these "
                    f"shards (server {self.store.server}): move it away to start from the checkpoint"
                )
            self.version = int(data["version"][0])
            self._written[data["written"]] = True
            self._decided.extend(
                Decided(t, w) for t, w in zip(data["tokens"].tolist(), data["decided"], strict=True)
            )
            sources = data["sources"].tolist()
            for source, sequence, version in data["applied"].tolist():
                self._applied[(sources[source], sequence)] = version
            self._forgotten = dict(
                zip(data["forgotten_sources"].tolist(), data["forgotten"].tolist(), strict=True)
            )
            starts = np.concatenate([[0], np.cumsum(data["stage_heads"][:, 3])])
            for i, (version, token, sequence, _) in enumerate(data["stage_heads"].tolist()):
                rows, values = (data[k][starts[i] : starts[i + 1]] for k in ("stage_rows", "stage_values"))
                source = str(data["stage_sources"][i])
                self._stage(
                    StagedRows(version, token, rows, values, source, None if sequence < 0 else sequence)
                )
            parts = tuple((data[f"rows{s}"], data[f"stored{s}"]) for s in range(len(self.store.segments)))
        self.store.restore(RowImage(parts))
        self.readable_from = self._floor = self.version
        log.info("update log snapshot %s loaded: version %d", path, self.version)

    def close(self) -> None:
        if self._log is not None:
            os.close(self._log)
            self._log = None

    # -- stage, commit, abort, changes --------------------------------------------------------------

    def stage(self, staged: StagedRows) -> int:
        """Stage one UPDATE; returns 0, or (server 0) the version that already applied its (source,
        sequence) (nothing staged). Raises StaleVersion for a version already decided, BadUpdate
        for bad rows or values, a full stage or a failed log."""
        if self.log_path is None:
            raise BadUpdate("this embedding server has no update log (updates.log_dir): it refuses updates")
        with self._mutex:
            if staged.version <= self.version:
                raise StaleVersion(self.version)
            applied = self._applied_at(staged)
            if applied:
                self.duplicates += 1
                return applied
            try:
                self.store.check_write(staged.rows, staged.values)
            except BadSubrequest as exc:
                raise BadUpdate(str(exc)) from None
            again = self._staged.get((staged.version, staged.token))
            grows = _cost(staged) - (0 if again is None else _cost(again))
            if self._staged_bytes + grows > self._max_staged_bytes:
                self._expire()
            if self._staged_bytes + grows > self._max_staged_bytes:
                raise BadUpdate(
                    f"staging {_cost(staged)} bytes would pass the limit of "
                    f"{self._max_staged_bytes} staged bytes: commit first, or send smaller updates"
                )
            self._append(staged.frame(0))
            self._stage(staged)
            return 0

    def _stage(self, staged: StagedRows) -> None:
        self._drop((staged.version, staged.token))  # a resend replaces it
        self._staged[(staged.version, staged.token)] = staged
        self._staged_at[(staged.version, staged.token)] = time.monotonic()
        self._staged_bytes += _cost(staged)

    def _drop(self, key: tuple[int, int]) -> None:
        dropped = self._staged.pop(key, None)
        self._staged_at.pop(key, None)
        if dropped is not None:
            self._staged_bytes -= _cost(dropped)

    def _age(self, key: tuple[int, int]) -> float:
        return time.monotonic() - self._staged_at[key]

    def _expire(self) -> None:
        """Drop (and log as aborted) the stages older than the TTL: attempts whose updater died or
        whose server stalled past it; none of them can still be decided."""
        for key in [k for k in self._staged if self._age(k) > self._stage_ttl_s]:
            self._append(encode(MessageType.ABORT, 0, [version_buffer(*key)]))
            self._drop(key)
            self.aborted += 1

    def _applied_at(self, staged: StagedRows) -> int:
        """(server 0) The version that applied `staged`'s (source, sequence), or 0. BadUpdate for
        a sequence older than every one this server still remembers of its source."""
        if not self.decides or staged.sequence is None:
            return 0
        applied = self._applied.get((staged.source, staged.sequence), 0)
        if not applied and staged.sequence <= self._forgotten.get(staged.source, -1):
            raise BadUpdate(
                f"sequence {staged.sequence} of source {staged.source!r} is older than the "
                f"{self._max_sequences} applied sequences remembered: whether it was applied cannot "
                "be told, so it is refused (send it with a new sequence if it must be applied)"
            )
        return applied

    def commit(self, version: int, token: int, written: np.ndarray) -> int:
        """Apply what (version, token) staged here; returns the version its rows are applied at:
        `version`, or (server 0) an earlier one that applied its (source, sequence) (then nothing
        is committed and the stage is dropped). Raises StaleVersion when the version was decided
        with another token, or when this server is behind it, and BadUpdate when this server has
        not staged exactly the rows `written` gives it (server 0: no stage, e.g. aborted)."""
        with self._mutex:
            if self.resyncing:  # its rows are being copied in: it claims no version
                raise StaleVersion(self.version)
            if version <= self.version:
                if self._token_of(version) != token:
                    raise StaleVersion(self.version)
                return version
            if version > self.version + 1:
                raise StaleVersion(self.version)
            staged = self._staged.get((version, token))
            if self.decides:
                if staged is None:
                    raise BadUpdate(f"version {version}: no such update is staged (aborted?)")
                if self._age((version, token)) > self._stage_ttl_s / 2:
                    raise BadUpdate(f"version {version}: the attempt staged too long ago; send it again")
                applied = self._applied_at(staged)
                if applied:
                    self._append(encode(MessageType.ABORT, 0, [version_buffer(version, token)]))
                    self._drop((version, token))
                    self.duplicates += 1
                    return applied
            have = 0 if staged is None else staged.rows.size
            if written.size <= self.store.server or int(written[self.store.server]) != have:
                raise Unproven(
                    f"embedding server {self.store.server} holds {have} staged rows of version "
                    f"{version}, not the {written.tolist()} its commit names: it cannot prove it holds "
                    "that version (a lost stage or log); it resyncs from a replica"
                )
            self._append(encode(MessageType.COMMIT, 0, [commit_buffer(version, token, written)]))
            self._commit(version, token, written)
            self._compact_if_long()
            return version

    def _commit(self, version: int, token: int, written: np.ndarray) -> None:
        staged = self._staged.get((version, token))
        self._drop((version, token))
        rows = np.unique(staged.rows) if staged is not None else np.empty(0, np.int64)
        with self.lock.exclusive():
            self._remember(version, self.store.image(rows))
            if staged is not None:
                self.store.write(staged.rows, staged.values)
            self.version = version
        self._written[rows] = True
        if self.decides and staged is not None and staged.sequence is not None:
            self._applied[(staged.source, staged.sequence)] = version
            while len(self._applied) > self._max_sequences:
                (source, sequence), _ = self._applied.popitem(last=False)
                self._forgotten[source] = max(sequence, self._forgotten.get(source, -1))
        self._decided.append(Decided(token, written.copy()))
        if len(self._decided) > self._max_decided_versions:
            self._decided.popleft()
        keys = self.store.keys(rows)
        self._changelog.append((version, keys))
        self._changelog_keys += keys.size
        while len(self._changelog) > 1 and (
            self._changelog_keys > self._max_changelog_keys or len(self._changelog) > MAX_CHANGELOG_VERSIONS
        ):
            dropped, old = self._changelog.popleft()
            self._changelog_keys -= old.size
            self._floor = dropped
        for key in [k for k in self._staged if k[0] <= version]:  # other attempts at decided versions
            self._drop(key)
        self.versions_applied += 1
        self.rows_applied += int(rows.size)

    def abort(self, version: int, token: int) -> bool:
        """Drop what (version, token) staged here (its updater gave up); True when that attempt is
        committed here already (then nothing changes). On server 0 an aborted attempt is never
        decided. StaleVersion for a version so old that the changelog no longer tells."""
        with self._mutex:
            if version <= self.version:
                decided = self._token_of(version)
                if decided is None:
                    raise StaleVersion(self.version)
                return decided == token
            if (version, token) in self._staged:
                self._append(encode(MessageType.ABORT, 0, [version_buffer(version, token)]))
                self._drop((version, token))
                self.aborted += 1
                self._compact_if_long()
            return False

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
        self._images_bytes = 0

    def image_at(self, read: int | None) -> RowImage | None:
        """What a lookup at version `read` (None: the committed one) reads in place of the rows
        written since (None: nothing was); StaleVersion when this server is behind `read`, no
        longer remembers what it needs, or is resyncing. Under the shared lock."""
        if self.resyncing:
            raise StaleVersion(self.version)
        if read is None or read == self.version:
            return None
        if read > self.version or read < self.readable_from:
            raise StaleVersion(self.version)
        image = self._images.get(read)
        if image is None:
            image = RowImage.earliest([old for v, old in self._history if v > read])
            if self._images_bytes + image.nbytes <= self._max_history_bytes:
                self._images[read] = image  # lookups at one version share it (a race repeats the work)
                self._images_bytes += image.nbytes
        return image

    def _token_of(self, version: int) -> int | None:
        """The token `version` (at most ours) was decided with (0: the checkpoint), None once
        forgotten."""
        if version == 0:
            return 0
        back = self.version - version
        return self._decided[-1 - back].token if back < len(self._decided) else None

    def changes(self, since: int) -> Changes:
        """The versions after `since` (at most MAX_CHANGES_VERSIONS) with their tokens and write
        sets, and the keys they changed; truncated when the keys or the versions no longer reach
        back to `since`."""
        with self._mutex:
            oldest = self.version - len(self._decided) + 1
            start = max(since + 1, oldest)
            listed = (
                list(itertools.islice(self._decided, start - oldest, start - oldest + MAX_CHANGES_VERSIONS))
                if start <= self.version
                else []
            )
            width = max((d.written.size for d in listed), default=0)
            keys = [k for v, k in self._changelog if v > since]
            return Changes(
                self.version,
                since < self._floor or start > since + 1,
                np.arange(start, start + len(listed), dtype=np.int64),
                np.array([d.token for d in listed], dtype=np.int64),
                np.array([np.pad(d.written, (0, width - d.written.size)) for d in listed], np.int64).reshape(
                    len(listed), width
                ),  # every COMMIT names the same servers; padding keeps a short one readable
                np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64),
            )

    # -- resync: a replica's rows copied in --------------------------------------------------------

    @property
    def copy_rows(self) -> int:
        """Rows one ROWS answer carries at most (COPY_BYTES of the widest stored row)."""
        widest = max((t.shape[1] * t.element_size() for t in self.store.tables), default=1)
        return max(1, COPY_BYTES // widest)

    def rows_at(self, version: int, start: int, stop: int) -> RowsCopy:
        """(A replica serving a resync) server-local rows [start, stop) as stored at `version`
        (those written since read from the history); StaleVersion when this server cannot answer
        at `version`, BadUpdate for a range it does not hold or longer than `copy_rows`."""
        if not (0 <= start < stop <= self.store.num_rows and stop - start <= self.copy_rows):
            raise BadUpdate(
                f"ROWS [{start}, {stop}): a range of at most {self.copy_rows} of this server's "
                f"{self.store.num_rows} rows"
            )
        with self.lock.shared():
            old = self.image_at(version)
            now = self.store.image(np.arange(start, stop, dtype=np.int64))
            written = self._written[start:stop].astype(np.uint8)
        if old is not None:  # the rows written after `version`, as they were at it
            kept = [
                (r[np.isin(r, n)], b[np.isin(r, n)])
                for (r, b), (n, _) in zip(old.parts, now.parts, strict=True)
            ]
            now = RowImage.earliest([RowImage(tuple(kept)), now])
        parts = tuple((rows, _bytes(stored)) for rows, stored in now.parts)
        return RowsCopy(version, start, written, parts)

    def begin_resync(self) -> None:
        """From now on, until `finish_resync`, every lookup and commit is answered STALE: rows are
        about to be copied over this server's (stages and aborts go on, and are logged)."""
        with self._mutex, self.lock.exclusive():
            self.resyncing = True

    def copy_in(self, copy: RowsCopy) -> None:
        """Write a replica's rows (its ROWS answer: the same shards, so the same layout) over ours."""
        rows = np.arange(copy.start, copy.start + copy.written.size, dtype=np.int64)
        if not (self.resyncing and rows.size and copy.start >= 0 and rows[-1] < self.store.num_rows):
            raise BadUpdate(f"rows [{copy.start}, {copy.start + rows.size}) cannot be copied in now")
        mine = self.store.image(rows)  # our layout of those rows: where each goes, its dtype and width
        if len(copy.parts) != len(mine.parts):
            raise BadUpdate(f"a copy of {len(copy.parts)} row segments, not this server's {len(mine.parts)}")
        parts = []
        for (got_rows, got), (want_rows, want) in zip(copy.parts, mine.parts, strict=True):
            if not np.array_equal(got_rows, want_rows) or got.shape != _bytes(want).shape:
                raise BadUpdate("a copy of rows laid out unlike this server's: not a replica of its shards")
            parts.append((want_rows, got.view(want.dtype).reshape(want.shape)))
        with self._mutex:
            self.store.restore(RowImage(tuple(parts)))
            self._written[rows] |= copy.written.astype(bool)

    def finish_resync(self, version: int, decided: Changes) -> None:
        """Claim `version`, whose rows were all copied in as stored at it. `decided` (server 0's
        CHANGES since before it) gives the tokens and write sets of `version` and those before it
        (what this server answers COMMITs and ABORTs of them with). The state is snapshotted and
        the log started afresh before lookups and commits are answered again: BadUpdate when
        `decided` does not list `version`, OSError when the snapshot cannot be written (then it
        stays resyncing)."""
        listed = decided.versions.tolist()
        if version not in listed:
            raise BadUpdate(f"server 0 no longer lists version {version}: resync again at a newer one")
        last = listed.index(version)
        first = max(0, last + 1 - self._max_decided_versions)
        with self._mutex:
            assert self.resyncing
            self.version = version
            self._decided = deque(
                Decided(int(decided.tokens[i]), decided.written[i].copy()) for i in range(first, last + 1)
            )
            self._changelog.clear()
            self._changelog_keys = 0
            self._floor = version  # rankers reading older versions clear their caches
            with self.lock.exclusive():
                self._history.clear()
                self._history_bytes = 0
                self._images.clear()
                self._images_bytes = 0
                self.readable_from = version
            for key in [k for k in self._staged if k[0] <= version]:
                self._drop(key)
            self._compact()
            with self.lock.exclusive():
                self.resyncing = False
            self.resyncs += 1

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            return {
                "version": self.version,
                "resyncing": int(self.resyncing),
                "staged_bytes": self._staged_bytes,
                "readable_from": self.readable_from,
                "history_bytes": self._history_bytes,
                **counts(
                    {
                        "versions_applied": self.versions_applied,
                        "rows_applied": self.rows_applied,
                        "duplicates": self.duplicates,
                        "aborted": self.aborted,
                        "compactions": self.compactions,
                        "resyncs": self.resyncs,
                    }
                ),
            }


def _bytes(stored: np.ndarray) -> np.ndarray:
    """Stored rows [k, width] of any dtype as their bytes, uint8 [k, row bytes] (as ROWS carries them)."""
    row_bytes = stored.dtype.itemsize * int(np.prod(stored.shape[1:]))
    return np.ascontiguousarray(stored).view(np.uint8).reshape(stored.shape[0], row_bytes)


def _cost(staged: StagedRows) -> int:
    """What a stage counts against max_staged_bytes: its values, and its record (so even stages
    without rows, as every attempt leaves on server 0, are bounded)."""
    return staged.values.nbytes + STAGE_RECORD_BYTES


class _Checksummed:
    """A file's `readinto` that keeps the CRC32 of what it read."""

    def __init__(self, file: io.BufferedReader) -> None:
        self._file = file
        self.crc = 0

    def readinto(self, view: memoryview) -> int:
        n: int = self._file.readinto(view)
        self.crc = zlib.crc32(view[:n], self.crc)
        return n


def _write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data`, or what it held before: never a part of it."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
