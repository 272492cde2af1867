"""The planner's SSD tier: servers that memory-map rows from local SSD, and memory per row format."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.model.rows import row_bytes
from flexemr.planner import (
    Deployment,
    PlanRequest,
    Traffic,
    default_calibration,
    load_catalog,
    place,
    plan,
    predict,
    search_disaggregated,
)
from flexemr.planner.inputs import model_from_dict
from flexemr.planner.page_cache import hit_ratio, zipf_share
from tests.planner.helpers import small_model

TYPES = ["r6i.large", "r6i.2xlarge", "r6i.4xlarge", "c6i.large", "c6i.xlarge", "i4i.large", "i4i.xlarge"]
HUGE = model_from_dict({"preset": "dlrm-v2"})  # ~97 GiB of fp32 rows
LIGHT = Traffic(20, samples_per_query=16, zipf_skew=1.2)


def test_page_cache_hits_grow_with_the_cache_and_the_skew() -> None:
    rows = np.array([1e8])
    assert zipf_share(np.array([1e8]), rows, 1.0)[0] == pytest.approx(1.0)
    assert zipf_share(np.array([0.0]), rows, 1.0)[0] == 0.0
    assert zipf_share(np.array([1e6]), rows, 0.0)[0] == pytest.approx(0.01)  # uniform: the share of rows
    held = np.array([[1_000_000, 3_000_000]])
    sizes = np.array([512, 128])
    bytes_held = float((held @ sizes)[0])
    assert (hit_ratio(held, sizes, bytes_held, 1.0) == 1.0).all()  # everything resident
    small, large = (hit_ratio(held, sizes, f * bytes_held, 1.0) for f in (0.05, 0.5))
    assert (small > 0).all() and (small < large).all() and (large < 1).all()
    assert (hit_ratio(held, sizes, 0.05 * bytes_held, 1.3) > small).all()


def test_a_loose_target_on_a_huge_model_picks_ssd_nodes_at_lower_cost() -> None:
    catalog, cal = load_catalog().subset(TYPES), default_calibration()
    request = PlanRequest(HUGE, LIGHT, p99_ms=300)
    result = plan(request, catalog, cal)
    dep = result.chosen.deployment
    assert dep.storage == "mmap" and dep.server_type.ssd_gib > 0
    dram_types = [t for t in TYPES if not t.startswith("i4i")]
    dram_only = search_disaggregated(request, catalog.subset(dram_types), cal)
    assert dep.cost_per_hour < dram_only.cost_per_hour
    assert dram_only.deployment.storage == "dram"
    assert predict(dep, HUGE, LIGHT, cal).meets(LIGHT.peak_qps, 300)
    # the rows do not fit the servers' DRAM: the page cache holds the hot ones
    assert dep.placement is not None
    assert float(dep.placement.server_bytes(HUGE).max()) > dep.server_type.memory_bytes
    assert result.to_dict()["embedding_servers"]["storage"] == "mmap"
    assert "--storage mmap" in result.describe()


def test_a_tight_target_keeps_rows_in_dram() -> None:
    catalog, cal = load_catalog().subset(TYPES), default_calibration()
    chosen = search_disaggregated(PlanRequest(HUGE, LIGHT, p99_ms=30), catalog, cal)
    assert chosen.deployment.storage == "dram"
    assert chosen.prediction.p99_ms <= 30
    # the cheaper SSD node of the loose plan misses this target: its page-cache misses wait on the SSD
    loose = search_disaggregated(PlanRequest(HUGE, LIGHT, p99_ms=300), catalog, cal)
    assert loose.cost_per_hour < chosen.cost_per_hour
    assert not predict(loose.deployment, HUGE, LIGHT, cal).meets(LIGHT.peak_qps, 30)


def test_mmap_needs_a_dedicated_server_with_local_ssd() -> None:
    catalog = load_catalog()
    placement = place(small_model(), 2, 1, "row")
    with pytest.raises(ValueError, match="local SSD"):
        Deployment(catalog.get("c6i.large"), 1, catalog.get("r6i.large"), placement, storage="mmap")
    ssd = catalog.get("i4i.large")
    with pytest.raises(ValueError, match="local SSD"):
        Deployment(ssd, 2, ssd, placement, hosting="colocated", storage="mmap")


def test_plans_account_memory_per_row_format() -> None:
    catalog, cal = load_catalog().subset(TYPES), default_calibration()
    traffic = Traffic(200, samples_per_query=32)
    costs, held = {}, {}
    for fmt in ("fp32", "fp16", "int8", "int4"):
        model = model_from_dict({"preset": "rmc1", "row_scale": 0.5, "row_dtype": fmt})
        result = plan(PlanRequest(model, traffic, p99_ms=50), catalog, cal)
        placement = result.chosen.deployment.placement
        assert placement is not None
        per_server = placement.server_bytes(model)
        dim = model.spec.dim
        np.testing.assert_array_equal(per_server, placement.rows_held.sum(axis=1) * row_bytes(fmt, dim))
        assert result.to_dict()["embedding_servers"]["max_row_bytes"] == per_server.max()
        assert f"server 0: {per_server[0] / 2**20:9.1f} MiB" in result.describe()  # the plan in this format
        held[fmt] = model.embedding_bytes
        costs[fmt] = result.chosen.cost_per_hour
    assert held["fp16"] * 2 == held["fp32"]
    assert held["int8"] * 4 * dim == held["fp32"] * (dim + 8)
    assert held["int4"] * 4 * dim == held["fp32"] * (dim // 2 + 4)  # packed values, fp16 scale and bias
    assert costs["int4"] <= costs["int8"] <= costs["fp16"] <= costs["fp32"]
