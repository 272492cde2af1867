"""Column-wise sharding (CW, TWCW, CW+RW): plans, routing, and exact scores over real processes.

A table split by column is served as column blocks, each pooled by the servers that hold it and
put side by side by the ranker. For every row format the pooled embeddings are bit for bit those of
the whole table on one server (a column's sum does not depend on which other columns sit beside
it), and the scores are the monolithic model's."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from flexemr.batch import SparseBatch
from flexemr.cli.main import main
from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.ray_resources import replica_groups
from flexemr.entrypoints.roles import build_ranker, version_spec
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_dense, build_monolithic
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import ShardingConfig, make_plan, replicated
from flexemr.sharding.router import RangeRouter
from flexemr.transport.local import LocalTransport
from tests.core.helpers import assert_scores_like_the_monolith, random_batch, wait_for_cached_rows

FORMATS = ["fp32", "fp16", "int8", "int4", "int8,fp32,fp16,int4"]
LAYOUTS = [
    # (strategy, servers, column shards): CW (one block per server), TWCW (3 uneven blocks, widths
    # 2, 4 and 2, of 4 tables over 3 servers: several widths and formats on one server), CW+RW (2
    # groups of 2, and uneven groups of 2 and 1)
    ("column", 2, 2),
    ("column", 3, 3),
    ("column-row", 4, 2),
    ("column-row", 3, 2),
]


def covered(plan: ShardingPlan) -> np.ndarray:
    """How many shards hold each (row, column) of each table: [tables][rows, dim]."""
    counts = [np.zeros((rows, plan.dim), dtype=np.int64) for rows in plan.table_rows]
    for s in plan.shards:
        first, last = s.columns(plan.dim)
        counts[s.table][s.row_start : s.row_end, first:last] += 1
    return counts  # type: ignore[return-value]


@pytest.mark.parametrize(("strategy", "servers", "blocks"), LAYOUTS)
@pytest.mark.parametrize("replicas", [1, 2])
def test_column_plans_hold_every_row_and_column_replicas_times(
    strategy: str, servers: int, blocks: int, replicas: int
) -> None:
    spec = model_spec(ModelSource(preset="tiny"))
    config = ShardingConfig(servers, strategy, replicas, column_shards=blocks)  # type: ignore[arg-type]
    plan = config.plan(spec.table_rows, spec.dim)
    assert plan.num_servers == servers * replicas
    assert all((c == replicas).all() for c in covered(plan))
    widths = {s.columns(plan.dim)[1] - s.columns(plan.dim)[0] for s in plan.shards}
    assert max(widths) < plan.dim  # every table is split by column
    assert len(RangeRouter(plan).block_columns) == spec.num_tables * blocks
    # the plan file round-trips, and the bytes counted are the slices'
    assert ShardingPlan.from_dict(json.loads(plan.to_json())) == plan
    assert sum(plan.server_bytes()) == replicas * 4 * spec.dim * sum(spec.table_rows)
    # copies of a server's shards, not the other column blocks of its rows, are its replicas
    assert sorted(map(sorted, replica_groups(plan))) == [
        [s, s + servers] if replicas == 2 else [s] for s in range(servers)
    ]
    if strategy == "column-row":  # a bag goes to one server per block
        for t in range(spec.num_tables):
            per_block = {s.col_start for s in plan.shards if s.table == t and s.server < servers}
            assert len(per_block) == blocks


def test_an_old_plan_file_loads_as_whole_width_shards() -> None:
    old = {
        "num_servers": 2,
        "table_rows": [10, 20],
        "dim": 8,
        "shards": [
            {"table": 0, "row_start": 0, "row_end": 10, "server": 0, "local_start": 0},
            {"table": 1, "row_start": 0, "row_end": 20, "server": 1, "local_start": 0},
        ],
        "strategy": "table",
    }
    plan = ShardingPlan.from_dict(old)
    assert [s.columns(8) for s in plan.shards] == [(0, 8), (0, 8)]
    assert not RangeRouter(plan).split
    assert plan.server_width(0) == 8


def test_plans_that_miss_or_straddle_columns_are_refused() -> None:
    whole = Shard(1, 0, 20, 1)
    left = Shard(0, 0, 10, 0, col_start=0, col_end=4)
    right = Shard(0, 0, 10, 1, local_start=20, col_start=4, col_end=8)
    ShardingPlan(2, (10, 20), 8, (left, right, whole))
    with pytest.raises(ValueError, match=r"table 0 columns \[4, 8\): rows \[0, 10\) are on no server"):
        ShardingPlan(2, (10, 20), 8, (left, whole))
    half = dataclasses.replace(right, row_end=5)
    with pytest.raises(ValueError, match=r"table 0 columns \[4, 8\): rows \[5, 10\) are on no server"):
        ShardingPlan(2, (10, 20), 8, (left, half, whole))
    across = Shard(0, 0, 10, 1, local_start=20, col_start=2, col_end=8)
    with pytest.raises(
        ValueError, match=r"columns \[\d, \d\) across the cut at column \d another shard makes"
    ):
        ShardingPlan(2, (10, 20), 8, (left, across, whole))
    with pytest.raises(ValueError, match=r"shard columns \[4, 9\) outside \[0, 8\)"):
        ShardingPlan(2, (10, 20), 8, (left, dataclasses.replace(right, col_end=9), whole))
    with pytest.raises(ValueError, match="at least 3 servers"):
        make_plan("column-row", (10, 20), 8, 2, column_shards=3)
    with pytest.raises(ValueError, match="column shards must be between 1 and 4 for dim 8"):
        make_plan("column", (10, 20), 8, 2, column_shards=5)


def test_flexemr_shard_prints_a_column_plan(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--preset", "tiny", "--embedding-servers", "2", "--sharding", "column", "--column-shards", "2"]
    assert main(["shard", *args]) == 0
    text = capsys.readouterr().out
    assert "column-wise plan" in text
    assert "t0[0:100, 0:4]" in text and "t0[0:100, 4:8]" in text


@pytest.mark.parametrize("row_dtype", FORMATS)
@pytest.mark.parametrize(("strategy", "servers", "blocks"), LAYOUTS)
def test_pooled_slices_are_bit_for_bit_the_whole_rows(
    row_dtype: str, strategy: str, servers: int, blocks: int
) -> None:
    """In-process stores: each column block pooled by the column-sharded ranker is bit for bit
    those columns pooled from whole rows split the same way by row (a block over g servers: a
    row-wise plan over g), partial sums and raw rows, bags of up to 30 rows."""
    source = ModelSource(preset="tiny", seed=5, row_dtype=row_dtype)
    spec, weights = model_spec(source), load_weights(source)
    plan = make_plan(strategy, spec.table_rows, spec.dim, servers, blocks)  # type: ignore[arg-type]
    for lookup in ("partial", "raw"):
        config = RankerConfig(lookup=lookup)  # type: ignore[arg-type]

        def ranker(plan: ShardingPlan) -> Ranker:
            return Ranker(spec, plan, build_dense(weights), LocalTransport(plan, weights), config)  # noqa: B023

        split = ranker(plan)
        try:
            for first, last in {s.columns(plan.dim) for s in plan.shards}:
                group = len({s.server for s in plan.shards if s.col_start == first and s.table == 0})
                whole = ranker(make_plan("row", spec.table_rows, spec.dim, group))
                for seed in range(3):
                    batch = SparseBatch(*random_batch(spec, 64, seed, max_bag=30, empty_tables=(seed,)))
                    got, want = split.pool(batch), whole.pool(batch)
                    assert torch.equal(got[..., first:last], want[..., first:last])
                whole.close()
        finally:
            split.close()


def test_routing_a_batch_costs_one_slice_per_column_block() -> None:
    """Each key of a split table goes once to each of its blocks; the bags keep their batch ids."""
    spec = model_spec(ModelSource(preset="tiny"))
    plan = make_plan("column-row", spec.table_rows, spec.dim, 4, 2)
    router = RangeRouter(plan)
    _, indices, lengths = random_batch(spec, 32, 1)
    keys = router.keys(indices, lengths.reshape(spec.num_tables, -1).sum(axis=1))
    subs = list(router.route(keys, lengths))
    assert sum(s.rows.size for s in subs) == 2 * keys.size
    for sub in subs:
        assert sub.blocks is not None and (np.diff(sub.blocks) >= 0).all()
        mine = [router.block_columns[b].tolist() for b in np.unique(sub.blocks)]
        held = [list(s.columns(plan.dim)) for s in plan.shards_of(sub.server)]
        assert all(m in held for m in mine)
        assert set(router.cache_keys(sub).tolist()) <= set(keys.tolist())


# Every layout with tables of every format (each server holds slices of int8, fp32 and fp16 tables),
# and one layout with int8 tables only (one segment per server); the in-process test above covers
# every (layout, format) pair.
CLUSTERS = [(layout, FORMATS[-1]) for layout in LAYOUTS] + [(LAYOUTS[2], "int8")]


@pytest.fixture(scope="module", params=CLUSTERS, ids=str)
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterSpec]:
    (strategy, servers, blocks), row_dtype = request.param
    source = ModelSource(preset="tiny", seed=7, row_dtype=row_dtype)
    spec = model_spec(source)
    plan = make_plan(strategy, spec.table_rows, spec.dim, servers, blocks)
    with LocalCluster(ClusterSpec(source, plan, tuple(Endpoint() for _ in range(servers)))) as local:
        yield local.spec


@pytest.mark.slow
def test_column_sharded_scores_equal_the_monolith(cluster: ClusterSpec) -> None:
    """Every row format, sum and mean pooling, partial sums and raw rows, with and without a cache
    of whole rows: the served scores are the monolithic model's."""
    for pooling in ("sum", "mean"):
        source = dataclasses.replace(cluster.model, pooling=pooling)
        monolithic = build_monolithic(load_weights(source))
        for lookup, cache in [
            ("partial", "off"),
            ("raw", "off"),
            ("raw", "fixed:4KiB"),
            ("partial", "fixed:4KiB"),
        ]:
            config = RankerConfig(lookup=lookup, cache=CacheMode.parse(cache))  # type: ignore[arg-type]
            ranker = build_ranker(dataclasses.replace(cluster, model=source, ranker=config))
            try:
                assert_scores_like_the_monolith(ranker.score, monolithic, seeds=2)
                if cache != "off":
                    wait_for_cached_rows(ranker.stats)  # the warmer fills it with whole rows
                    assert_scores_like_the_monolith(ranker.score, monolithic, seeds=2)
                    assert ranker.stats()["cache"]["hits"] > 0
            finally:
                ranker.close()


def test_a_model_of_other_shapes_gets_the_same_column_strategy() -> None:
    """A model switch to tables of other shapes remakes a column plan with as many column shards."""
    old, new = ModelSource(preset="rmc1", row_scale=0.001), ModelSource(preset="rmc1", row_scale=0.01)
    spec = model_spec(old)
    plan = replicated(make_plan("column-row", spec.table_rows, spec.dim, 3, column_shards=3), 2)
    remade = version_spec(ClusterSpec(old, plan, tuple(Endpoint() for _ in range(6))), new).sharding
    assert remade.table_rows == model_spec(new).table_rows != plan.table_rows
    assert (remade.strategy, remade.num_servers, remade.replicas) == ("column-row", 6, 2)
    assert {s.columns(remade.dim) for s in remade.shards} == {s.columns(plan.dim) for s in plan.shards}
