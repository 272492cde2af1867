"""Row formats: fp16 and int8 rows served by real servers score exactly as the monolithic model
holding the same stored rows, and take half and about a quarter of the fp32 memory (int4 rows:
`test_int4_rows.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.storage import DramStorage
from flexemr.embedding_server.store import ShardStore
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_kernels_pool_the_decoded_rows(fmt: stored_rows.RowFormat) -> None:
    values = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    dtype, width = stored_rows.storage(fmt, 8)
    table = np.empty((50, width), dtype=dtype)
    stored_rows.encode(values, fmt, table)
    halves = np.empty_like(table)
    stored_rows.encode(values[:20], fmt, halves[:20])
    stored_rows.encode(values[20:], fmt, halves[20:])
    assert table.tobytes() == halves.tobytes()  # chunking never changes the stored bytes
    decoded = stored_rows.decode(torch.from_numpy(table), fmt)
    error = float((decoded - torch.from_numpy(values)).abs().max())
    assert 0 < error < {"fp16": 0.002, "int8": 0.02, "int4": 0.5}[fmt]
    index = torch.tensor([3, 4, 9, 49, 0, 0])
    offsets = torch.tensor([0, 2, 2, 5])
    weights = torch.rand(6)
    got = stored_rows.pool(torch.from_numpy(table), fmt, index, offsets, weights)
    want = torch.nn.functional.embedding_bag(index, decoded, offsets, mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_formats_on_one_server_pool_per_format() -> None:
    source = load_weights(ModelSource(preset="tiny", seed=3, row_dtype="int8,fp32,fp16,int8"))
    spec = source.spec
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    store = ShardStore(plan, 1, source, progress=False, storage=DramStorage())
    assert [s.fmt for s in store.segments] == ["int8", "fp32", "fp16"]
    fp32 = spec.with_overrides(row_formats=())
    assert store.nbytes < sum(s.rows for s in plan.shards_of(1)) * spec.dim * 4 * 0.6
    # a bag mixing tables of different formats is refused, not pooled wrongly
    t0, t1 = sorted(plan.shards_of(1), key=lambda s: s.table)[:2]
    mixed = np.array([t0.local_start, t1.local_start], dtype=np.int64)
    with pytest.raises(ValueError, match="mixes rows"):
        store.pooled(mixed, np.array([0], dtype=np.int64))
    assert fp32.embedding_bytes > spec.embedding_bytes


@pytest.mark.parametrize("row_dtype", ["fp16", "int8", "int8,fp16,fp32,int8"])
def test_served_scores_equal_same_format_monolithic(row_dtype: str) -> None:
    source = ModelSource(preset="tiny", seed=5, row_dtype=row_dtype, pooling="mean")
    spec = model_spec(source)
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    monolithic = build_monolithic(load_weights(source))
    fp32 = build_monolithic(load_weights(dataclasses.replace(source, row_dtype=None)))
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(), Endpoint()))) as cluster:
        for ranker_config in (
            RankerConfig(),
            RankerConfig(lookup="raw", cache=CacheMode.parse("fixed:64KiB")),
        ):
            ranker = build_ranker(dataclasses.replace(cluster.spec, ranker=ranker_config))
            try:
                for seed, batch in enumerate([1, 7, 64, 64]):  # the repeat hits the cache
                    dense, indices, lengths = random_batch(
                        spec, batch, seed % 3, empty_tables=(1,) * (seed % 2)
                    )
                    got = ranker.score(dense, indices, lengths)
                    want = reference_scores(monolithic, dense, indices, lengths)
                    np.testing.assert_allclose(got, want, atol=1e-5)
                    drift = np.abs(reference_scores(fp32, dense, indices, lengths) - want).max()
                    assert drift > 0  # the stored rows really differ from fp32
            finally:
                ranker.close()


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_fp16_and_int8_servers_use_half_and_a_quarter_of_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed mmap threshold: freed load buffers go back to the kernel instead of staying in the heap.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    source = ModelSource(preset="rmc1", row_scale=0.25, row_dtype="fp32,fp16,int8,int8,int8,int8,int8,int8")
    spec = model_spec(source)
    rows = spec.table_rows[0]
    shards = [Shard(t, 0, rows, min(t, 2), rows * max(t - 2, 0)) for t in range(spec.num_tables)]
    plan = ShardingPlan(3, spec.table_rows, spec.dim, tuple(shards))
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(),) * 3)) as cluster:
        rss32, rss16, rss8 = (_rss_anon(pid) for pid in cluster.pids)
    fp32_bytes = rows * spec.dim * 4
    int8_bytes_per_table = rows * (spec.dim + 8)
    assert abs((rss32 - rss16) - fp32_bytes / 2) < 0.1 * fp32_bytes, (rss32, rss16)
    # server 2 holds six int8 tables: per table, its memory over server 1's fp16 table
    per_table = (rss8 - rss16 + fp32_bytes / 2) / 6
    assert abs(per_table - int8_bytes_per_table) < 0.1 * fp32_bytes, (rss8, int8_bytes_per_table)
    assert int8_bytes_per_table / fp32_bytes == pytest.approx(40 / 128)


def test_store_bytes_per_format() -> None:
    nbytes = {}
    for fmt in ("fp32", "fp16", "int8", "int4"):
        source = load_weights(ModelSource(preset="tiny", row_dtype=fmt))
        plan = make_plan("table", source.spec.table_rows, source.spec.dim, 1)
        nbytes[fmt] = ShardStore(plan, 0, source, progress=False, storage=DramStorage()).nbytes
        assert nbytes[fmt] == source.spec.embedding_bytes
    rows, dim = sum(source.spec.table_rows), source.spec.dim
    assert nbytes == {
        "fp32": rows * dim * 4,
        "fp16": rows * dim * 2,
        "int8": rows * (dim + 8),
        "int4": rows * (dim // 2 + 4),
    }
