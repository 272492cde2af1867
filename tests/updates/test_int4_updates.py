"""Updates of int4 rows: an updated row holds the bytes a checkpoint with its new values loads
(re-quantised to int4 the same way), in memory and in the SSD tier's row file; values int4's fp16
scale and bias cannot hold are refused before anything is written. (Over real processes:
`test_cluster_updates.py` serves an int4 table.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config.model import ModelSource
from flexemr.embedding_server.storage import DramStorage, FileStorage
from flexemr.embedding_server.store import BadSubrequest, RowImage, ShardStore
from flexemr.model.source import load_weights
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from flexemr.updates import RowUpdates

ROW_DTYPE = "int4,fp32,fp16,int4"


def _checkpoint(path: Path, updates: RowUpdates | None = None) -> str:
    """The tiny preset's fp32 model as Meta's reference state_dict, with `updates` written in."""
    state = build_monolithic(load_weights(ModelSource(preset="tiny", seed=4))).state_dict()
    if updates is not None:
        for t, r, v in zip(updates.tables.tolist(), updates.rows.tolist(), updates.values, strict=True):
            state[f"emb_l.{t}.weight"][r] = torch.from_numpy(v)
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("storage", ["dram", "mmap"])
def test_updated_int4_rows_hold_the_bytes_a_checkpoint_of_their_values_loads(
    tmp_path: Path, storage: str
) -> None:
    source = load_weights(ModelSource(checkpoint=_checkpoint(tmp_path / "before.pt"), row_dtype=ROW_DTYPE))
    plan = make_plan("row", source.spec.table_rows, source.spec.dim, 2)
    backing = DramStorage() if storage == "dram" else FileStorage(tmp_path / "server-1.rows", "before")
    store = ShardStore(plan, 1, source, progress=False, storage=backing)
    rng = np.random.default_rng(0)
    shards = plan.shards_of(1)
    tables = np.concatenate([np.full(3, s.table) for s in shards]).astype(np.int64)
    rows = np.concatenate([rng.choice(np.arange(s.row_start, s.row_end), 3, replace=False) for s in shards])
    local = np.repeat([s.local_start - s.row_start for s in shards], 3) + rows
    values = rng.standard_normal((rows.size, source.spec.dim)).astype(np.float32) * 3
    updates = RowUpdates(tables, rows, values)
    updates.check(source.spec)
    store.write(local, values)

    after = load_weights(
        ModelSource(checkpoint=_checkpoint(tmp_path / "after.pt", updates), row_dtype=ROW_DTYPE)
    )
    loaded = ShardStore(plan, 1, after, progress=False, storage=DramStorage())
    assert [s.fmt for s in store.segments] == [s.fmt for s in loaded.segments] == ["int4", "fp32", "fp16"]
    for written, want in zip(store.tables, loaded.tables, strict=True):
        assert written.dtype == want.dtype and torch.equal(written, want)  # every row, byte for byte
    everything = np.arange(store.num_rows)
    np.testing.assert_array_equal(store.raw(everything), loaded.raw(everything))


def test_values_int4_or_fp16_rows_cannot_hold_are_refused() -> None:
    source = load_weights(ModelSource(preset="tiny", seed=4, row_dtype=ROW_DTYPE))
    spec = source.spec
    plan = make_plan("table", spec.table_rows, spec.dim, 1)
    store = ShardStore(plan, 0, source, progress=False, storage=DramStorage())
    fine = np.zeros((4, spec.dim), dtype=np.float32)
    fine[:, 0], fine[:, 1] = -60_000, 60_000  # int4: |min| and (max - min) / 15 within fp16's 65504
    fine[1] = 1e6  # table 1 is fp32
    fine[2] = 60_000  # table 2 is fp16
    tables, rows = np.arange(4, dtype=np.int64), np.array([5, 6, 7, 8], dtype=np.int64)
    RowUpdates(tables, rows, fine).check(spec)
    local = np.array([plan.shards[t].local_start + r for t, r in zip(tables, rows, strict=True)])
    assert [plan.shards[t].table for t in tables] == tables.tolist()
    before = store.raw(local)
    for table, value in ((0, 1e6), (2, 70_000), (3, -70_000)):
        bad = fine.copy()
        bad[table] = value
        with pytest.raises(ValueError, match=f"row {rows[table]} of table {table} cannot be stored as"):
            RowUpdates(tables, rows, bad).check(spec)
        with pytest.raises(BadSubrequest, match=f"row {local[table]} cannot be stored as"):
            store.write(local, bad)
    np.testing.assert_array_equal(store.raw(local), before)  # nothing was written
    store.write(local, fine)
    np.testing.assert_array_equal(store.raw(local[[0, 3]])[:, :2], [[-60_000, 60_000]] * 2)


def test_a_lookup_at_the_version_before_an_int4_write_reads_the_old_rows_bit_for_bit() -> None:
    source = load_weights(ModelSource(preset="tiny", seed=4, row_dtype=ROW_DTYPE))
    plan = make_plan("table", source.spec.table_rows, source.spec.dim, 1)
    store = ShardStore(plan, 0, source, progress=False, storage=DramStorage())
    rng = np.random.default_rng(1)
    # 3 bags of 10 rows in each table (a bag's rows come from one table, so one format)
    rows = np.concatenate([rng.integers(s.local_start, s.local_start + s.rows, 30) for s in plan.shards])
    offsets = np.arange(0, rows.size, 10)
    weights = rng.random(rows.size).astype(np.float32)

    def now(image: RowImage | None = None) -> list[np.ndarray]:
        return [store.raw(rows, image), store.pooled(rows, offsets, None, image),
                store.pooled(rows, offsets, weights, image),
                store.pooled(rows.astype(np.int32), offsets.astype(np.int32), None, image)]  # fmt: skip

    before = now()
    written = np.arange(0, store.num_rows, 3)  # rows of every table and format
    image = store.image(written)
    store.write(written, rng.standard_normal((written.size, store.dim)).astype(np.float32))
    assert not np.array_equal(now()[1], before[1])
    for old, want in zip(now(image), before, strict=True):
        np.testing.assert_array_equal(old, want)
