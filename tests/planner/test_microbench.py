"""The calibration's microbenchmarks build what they claim to measure."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.config import ModelSource
from flexemr.planner.microbench import BenchSettings, _serving_request, measure_lookups
from flexemr.planner.placement import Strategy
from flexemr.sharding.plan import make_plan
from flexemr.sharding.router import RangeRouter


@pytest.mark.parametrize("strategy", ["row", "table"])
def test_serving_requests_reach_only_the_servers_and_tables_asked_for(strategy: Strategy) -> None:
    spec = ModelSource(preset="rmc1", row_scale=0.005).spec()
    plan = make_plan(strategy, spec.table_rows, spec.dim, 2)
    router = RangeRouter(plan)
    request = _serving_request(np.random.default_rng(0), plan, spec.num_dense, 16, 4, 1, 3)
    per_table = request.table_lengths().sum(axis=1)
    held = sorted({s.table for s in plan.shards if s.server == 0})
    assert np.flatnonzero(per_table).tolist() == held[:3] and set(per_table[held[:3]]) == {16 * 4}
    keys = router.keys(request.indices, per_table)
    assert [sub.server for sub in router.route(keys, request.lengths)] == [0]
    with pytest.raises(ValueError, match="fewer than"):
        _serving_request(np.random.default_rng(0), plan, spec.num_dense, 1, 1, 1, len(held) + 1)


def test_lookups_are_dearer_on_the_big_table_than_on_the_small_one() -> None:
    settings = BenchSettings(
        table_mib=64, small_table_mib=1, dims=(64,), pooling_factors=(1, 16), skews=(0.0, 1.05),
        lookups_per_run=40_000,
    )  # fmt: skip
    cost, points = measure_lookups(settings)
    assert {p["table_mib"] for p in points} == {64, 1}
    assert cost.table_bytes == 64 * 2**20 and cost.small_table_bytes == 2**20
    assert cost.size_exponent > 0  # rows from DRAM cost more than rows from the caches
    assert cost.seconds_per_bag(64, 16, 0.0) > cost.seconds_per_bag(64, 1, 0.0) > 0
