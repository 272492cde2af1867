"""The calibration's microbenchmarks build what they claim to measure."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from flexemr.calibrate.microbench import BenchSettings, _serving_request, fit_lookups, measure_lookups
from flexemr.config.model import ModelSource
from flexemr.model.source import model_spec
from flexemr.planner import ModelProfile, place
from flexemr.planner.calibration import LookupCost
from flexemr.planner.placement import Strategy
from flexemr.sharding.router import RangeRouter


@pytest.mark.parametrize("strategy", ["row", "table"])
def test_serving_requests_reach_only_the_servers_and_tables_asked_for(strategy: Strategy) -> None:
    spec = model_spec(ModelSource(preset="rmc1", row_scale=0.005))
    plan = place(ModelProfile(spec), 2, 1, strategy).to_sharding_plan(ModelProfile(spec))  # as calibrated
    router = RangeRouter(plan)
    request = _serving_request(np.random.default_rng(0), plan, spec.num_dense, 16, 4, 1, 3)
    per_table = request.table_lengths().sum(axis=1)
    held = sorted({s.table for s in plan.shards if s.server == 0})
    assert np.flatnonzero(per_table).tolist() == held[:3] and set(per_table[held[:3]]) == {16 * 4}
    keys = router.keys(request.indices, per_table)
    assert [sub.server for sub in router.route(keys, request.lengths)] == [0]
    with pytest.raises(ValueError, match="fewer than"):
        _serving_request(np.random.default_rng(0), plan, spec.num_dense, 1, 1, 1, len(held) + 1)


def test_the_lookup_grid_measures_both_tables_point_for_point() -> None:
    settings = BenchSettings(
        table_mib=8, small_table_mib=1, dims=(16,), pooling_factors=(1, 4), skews=(0.0, 1.05),
        lookups_per_run=2_000,
    )  # fmt: skip
    cost, points = measure_lookups(settings)
    assert [(p["table_mib"], p["pooling"], p["skew"]) for p in points] == [
        (mib, pooling, skew) for mib in (8, 1) for skew in (0.0, 1.05) for pooling in (1, 4)
    ]
    assert all(p["seconds_per_bag"] > 0 for p in points)
    assert cost.table_bytes == 8 * 2**20 and cost.small_table_bytes == 2**20


def _grid(table_mib: int, seconds_per_bag: Callable[[int, int, float], float]) -> list[dict[str, float]]:
    return [
        {"table_mib": table_mib, "dim": dim, "pooling": pooling, "skew": skew,
         "seconds_per_bag": seconds_per_bag(dim, pooling, skew)}
        for dim in (16, 64) for skew in (0.0, 1.05) for pooling in (1, 8, 32)
    ]  # fmt: skip


def test_the_lookup_fit_recovers_the_costs_it_was_given() -> None:
    """The fit, on timings made from a known cost (deterministic, unlike timing on a busy machine):
    lookups dearer on the big table than on the small one, skew cheaper, costs recovered."""
    truth = LookupCost(bag_s=2e-7, row_s=1e-8, element_s=5e-10, skew_gain=0.5)
    big = _grid(64, truth.seconds_per_bag)
    small = _grid(1, lambda dim, pooling, skew: truth.seconds_per_bag(dim, pooling, skew) / 4)
    cost = fit_lookups(big, small)
    assert cost.table_bytes == 64 * 2**20 and cost.small_table_bytes == 2**20
    assert cost.size_exponent == pytest.approx(np.log(4) / np.log(64))  # rows from DRAM cost more
    assert (cost.bag_s, cost.row_s, cost.element_s) == pytest.approx((2e-7, 1e-8, 5e-10), rel=1e-6)
    assert cost.skew_gain == pytest.approx(0.5)
    assert cost.seconds_per_bag(64, 16, 0.0) > cost.seconds_per_bag(64, 1, 0.0) > 0
