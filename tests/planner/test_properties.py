"""Every plan fits memory, keeps every row on k+1 servers, and meets its own predicted target."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.planner import PlanningError, default_calibration, place, predict, search_disaggregated
from flexemr.planner.perf_model import usable_memory
from tests.planner.helpers import request, small_catalog, small_model

tables = st.lists(st.integers(1, 5_000_000), min_size=1, max_size=6).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    rows=tables,
    servers=st.integers(1, 9),
    copies=st.integers(1, 3),
    strategy=st.sampled_from(["table", "row"]),
)
def test_placement_puts_every_row_on_k_plus_1_distinct_servers(
    rows: tuple[int, ...], servers: int, copies: int, strategy: str
) -> None:
    copies = min(copies, servers)
    model = small_model(rows)
    placement = place(model, servers, copies, strategy)  # type: ignore[arg-type]
    assert all(len(set(c.servers)) == copies for c in placement.chunks)
    plan = placement.to_sharding_plan(model)  # validates: every row on exactly `copies` servers
    assert plan.replicas == copies and plan.num_servers == servers


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=tables,
    qps=st.floats(50, 3000),
    p99_ms=st.floats(5, 60),
    k=st.integers(0, 2),
    j=st.integers(0, 2),
)
def test_every_plan_fits_replicates_and_meets_its_target(
    rows: tuple[int, ...], qps: float, p99_ms: float, k: int, j: int
) -> None:
    req, calibration = request(qps, p99_ms, k, j, rows=rows), default_calibration()
    try:
        found = search_disaggregated(req, small_catalog(), calibration)
    except PlanningError:
        return
    dep, pred = found.deployment, found.prediction
    assert dep.placement is not None
    assert dep.placement.server_bytes(req.model).max() <= usable_memory(dep.server_type)
    plan = dep.placement.to_sharding_plan(req.model)
    assert plan.replicas == k + 1
    for chunk in dep.placement.chunks:
        assert len(set(chunk.servers)) >= k + 1
    assert dep.rankers >= j + 1
    assert pred.memory_ok and pred.max_qps_degraded >= qps
    assert pred.p99_ms <= p99_ms and pred.p99_ms_degraded <= p99_ms
    assert predict(dep, req.model, req.traffic, calibration).meets(qps, p99_ms)  # not just the search's word
