"""Provisioning planner (DisaggRec): the cheapest cluster meeting a p99 target and an availability goal.

inputs       model, traffic, availability, the request (validated, from JSON files)
catalog      node types and prices (default: AWS us-east-1 on-demand list prices)
calibration  the cost model's constants, and their file (`flexemr.calibrate` measures them)
placement    table-/row-wise chunks with k+1 copies, balanced by load and bytes
perf_model   throughput and p99 of a deployment (M/G/c queues, fan-out, network), however hosted
page_cache   the SSD tier: which lookups an mmap server finds in its page cache
search       the fast search, the exhaustive reference, monolithic baselines
report       the result as text and JSON; `load_sharding`
"""

from __future__ import annotations

from flexemr.planner.calibration import Calibration, default_calibration, load_calibration
from flexemr.planner.catalog import Catalog, NodeType, load_catalog
from flexemr.planner.inputs import Availability, InputError, ModelProfile, PlanRequest, Traffic
from flexemr.planner.perf_model import Deployment, Prediction, predict
from flexemr.planner.placement import Placement, place
from flexemr.planner.report import PlanResult, load_sharding
from flexemr.planner.search import (
    PlanningError,
    exhaustive_search,
    scale_out,
    scale_up,
    search_disaggregated,
)


def plan(request: PlanRequest, catalog: Catalog, calibration: Calibration) -> PlanResult:
    """Plan `request`: the cheapest disaggregated deployment and the monolithic alternatives."""
    return PlanResult(
        request=request,
        chosen=search_disaggregated(request, catalog, calibration),
        scale_up=scale_up(request, catalog, calibration),
        scale_out=scale_out(request, catalog, calibration),
        calibration=calibration,
        catalog=catalog,
    )


__all__ = [
    "Availability",
    "Calibration",
    "Catalog",
    "Deployment",
    "InputError",
    "ModelProfile",
    "NodeType",
    "Placement",
    "PlanRequest",
    "PlanResult",
    "PlanningError",
    "Prediction",
    "Traffic",
    "default_calibration",
    "exhaustive_search",
    "load_calibration",
    "load_catalog",
    "load_sharding",
    "place",
    "plan",
    "predict",
    "scale_out",
    "scale_up",
    "search_disaggregated",
]
