from __future__ import annotations

import math

import pytest

from flexemr.planner import Deployment, Traffic, default_calibration, place, predict
from flexemr.planner.calibration import LookupCost
from flexemr.planner.perf_model import QueryWork, erlang_c, mgc_quantile
from tests.planner.helpers import small_catalog, small_model


def test_erlang_c_single_server_waits_with_probability_rho() -> None:
    assert erlang_c(1, 0.7) == pytest.approx(0.7)
    assert erlang_c(4, 0.1) < 0.01


def test_quantile_grows_with_load_and_saturates() -> None:
    low = mgc_quantile(100, 1e-3, 2, 0.3, 0.99)
    high = mgc_quantile(1900, 1e-3, 2, 0.3, 0.99)
    assert 1e-3 <= low < high
    assert math.isinf(mgc_quantile(2000, 1e-3, 2, 0.3, 0.99))


def test_partial_pooling_sends_fewer_bytes_and_more_servers_raise_throughput() -> None:
    catalog, model, cal = small_catalog(), small_model(), default_calibration()
    traffic = Traffic(500, samples_per_query=32)
    server, ranker = catalog.get("r6i.2xlarge"), catalog.get("c6i.2xlarge")

    def deployment(n: int, partial: bool) -> Deployment:
        # Enough rankers that the servers, not the ranker's per-server handling, set the capacity.
        return Deployment(ranker, 16, server, place(model, n, 1, "row"), partial_pooling=partial)

    raw = predict(deployment(2, False), model, traffic, cal)
    partial = predict(deployment(2, True), model, traffic, cal)
    assert partial.max_qps > raw.max_qps
    assert predict(deployment(4, True), model, traffic, cal).max_qps >= partial.max_qps
    assert (
        partial.p99_ms < predict(deployment(2, True), model, traffic, cal, qps=0.95 * partial.max_qps).p99_ms
    )


def test_degraded_cluster_is_slower() -> None:
    catalog, model, cal = small_catalog(), small_model(), default_calibration()
    server, ranker = catalog.get("r6i.2xlarge"), catalog.get("c6i.2xlarge")
    dep = Deployment(ranker, 3, server, place(model, 4, 2, "table"), ranker_failures=1, server_failures=1)
    pred = predict(dep, model, Traffic(400, samples_per_query=32), cal)
    assert pred.max_qps_degraded < pred.max_qps


def test_the_ranker_routes_whole_tables_per_table_and_split_ones_per_key() -> None:
    cal = default_calibration()
    model = small_model(rows=(50_000,) * 8)
    work = QueryWork.of(model, Traffic(100, samples_per_query=64), cal)
    assert not place(model, 4, 1, "table").splits_tables
    assert place(model, 4, 1, "row").splits_tables
    assert place(model, 1, 1, "row").splits_tables is False  # one server holds every table whole
    assert place(small_model(), 4, 1, "table").splits_tables  # its biggest table is cut
    serving = cal.serving
    assert work.handling_s(4, True) - work.handling_s(4, False) == pytest.approx(
        work.lookups * serving.ranker_routed_key_s - model.spec.num_tables * serving.ranker_table_s
    )


def test_lookups_cost_less_on_tables_that_fit_in_the_caches() -> None:
    cost = LookupCost(table_bytes=512 * 2**20, small_table_bytes=4 * 2**20, size_exponent=0.4)
    assert cost.size_factor(512 * 2**20) == 1.0
    assert cost.size_factor(64 * 2**30) == 1.0  # beyond the measured table: DRAM-bound alike
    assert cost.size_factor(1024) == cost.size_factor(4 * 2**20) == pytest.approx(2**-2.8)
    assert cost.size_factor(8 * 2**20) < cost.size_factor(128 * 2**20) < 1.0
