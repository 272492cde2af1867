from __future__ import annotations

import pytest

from flexemr.planner import (
    PlanningError,
    default_calibration,
    exhaustive_search,
    predict,
    scale_out,
    scale_up,
    search_disaggregated,
)
from tests.planner.helpers import request, small_catalog


@pytest.mark.parametrize(
    ("qps", "p99_ms", "k", "j"),
    [(800, 20.0, 1, 0), (1500, 12.0, 0, 1), (400, 30.0, 1, 1), (20000, 10.0, 1, 0)],
)
def test_fast_search_is_within_5_percent_of_exhaustive(qps: float, p99_ms: float, k: int, j: int) -> None:
    req, catalog, cal = request(qps, p99_ms, k, j), small_catalog(), default_calibration()
    fast = search_disaggregated(req, catalog, cal)
    best = exhaustive_search(req, catalog, cal, max_rankers=8, max_servers=5)
    assert best is not None, "the instance should be feasible within the exhaustive bounds"
    assert fast.cost_per_hour <= 1.05 * best.cost_per_hour
    assert fast.prediction.meets(qps, p99_ms)


def test_plan_prediction_matches_predict() -> None:
    req, catalog, cal = request(), small_catalog(), default_calibration()
    found = search_disaggregated(req, catalog, cal)
    assert predict(found.deployment, req.model, req.traffic, cal) == found.prediction


def test_monolithic_baselines_are_feasible_and_priced() -> None:
    req, catalog, cal = request(), small_catalog(), default_calibration()
    up, out = scale_up(req, catalog, cal), scale_out(req, catalog, cal)
    assert not isinstance(up, str) and not isinstance(out, str)
    assert up.prediction.meets(req.traffic.peak_qps, req.p99_ms)
    assert out.deployment.placement is not None and out.deployment.placement.replicas == 2


def test_scale_up_says_why_when_model_fits_no_node() -> None:
    req = request(rows=(600_000_000,))
    assert "holds the whole model" in str(scale_up(req, small_catalog(), default_calibration()))


def test_impossible_latency_explains_the_floor() -> None:
    with pytest.raises(PlanningError) as info:
        search_disaggregated(request(p99_ms=0.05), small_catalog(), default_calibration())
    assert "latency floor" in str(info.value) and "raise --p99-ms" in str(info.value)
