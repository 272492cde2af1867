"""A server's column slices: stored as the whole rows' bytes cut to the shard's columns (an int8
slice keeps the row's scale and bias), written from whole rows, answered zero-filled to the
server's widest shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.embedding_server.store import ShardStore
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec

SOURCE = ModelSource(preset="tiny", seed=2, row_dtype="int8,fp16,fp32,int8")


def plan_with_slices() -> ShardingPlan:
    """Server 0: table 0 columns [0, 3) and table 1 whole; server 1: table 0 columns [3, 8), tables
    2 and 3 whole (two widths and three formats on each server)."""
    spec = model_spec(SOURCE)
    rows = spec.table_rows
    shards = (
        Shard(0, 0, rows[0], 0, 0, col_start=0, col_end=3),
        Shard(1, 0, rows[1], 0, rows[0]),
        Shard(0, 0, rows[0], 1, 0, col_start=3, col_end=8),
        Shard(2, 0, rows[2], 1, rows[0]),
        Shard(3, 0, rows[3], 1, rows[0] + rows[2]),
    )
    return ShardingPlan(2, rows, spec.dim, shards)


def whole(table: int, rows: np.ndarray) -> np.ndarray:
    """The rows' values as the monolithic model holds them (stored in the table's format)."""
    spec, source = model_spec(SOURCE), load_weights(SOURCE)
    fmt = spec.formats[table]
    values = np.empty((spec.table_rows[table], spec.dim), dtype=np.float32)
    source.fill_rows(table, 0, values)
    dtype, width = stored_rows.storage(fmt, spec.dim)
    stored = np.empty((values.shape[0], width), dtype=dtype)
    stored_rows.encode(values, fmt, stored)
    return stored_rows.decode(torch.from_numpy(stored[rows]), fmt).numpy()


@pytest.mark.parametrize("server", [0, 1])
def test_slices_read_back_as_the_whole_rows_columns(server: int) -> None:
    plan = plan_with_slices()
    store = ShardStore(plan, server, load_weights(SOURCE), progress=False)
    assert store.width == plan.dim  # its widest shard is a whole table
    for shard in plan.shards_of(server):
        first, last = shard.columns(plan.dim)
        rows = np.arange(shard.rows)
        got = store.raw(rows + shard.local_start)
        assert got.shape == (rows.size, store.width)
        np.testing.assert_array_equal(got[:, : last - first], whole(shard.table, rows)[:, first:last])
        assert not got[:, last - first :].any()  # a narrower shard's answers are zero-filled
        pooled = store.pooled(rows + shard.local_start, np.arange(rows.size))  # bags of one row
        np.testing.assert_array_equal(pooled, got)


def test_a_write_of_whole_rows_keeps_each_shards_columns() -> None:
    plan = plan_with_slices()
    stores = [ShardStore(plan, s, load_weights(SOURCE), progress=False) for s in range(2)]
    rows = np.array([1, 7, 42])
    values = np.random.default_rng(0).standard_normal((rows.size, plan.dim)).astype(np.float32)
    encoded = np.empty((rows.size, plan.dim + 8), dtype=np.uint8)  # table 0 is int8
    stored_rows.encode(values, "int8", encoded)
    want = stored_rows.decode(torch.from_numpy(encoded), "int8").numpy()
    for store, shard in zip(stores, [s for s in plan.shards if s.table == 0], strict=True):
        store.write(rows + shard.local_start, values)
        first, last = shard.columns(plan.dim)
        np.testing.assert_array_equal(
            store.raw(rows + shard.local_start)[:, : last - first], want[:, first:last]
        )
    # the int8 slices hold the row's own codes, scale and bias: put side by side, the whole row
    left, right = (store.image(rows).parts[0][1] for store in stores)
    np.testing.assert_array_equal(np.concatenate([left[:, :3], right], axis=1), encoded)
    np.testing.assert_array_equal(left[:, 3:], encoded[:, plan.dim :])


def test_int4_tables_are_cut_at_even_columns() -> None:
    """An int4 slice is the row's packed bytes of its columns with the row's scale and bias; a cut
    inside a byte (an odd column) is refused, naming the table and columns."""
    source = ModelSource(preset="tiny", seed=2, row_dtype="int4")
    spec = model_spec(source)
    rows = spec.table_rows

    def plan(cut: int) -> ShardingPlan:
        left = [Shard(t, 0, rows[t], 0, sum(rows[:t]), col_start=0, col_end=cut) for t in range(4)]
        right = [Shard(t, 0, rows[t], 1, sum(rows[:t]), col_start=cut, col_end=8) for t in range(4)]
        return ShardingPlan(2, rows, spec.dim, (*left, *right))

    values = np.empty((rows[2], spec.dim), dtype=np.float32)
    load_weights(source).fill_rows(2, 0, values)
    stored = np.empty((rows[2], spec.dim // 2 + 4), dtype=np.uint8)
    stored_rows.encode(values, "int4", stored)
    want = stored_rows.decode(torch.from_numpy(stored), "int4").numpy()
    for server, (first, last) in enumerate([(0, 4), (4, 8)]):
        store = ShardStore(plan(4), server, load_weights(source), progress=False)
        local = np.arange(rows[2]) + sum(rows[:2])
        np.testing.assert_array_equal(store.raw(local), want[:, first:last])
    with pytest.raises(ValueError, match=r"table 0 is stored as int4 .* got \[0, 3\)"):
        ShardStore(plan(3), 0, load_weights(source), progress=False)
