from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from flexemr.config.plan import Shard, ShardingPlan
from flexemr.model.presets import preset
from flexemr.sharding.plan import make_plan, row_wise, table_wise, with_local_offsets
from flexemr.sharding.router import RangeRouter


@pytest.mark.parametrize("strategy", ["table", "row"])
@pytest.mark.parametrize("servers", [1, 2, 3, 4])
def test_plans_cover_every_row_once_and_round_trip(strategy: str, servers: int) -> None:
    spec = preset("tiny")
    plan = make_plan(strategy, spec.table_rows, spec.dim, servers)  # type: ignore[arg-type]
    assert ShardingPlan.from_dict(json.loads(plan.to_json())) == plan
    for t, rows in enumerate(spec.table_rows):
        assert sum(s.rows for s in plan.shards if s.table == t) == rows
    assert sum(plan.server_rows(s) for s in range(servers)) == sum(spec.table_rows)


def test_row_wise_balances_bytes() -> None:
    plan = row_wise((1000, 3000, 500), 16, 4)
    sizes = plan.server_bytes()
    assert max(sizes) - min(sizes) <= 3 * 16 * 4  # at most one row per table apart


def test_table_wise_keeps_tables_whole() -> None:
    plan = table_wise((1000, 3000, 500, 200), 16, 2)
    assert all(s.row_start == 0 for s in plan.shards)
    assert len(plan.shards) == 4


def test_auto_keeps_tables_whole_only_when_that_balances_bytes() -> None:
    assert make_plan("auto", (100,) * 8, 4, 2).strategy == "table"
    assert make_plan("auto", (1000, 10, 10, 10), 4, 2).strategy == "row"  # one table dwarfs the rest


def test_plan_rejects_gaps_too_few_copies_and_copies_on_one_server() -> None:
    with pytest.raises(ValueError, match=r"rows \[5, 10\) are on no server"):
        ShardingPlan(1, (10,), 4, (Shard(0, 0, 5, 0),))
    with pytest.raises(ValueError, match=r"rows \[0, 5\) are on 1 server\(s\), fewer than replicas=2"):
        ShardingPlan(2, (10,), 4, (Shard(0, 0, 10, 0), Shard(0, 5, 10, 1)), replicas=2)
    with pytest.raises(ValueError, match=r"server 0 holds table 0 rows \[5, 10\) twice"):
        ShardingPlan(2, (10,), 4, (Shard(0, 0, 10, 0), Shard(0, 5, 10, 0, local_start=10)))
    # more copies of some rows than `replicas` (a hot range) is a valid plan
    hot = ShardingPlan(2, (10,), 4, (Shard(0, 0, 10, 0), Shard(0, 5, 10, 1)))
    assert hot.copies(0) == [(0, 5, 1), (5, 10, 2)]


def mixed(table_rows: tuple[int, ...], dim: int, num_servers: int) -> ShardingPlan:
    """Table 0 split over two servers, the others whole, round robin (both routing paths)."""
    half = table_rows[0] // 2
    shards = [Shard(0, 0, half, 0), Shard(0, half, table_rows[0], 1)]
    shards += [Shard(t, 0, rows, t % num_servers) for t, rows in enumerate(table_rows) if t > 0]
    return ShardingPlan(num_servers, table_rows, dim, with_local_offsets(shards))


@pytest.mark.parametrize("split", [row_wise, table_wise, mixed])
def test_router_sends_every_index_to_the_server_holding_it(split: Callable[..., ShardingPlan]) -> None:
    spec = preset("tiny")
    plan = split(spec.table_rows, spec.dim, 3)
    router = RangeRouter(plan)
    rng = np.random.default_rng(0)
    tables = np.sort(rng.integers(0, spec.num_tables, 500))
    rows = np.array([rng.integers(0, spec.table_rows[t]) for t in tables], dtype=np.int64)
    bag_ids = tables * 7 + rng.integers(0, 7, 500)
    order = np.argsort(bag_ids, kind="stable")
    tables, rows, bag_ids = tables[order], rows[order], bag_ids[order]
    keys = router.keys(rows, np.bincount(tables, minlength=spec.num_tables))
    subs = list(router.route(keys, np.bincount(bag_ids, minlength=spec.num_tables * 7)))
    seen = 0
    for sub in subs:
        shards = plan.shards_of(sub.server)
        owners = {
            (s.table, r): s.local_start + r - s.row_start
            for s in shards
            for r in range(s.row_start, s.row_end)
        }
        picked = np.isin(
            np.arange(len(rows)),
            np.flatnonzero([owners.get((t, r)) is not None for t, r in zip(tables, rows, strict=True)]),
        )
        expected_local = [owners[(t, r)] for t, r in zip(tables[picked], rows[picked], strict=True)]
        assert sub.rows.tolist() == expected_local
        assert sub.rows.dtype == sub.offsets.dtype == np.int32  # half the bytes of int64 on the wire
        assert sub.row_bags().tolist() == bag_ids[picked].tolist()
        assert np.all(np.diff(sub.bags) > 0)
        seen += sub.rows.size
    assert seen == len(rows)


@pytest.mark.parametrize("rows", [(380,), (3, 1, 100_000, 7, 2**24), (10**9, 5, 5, 5, 5, 10**8)])
@pytest.mark.parametrize("strategy", ["table", "row"])
def test_bucketed_shard_lookup_equals_binary_search(rows: tuple[int, ...], strategy: str) -> None:
    router = RangeRouter(make_plan(strategy, rows, 4, 4))  # the last rows use the search fallback
    starts = router._starts
    keys = np.concatenate(
        [np.random.default_rng(0).integers(0, sum(rows), 50_000), starts, starts[1:] - 1, [sum(rows) - 1]]
    )
    np.testing.assert_array_equal(router.shards(keys), np.searchsorted(starts, keys, side="right") - 1)


def test_router_sends_int64_rows_to_a_server_past_int32() -> None:
    plan = table_wise((10, 2**31 + 10), 4, 2)
    router = RangeRouter(plan)
    keys = router.keys(np.array([3, 2**31 + 5], np.int64), np.array([1, 1]))
    subs = {sub.server: sub for sub in router.route(keys, np.array([1, 1]))}
    big = plan.shards_of(1)[0].table == 1
    assert subs[1 if big else 0].rows.tolist() == [2**31 + 5]
    assert subs[1 if big else 0].rows.dtype == subs[1 if big else 0].offsets.dtype == np.int64
    assert subs[0 if big else 1].rows.dtype == np.int32


def test_router_skips_servers_with_nothing_to_do() -> None:
    plan = table_wise((100, 100), 4, 2)
    router = RangeRouter(plan)
    table_of_server0 = next(s.table for s in plan.shards if s.server == 0)
    tables = np.full(5, table_of_server0)
    keys = router.keys(np.arange(5, dtype=np.int64), np.bincount(tables, minlength=2))
    subs = list(router.route(keys, np.ones(5, dtype=np.int64)))
    assert [s.server for s in subs] == [0]
