"""A server's versions without a network: store writes in every row format and storage, staging,
commit, changelog, bounds, duplicates and the update log's replay."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config.model import ModelSource
from flexemr.embedding_server import versions as versions_module
from flexemr.embedding_server.storage import DramStorage, FileStorage
from flexemr.embedding_server.store import BadSubrequest, ShardStore
from flexemr.embedding_server.versions import CorruptLog, RowVersions, StaleVersion
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec
from flexemr.protocol.updates import BadUpdate, StagedRows
from flexemr.sharding.plan import make_plan

SOURCE = ModelSource(preset="tiny", seed=5, row_dtype="int8,fp32,fp16,int8")
FP32 = ModelSource(preset="tiny", seed=5, row_dtype="fp32")


def _store(tmp: Path | None = None, server: int = 1, model: ModelSource = SOURCE) -> ShardStore:
    source = load_weights(model)
    plan = make_plan("row", source.spec.table_rows, source.spec.dim, 2)
    storage = DramStorage() if tmp is None else FileStorage(tmp / "rows", "f")
    return ShardStore(plan, server, source, progress=False, storage=storage)


def _values(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, model_spec(SOURCE).dim)).astype(np.float32)


@pytest.mark.parametrize("storage", ["dram", "mmap"])
def test_writes_store_rows_as_loading_would(tmp_path: Path, storage: str) -> None:
    store = _store(tmp_path if storage == "mmap" else None)
    rows = np.arange(0, store.num_rows, 7, dtype=np.int64)  # rows of every table and format
    values = _values(rows.size, 1)
    before = store.raw(np.array([1], dtype=np.int64))
    store.write(rows, values)
    segment, _ = store._locate(rows)
    for s, seg in enumerate(store.segments):
        mine = segment == s
        dtype, width = stored_rows.storage(seg.fmt, store.dim)
        encoded = np.empty((int(mine.sum()), width), dtype=dtype)
        stored_rows.encode(values[mine], seg.fmt, encoded)
        want = stored_rows.decode(torch.from_numpy(encoded), seg.fmt).numpy()
        np.testing.assert_array_equal(store.raw(rows[mine]), want)
    np.testing.assert_array_equal(store.raw(np.array([1], dtype=np.int64)), before)  # others untouched
    keys = store.keys(rows)
    assert keys.dtype == np.int64 and np.all(np.diff(keys) > 0)
    with pytest.raises(BadSubrequest, match="outside"):
        store.write(np.array([store.num_rows]), _values(1, 2))
    bad = _values(1, 3)
    bad[0, 0] = np.nan
    with pytest.raises(BadSubrequest, match="finite"):
        store.write(np.array([0]), bad)


def _staged(version: int, token: int, rows: list[int], seed: int, **kwargs: object) -> StagedRows:
    return StagedRows(version, token, np.array(rows, dtype=np.int64), _values(len(rows), seed), **kwargs)  # type: ignore[arg-type]


def _written(server: int, rows: int, servers: int = 2) -> np.ndarray:
    written = np.zeros(servers, dtype=np.int64)
    written[server] = rows
    return written


def _commit(versions: RowVersions, version: int, token: int, rows: int) -> int:
    """COMMIT (version, token) naming `rows` staged rows on `versions`' server."""
    return versions.commit(version, token, _written(versions.store.server, rows))


def test_stage_commit_changes_and_the_log_replay(tmp_path: Path) -> None:
    store = _store()
    versions = RowVersions(store, tmp_path / "log")
    assert versions.stage(_staged(1, 11, [0, 5], 1, source="s", sequence=3)) == 0
    assert versions.stage(_staged(1, 99, [6], 2)) == 0  # another attempt at version 1: never applied
    before = store.raw(np.array([6]))
    with pytest.raises(StaleVersion):
        _commit(versions, 2, 11, 2)  # behind: version 1 first
    assert _commit(versions, 1, 11, 2) == 1
    np.testing.assert_array_equal(store.raw(np.array([6])), before)
    assert _commit(versions, 1, 11, 2) == 1  # idempotent
    with pytest.raises(StaleVersion):
        _commit(versions, 1, 99, 1)  # version 1 was decided with token 11
    with pytest.raises(StaleVersion):
        versions.stage(_staged(1, 12, [1], 3))  # already decided
    assert versions.stage(_staged(2, 21, [7], 5, source="s", sequence=4)) == 0
    assert _commit(versions, 2, 21, 1) == 2
    changes = versions.changes(0)
    assert (changes.version, changes.truncated, changes.versions.tolist()) == (2, False, [1, 2])
    assert changes.written.tolist() == [[0, 2], [0, 1]]
    np.testing.assert_array_equal(changes.keys, store.keys(np.array([0, 5, 7])))
    assert versions.changes(1).keys.tolist() == store.keys(np.array([7])).tolist()
    assert versions.stage(_staged(3, 31, [9], 6)) == 0  # staged, not committed
    rows = store.raw(np.arange(10))
    versions.close()
    with open(tmp_path / "log", "ab") as log:  # a crash in the middle of a record
        log.write(b"FXEM\x01\x09")

    again = _store()
    replayed = RowVersions(again, tmp_path / "log")
    assert replayed.version == 2
    np.testing.assert_array_equal(again.raw(np.arange(10)), rows)
    assert _commit(replayed, 3, 31, 1) == 3  # what was staged survives, for a decided commit
    np.testing.assert_allclose(again.raw(np.array([9])), _values(1, 6), atol=0.05)  # an int8 row
    replayed.close()


def test_server_0_applies_each_source_sequence_once_whatever_the_order(tmp_path: Path) -> None:
    """Issue #27 item 5: (s, 11) then (s, 10) are both applied once; a resend of either is
    answered with the version that applied it, at stage time or (staged ahead) at commit time."""
    store = _store(server=0)
    decider = RowVersions(store, tmp_path / "log")
    assert decider.stage(_staged(1, 1, [0], 1, source="s", sequence=11)) == 0
    assert _commit(decider, 1, 1, 1) == 1
    assert decider.stage(_staged(2, 2, [1], 2, source="s", sequence=10)) == 0  # lower, not applied yet
    assert _commit(decider, 2, 2, 1) == 2
    np.testing.assert_allclose(store.raw(np.array([1])), _values(1, 2), atol=0.05)
    assert decider.stage(_staged(3, 3, [2], 3, source="s", sequence=11)) == 1
    assert decider.stage(_staged(3, 3, [2], 3, source="s", sequence=10)) == 2
    assert decider.stage(_staged(4, 4, [3], 4, source="s", sequence=12)) == 0  # staged ahead
    assert decider.stage(_staged(3, 5, [3], 5, source="s", sequence=12)) == 0
    assert _commit(decider, 3, 5, 1) == 3
    before = store.raw(np.array([3]))
    assert _commit(decider, 4, 4, 1) == 3  # (s, 12) was applied at 3: not again
    np.testing.assert_array_equal(store.raw(np.array([3])), before)
    assert decider.version == 3 and decider.stats()["staged_bytes"] == 0
    decider.close()
    replayed = RowVersions(_store(server=0), tmp_path / "log")  # the applied pairs survive
    assert replayed.stage(_staged(4, 6, [2], 6, source="s", sequence=10)) == 2
    replayed.close()
    other = RowVersions(_store(server=1), tmp_path / "log1")  # only server 0 decides
    assert other.stage(_staged(1, 1, [0], 1, source="s", sequence=11)) == 0
    assert _commit(other, 1, 1, 1) == 1
    assert other.stage(_staged(2, 2, [1], 2, source="s", sequence=11)) == 0
    other.close()


def test_applied_sequences_are_bounded_and_older_ones_refused(tmp_path: Path) -> None:
    decider = RowVersions(_store(server=0), tmp_path / "log", max_sequences=2)
    for v, sequence in enumerate([5, 6, 7], start=1):
        decider.stage(_staged(v, v, [v], v, source="s", sequence=sequence))
        _commit(decider, v, v, 1)
    assert decider.stage(_staged(4, 4, [0], 4, source="s", sequence=6)) == 2
    with pytest.raises(BadUpdate, match="cannot be told"):
        decider.stage(_staged(4, 4, [0], 4, source="s", sequence=5))
    assert decider.stage(_staged(4, 4, [0], 4, source="s", sequence=8)) == 0
    decider.close()


def test_a_decided_version_needs_its_token_even_once_forgotten(tmp_path: Path) -> None:
    """Issue #27 item 1: a COMMIT of another attempt at a version decided long ago (out of the
    changelog) is STALE, never acknowledged as if it were that version; once even its token is
    forgotten, an ABORT cannot be answered either."""
    decider = RowVersions(_store(server=0), tmp_path / "log", max_changelog_keys=2, max_decided_versions=2)
    decider.stage(_staged(1, 7, [0], 1))  # writer A stages version 1, then pauses
    decider.stage(_staged(1, 8, [1], 2))  # writer B takes version 1, then 2 and 3
    _commit(decider, 1, 8, 1)
    for v in (2, 3):
        decider.stage(_staged(v, v, [v], v))
        _commit(decider, v, v, 1)
    assert decider.changes(0).truncated  # version 1 is out of the changelog
    with pytest.raises(StaleVersion):
        _commit(decider, 1, 7, 1)
    with pytest.raises(StaleVersion):
        decider.abort(1, 7)  # cannot tell: never "not committed" for a forgotten version
    assert not decider.abort(2, 7) and decider.abort(2, 2)  # remembered tokens
    assert _commit(decider, 3, 3, 1) == 3
    decider.close()


def test_aborted_and_expired_attempts_free_the_stage_for_good(tmp_path: Path) -> None:
    """Issue #27 item 2: failed attempts that filled the stage are dropped by ABORT, server 0
    never decides one, and the log replay does not bring them back."""
    one = _staged(1, 0, [0], 0).values.nbytes + versions_module.STAGE_RECORD_BYTES
    decider = RowVersions(_store(server=0), tmp_path / "log", max_staged_bytes=3 * one)
    for token in (1, 2, 3):  # a producer retrying while a replica is down
        decider.stage(_staged(1, token, [token], token))
    with pytest.raises(BadUpdate, match="staged bytes"):
        decider.stage(_staged(1, 4, [4], 4))
    assert [decider.abort(1, token) for token in (1, 2, 3)] == [False] * 3
    assert decider.stats()["staged_bytes"] == 0
    with pytest.raises(BadUpdate, match="no such update"):
        _commit(decider, 1, 1, 1)  # aborted: never decided
    decider.stage(_staged(1, 5, [5], 5))
    decider.close()
    replayed = RowVersions(_store(server=0), tmp_path / "log", max_staged_bytes=3 * one)
    assert replayed.stats()["staged_bytes"] == 0  # server 0 decides no attempt from before
    with pytest.raises(BadUpdate, match="no such update"):
        _commit(replayed, 1, 5, 1)
    replayed.stage(_staged(1, 5, [5], 5))
    assert _commit(replayed, 1, 5, 1) == 1
    assert replayed.abort(1, 5)  # committed: an abort changes nothing
    replayed.close()
    participant = RowVersions(_store(server=1), tmp_path / "log1", max_staged_bytes=3 * one)
    participant.stage(_staged(1, 5, [5], 5))
    participant.close()
    assert RowVersions(_store(server=1), tmp_path / "log1").stats()["staged_bytes"] == one  # kept


def test_stages_past_their_ttl_make_room_and_are_never_decided(tmp_path: Path) -> None:
    """Issue #27 item 2: stages left by attempts whose updater died or whose ABORT never reached
    a stalled server are dropped (for good) once past the TTL and room is needed; server 0
    refuses to decide an attempt staged more than half the TTL ago."""
    one = _staged(1, 0, [0], 0).values.nbytes + versions_module.STAGE_RECORD_BYTES
    participant = RowVersions(_store(), tmp_path / "log", max_staged_bytes=2 * one, stage_ttl_s=0.2)
    participant.stage(_staged(1, 1, [1], 1))
    participant.stage(_staged(1, 2, [2], 2))
    with pytest.raises(BadUpdate, match="staged bytes"):
        participant.stage(_staged(1, 3, [3], 3))  # not old enough to drop
    time.sleep(0.3)
    participant.stage(_staged(1, 3, [3], 3))
    assert participant.stats()["staged_bytes"] == one and participant.stats()["aborted"] == 2
    participant.close()
    replayed = RowVersions(_store(), tmp_path / "log", stage_ttl_s=0.2)
    assert replayed.stats()["staged_bytes"] == one  # the dropped ones stay dropped
    replayed.close()
    decider = RowVersions(_store(server=0), tmp_path / "log0", stage_ttl_s=0.2)
    decider.stage(_staged(1, 1, [1], 1))
    time.sleep(0.15)
    with pytest.raises(BadUpdate, match="too long ago"):
        _commit(decider, 1, 1, 1)
    decider.close()


def test_a_commit_needs_the_rows_its_write_set_names(tmp_path: Path) -> None:
    """Issue #27 item 3: a server that lost its stage (or its log) refuses a commit that wrote
    rows there, rather than claiming the version with old rows; one the update skipped commits."""
    versions = RowVersions(_store(), tmp_path / "log")
    with pytest.raises(BadUpdate, match="cannot prove"):
        _commit(versions, 1, 1, 2)
    assert versions.version == 0
    assert _commit(versions, 1, 1, 0) == 1  # nothing here: the version holds no rows of this server
    versions.stage(_staged(2, 2, [0, 1], 2))
    with pytest.raises(BadUpdate, match="cannot prove"):
        _commit(versions, 2, 2, 3)
    assert _commit(versions, 2, 2, 2) == 2
    versions.close()


def test_the_log_is_checksummed_and_belongs_to_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #27 items 11 and 3: a corrupt record before acknowledged ones stops the replay (no
    silent truncation); a failed append leaves nothing behind; a log of other shards is refused."""
    path = tmp_path / "log"
    versions = RowVersions(_store(), path, fingerprint="shards-a")
    for v in (1, 2):
        versions.stage(_staged(v, v, [v], v))
        _commit(versions, v, v, 1)
    size = path.stat().st_size
    real_fsync, failures = os.fsync, [OSError(28, "No space left on device")]

    def fsync_fails_once(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_once)
    with pytest.raises(BadUpdate, match="No space left"):
        versions.stage(_staged(3, 3, [3], 3))
    monkeypatch.undo()
    assert path.stat().st_size == size
    versions.stage(_staged(3, 3, [3], 3))
    _commit(versions, 3, 3, 1)
    versions.close()
    assert RowVersions(_store(), path, fingerprint="shards-a").version == 3
    with pytest.raises(CorruptLog, match="fingerprint"):
        RowVersions(_store(), path, fingerprint="shards-b")
    data = bytearray(path.read_bytes())
    data[size + 60] ^= 0xFF  # inside version 3's UPDATE, with its COMMIT after it
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog, match=r"checksum|corrupt"):
        RowVersions(_store(), path, fingerprint="shards-a")
    assert path.stat().st_size == len(data)  # nothing truncated


def test_bounds_refuse_or_forget(tmp_path: Path) -> None:
    versions = RowVersions(_store(), tmp_path / "log", max_staged_bytes=1500, max_changelog_keys=3)
    with pytest.raises(BadUpdate, match="staged bytes"):
        versions.stage(_staged(1, 1, list(range(20)), 1))
    for v in range(1, 4):
        versions.stage(_staged(v, v, [v, v + 10], v))
        _commit(versions, v, v, 2)
    assert versions.changes(0).truncated  # version 1's keys were dropped
    assert not versions.changes(2).truncated
    versions.close()
    with pytest.raises(BadUpdate, match="update log"):
        RowVersions(_store()).stage(_staged(1, 1, [0], 1))


def _bags(store: ShardStore) -> tuple[np.ndarray, np.ndarray]:
    """Every server-local row once, in bags of up to 3 rows of one shard (one row format)."""
    rows, offsets = [], []
    for shard in sorted(store.shards, key=lambda s: s.local_start):
        local = np.arange(shard.local_start, shard.local_start + shard.rows, dtype=np.int64)
        offsets.extend(range(sum(r.size for r in rows), sum(r.size for r in rows) + local.size, 3))
        rows.append(local)
    return np.concatenate(rows), np.array(offsets, dtype=np.int64)


def test_lookups_at_older_versions_read_the_history_bit_for_bit(tmp_path: Path) -> None:
    store = _store()
    rows, offsets = _bags(store)
    weights = np.random.default_rng(9).random(rows.size).astype(np.float32)

    def now() -> tuple[np.ndarray, ...]:
        return store.raw(rows), store.pooled(rows, offsets), store.pooled(rows, offsets, weights)

    seen = [now()]
    versions = RowVersions(store, tmp_path / "log")
    changed = [[0, 5, 7, store.num_rows - 1], [5, 6, 7, 8]]  # rows of several formats, overlapping
    for v, written in enumerate(changed, start=1):
        versions.stage(_staged(v, v, written, v))
        _commit(versions, v, v, len(written))
        seen.append(now())
    assert not np.array_equal(seen[0][1], seen[1][1]) and not np.array_equal(seen[1][1], seen[2][1])
    for read, (raw, pooled, weighted) in enumerate(seen):
        with versions.lock.shared():
            image = versions.image_at(read)
            assert (image is None) == (read == versions.version)
            np.testing.assert_array_equal(store.raw(rows, image), raw)
            np.testing.assert_array_equal(store.pooled(rows, offsets, None, image), pooled)
            np.testing.assert_array_equal(store.pooled(rows, offsets, weights, image), weighted)
            # int32 rows and offsets, as rankers send them
            np.testing.assert_array_equal(
                store.pooled(rows.astype(np.int32), offsets.astype(np.int32), None, image), pooled
            )
    with pytest.raises(StaleVersion):
        versions.image_at(3)  # ahead of this server: it is behind
    versions.close()


def test_the_history_is_bounded_and_reads_beyond_it_are_stale(tmp_path: Path) -> None:
    store = _store()
    one_row = store.image(np.array([0], dtype=np.int64)).nbytes
    versions = RowVersions(store, tmp_path / "log", max_history_bytes=2 * one_row)
    for v in range(1, 4):
        versions.stage(_staged(v, v, [v], v))
        _commit(versions, v, v, 1)
    assert versions.readable_from == 1 and versions.stats()["history_bytes"] <= 2 * one_row
    with versions.lock.shared():
        with pytest.raises(StaleVersion):
            versions.image_at(0)  # version 1's overwritten row is forgotten
        assert versions.image_at(1) is not None
        assert versions.image_at(2) is not None
        # the merged images kept for lookups count against the bound too (issue #27 item 13)
        assert sum(image.nbytes for image in versions._images.values()) <= 2 * one_row
    versions.close()
    none = RowVersions(_store(), tmp_path / "log0", max_history_bytes=0)
    none.stage(_staged(1, 1, [0], 1))
    _commit(none, 1, 1, 1)
    with pytest.raises(StaleVersion):
        none.image_at(0)
    none.close()


def test_the_log_stays_bounded_through_10000_updates_and_replays_from_its_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #27 item 13: compaction by snapshot keeps the disk bounded; a restart from the
    snapshot and the log after it has the rows, the tokens, the applied (source, sequence) pairs
    and the live stages; a crash between the snapshot and the fresh log replays correctly."""
    path, limit, remembered = tmp_path / "log", 16 * 2**10, 1000
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # bounds, not durability: this disk is shared
    store = _store(server=0, model=FP32)
    bounds = functools.partial(
        RowVersions, max_log_bytes=limit, max_sequences=remembered, max_decided_versions=remembered
    )
    versions = bounds(store, path)
    rng = np.random.default_rng(0)
    largest = 0
    for v in range(1, 10_001):
        rows = np.unique(rng.integers(0, store.num_rows, 3)).tolist()
        assert versions.stage(_staged(v, v, rows, v, source="s", sequence=v)) == 0
        _commit(versions, v, v, len(rows))
        snapshot = tmp_path / "log.snapshot"
        disk = path.stat().st_size + (snapshot.stat().st_size if snapshot.exists() else 0)
        largest = max(largest, disk)
    assert versions.stats()["compactions"] > 100
    row_bytes = store.num_rows * (store.dim * 4 + 8)  # every row written, and its number
    metadata = remembered * (8 + 16 + 16 + 4)  # tokens, write sets, (sequence, version) pairs, sources
    assert largest < limit + row_bytes + metadata + 16 * 2**10  # the log, the snapshot, zip headers
    assert versions.stage(_staged(10_001, 5, [1, 2], 1)) == 0  # a live stage
    rows = store.raw(np.arange(store.num_rows))
    versions.close()

    again = _store(server=0, model=FP32)
    replayed = bounds(again, path)
    assert replayed.version == 10_000
    np.testing.assert_array_equal(again.raw(np.arange(again.num_rows)), rows)
    assert replayed.stage(_staged(10_001, 6, [3], 3, source="s", sequence=9_990)) == 9_990
    with pytest.raises(BadUpdate, match="cannot be told"):
        replayed.stage(_staged(10_001, 6, [3], 3, source="s", sequence=17))
    with pytest.raises(StaleVersion):
        _commit(replayed, 10_000, 999, 0)  # the token of version 10,000 survived
    real = versions_module._write_atomically
    calls: list[Path] = []

    def the_fresh_log_fails(target: Path, data: bytes) -> None:
        calls.append(target)
        if target == path:
            raise OSError(28, "No space left on device")
        real(target, data)

    monkeypatch.setattr(versions_module, "_write_atomically", the_fresh_log_fails)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    while not calls:  # until the next compaction: its snapshot is written, the log stays
        v = replayed.version + 1
        replayed.stage(_staged(v, 5 if v == 10_001 else v, [v % 50], v))
        _commit(replayed, v, 5 if v == 10_001 else v, 1)
    monkeypatch.undo()
    v = replayed.version + 1
    replayed.stage(_staged(v, v, [7], v))
    _commit(replayed, v, v, 1)
    rows = again.raw(np.arange(again.num_rows))
    replayed.close()
    third = _store(server=0, model=FP32)
    assert RowVersions(third, path, max_sequences=remembered, max_decided_versions=remembered).version == v
    np.testing.assert_array_equal(third.raw(np.arange(third.num_rows)), rows)


def test_a_restarted_mmap_server_starts_from_the_checkpoint_and_its_log(tmp_path: Path) -> None:
    """Issue #27 item 6: a row file that updates wrote is refilled from the checkpoint at the
    next start, so a server without its log is at version 0 with the checkpoint's rows (before:
    the file's updated rows, as `serve` keeps row files and deletes its temporary log), and one
    with its log replays it from the checkpoint, its history (reads at older versions) exact."""
    every = np.arange(_store(tmp_path / "a").num_rows)
    checkpoint = _store(tmp_path / "a").raw(every)
    store = _store(tmp_path / "a")
    versions = RowVersions(store, tmp_path / "log")
    for v, rows in enumerate([[0, 5], [5, 7]], start=1):
        versions.stage(_staged(v, v, rows, v))
        _commit(versions, v, v, 2)
    updated = store.raw(every)
    versions.close()
    np.testing.assert_array_equal(_store(tmp_path / "a").raw(every), checkpoint)  # no log: version 0

    replayed_store = _store(tmp_path / "a")
    replayed = RowVersions(replayed_store, tmp_path / "log")
    assert replayed.version == 2
    np.testing.assert_array_equal(replayed_store.raw(every), updated)
    with replayed.lock.shared():
        np.testing.assert_array_equal(replayed_store.raw(every, replayed.image_at(0)), checkpoint)
    replayed.close()


def test_a_server_behind_the_changelog_window_catches_up_from_the_decided_versions(tmp_path: Path) -> None:
    """Issue #27 item 4: the changelog's keys reach back 2 versions only, yet a server that
    missed 50 (none of them wrote its rows: with a replica down, updates to its rows fail)
    commits them all from server 0's decided versions, tokens and write sets."""
    decider = RowVersions(_store(server=0), tmp_path / "log0", max_changelog_keys=2)
    behind = RowVersions(_store(server=1), tmp_path / "log1")
    for v in range(1, 51):
        decider.stage(_staged(v, 100 + v, [v], v))
        decider.commit(v, 100 + v, np.array([1, 0]))
    changes = decider.changes(0)
    assert changes.truncated  # the keys no longer reach back: a ranker clears its cache
    assert changes.versions.tolist() == list(range(1, 51))
    for v, token, written in zip(
        changes.versions.tolist(), changes.tokens.tolist(), changes.written, strict=True
    ):
        behind.commit(v, token, written)
    assert behind.version == 50
    decider.close()
    behind.close()


def test_a_server_down_through_compactions_catches_up_or_stays_behind_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #27 item 13, its last part (in process): server 0's log is compacted many times and
    server 0 restarted from its snapshot while server 1 was down; server 1 (no row of its written
    meanwhile: with it down, updates to its rows fail) commits every version it missed from the
    decided versions server 0 kept. Missed more than those: it refuses the commit (StaleVersion)
    and stays at its version, never guessed forward."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # bounds, not durability: this disk is shared
    bounds = functools.partial(RowVersions, max_log_bytes=4 * 2**10, max_decided_versions=500)
    decider = bounds(_store(server=0), tmp_path / "log0")
    for v in range(1, 401):
        decider.stage(_staged(v, 100 + v, [v % 50], v))
        decider.commit(v, 100 + v, np.array([1, 0]))
    assert decider.stats()["compactions"] > 10
    decider.close()
    decider = bounds(_store(server=0), tmp_path / "log0")  # from its snapshot
    rejoining = RowVersions(_store(server=1), tmp_path / "log1")
    changes = decider.changes(0)
    for v, token, written in zip(
        changes.versions.tolist(), changes.tokens.tolist(), changes.written, strict=True
    ):
        rejoining.commit(v, token, written)
    assert rejoining.version == 400

    for v in range(401, 1001):  # 600 more: the first 100 of them are forgotten
        decider.stage(_staged(v, 100 + v, [v % 50], v))
        decider.commit(v, 100 + v, np.array([1, 0]))
    changes = decider.changes(400)
    assert changes.truncated and changes.versions[0] > 401
    with pytest.raises(StaleVersion):
        rejoining.commit(int(changes.versions[0]), int(changes.tokens[0]), changes.written[0])
    assert rejoining.version == 400
    decider.close()
    rejoining.close()


def test_a_snapshot_belongs_to_its_shards(tmp_path: Path) -> None:
    """Issue #27 item 3: a snapshot left by other shards (a re-planned cluster reusing log_dir,
    its log deleted) is refused, never restored into these shards' rows."""
    versions = RowVersions(_store(), tmp_path / "log", max_log_bytes=1, fingerprint="old plan")
    versions.stage(_staged(1, 1, [3], 1))
    _commit(versions, 1, 1, 1)
    versions.close()
    assert (tmp_path / "log.snapshot").exists()
    (tmp_path / "log").unlink()
    with pytest.raises(CorruptLog, match="snapshot"):
        RowVersions(_store(), tmp_path / "log", fingerprint="new plan")
    again = RowVersions(_store(), tmp_path / "log", fingerprint="old plan")
    assert again.version == 1
    again.close()
