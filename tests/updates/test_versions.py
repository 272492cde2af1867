"""A server's versions without a network: store writes in every row format and storage, staging,
commit, changelog, bounds, duplicates and the update log's replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config.model import ModelSource
from flexemr.embedding_server.storage import DramStorage, FileStorage
from flexemr.embedding_server.store import BadSubrequest, ShardStore
from flexemr.embedding_server.versions import RowVersions, StaleVersion
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec
from flexemr.protocol.updates import BadUpdate, StagedRows
from flexemr.sharding.plan import make_plan

SOURCE = ModelSource(preset="tiny", seed=5, row_dtype="int8,fp32,fp16,int8")


def _store(tmp: Path | None = None, server: int = 1) -> ShardStore:
    source = load_weights(SOURCE)
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


def test_stage_commit_changes_and_the_log_replay(tmp_path: Path) -> None:
    store = _store()
    versions = RowVersions(store, tmp_path / "log")
    assert versions.stage(_staged(1, 11, [0, 5], 1, source="s", sequence=3))
    assert versions.stage(_staged(1, 99, [6], 2))  # another attempt at version 1: never applied
    before = store.raw(np.array([6]))
    with pytest.raises(StaleVersion):
        versions.commit(2, 11)  # behind: version 1 first
    assert versions.commit(1, 11) == 1
    np.testing.assert_array_equal(store.raw(np.array([6])), before)
    assert versions.commit(1, 11) == 1  # idempotent
    with pytest.raises(StaleVersion):
        versions.commit(1, 99)  # version 1 was decided with token 11
    with pytest.raises(StaleVersion):
        versions.stage(_staged(1, 12, [1], 3))  # already decided
    assert not versions.stage(_staged(2, 21, [0], 4, source="s", sequence=3))  # a duplicate
    assert versions.stage(_staged(2, 21, [7], 5, source="s", sequence=4))
    assert versions.commit(2, 21) == 2
    changes = versions.changes(0)
    assert (changes.version, changes.truncated, changes.versions.tolist()) == (2, False, [1, 2])
    np.testing.assert_array_equal(changes.keys, store.keys(np.array([0, 5, 7])))
    assert versions.changes(1).keys.tolist() == store.keys(np.array([7])).tolist()
    assert versions.stage(_staged(3, 31, [9], 6))  # staged, not committed
    rows = store.raw(np.arange(10))
    versions.close()
    with open(tmp_path / "log", "ab") as log:  # a crash in the middle of a record
        log.write(b"FXEM\x01\x09")

    again = _store()
    replayed = RowVersions(again, tmp_path / "log")
    assert replayed.version == 2
    np.testing.assert_array_equal(again.raw(np.arange(10)), rows)
    assert not replayed.stage(_staged(3, 32, [0], 7, source="s", sequence=4))  # sequences survive
    assert replayed.commit(3, 31) == 3  # what was staged survives, for a healing commit
    np.testing.assert_allclose(again.raw(np.array([9])), _values(1, 6), atol=0.05)  # an int8 row
    replayed.close()


def test_bounds_refuse_or_forget(tmp_path: Path) -> None:
    versions = RowVersions(_store(), tmp_path / "log", max_staged_bytes=200, max_changelog_keys=3)
    with pytest.raises(BadUpdate, match="staged bytes"):
        versions.stage(_staged(1, 1, list(range(10)), 1))
    for v in range(1, 4):
        versions.stage(_staged(v, v, [v, v + 10], v))
        versions.commit(v, v)
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
        versions.commit(v, v)
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
        versions.commit(v, v)
    assert versions.readable_from == 1 and versions.stats()["history_bytes"] <= 2 * one_row
    with versions.lock.shared():
        with pytest.raises(StaleVersion):
            versions.image_at(0)  # version 1's overwritten row is forgotten
        assert versions.image_at(1) is not None
    versions.close()
    none = RowVersions(_store(), tmp_path / "log0", max_history_bytes=0)
    none.stage(_staged(1, 1, [0], 1))
    none.commit(1, 1)
    with pytest.raises(StaleVersion):
        none.image_at(0)
    none.close()
