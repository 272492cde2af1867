"""Small factories for planner tests."""

from __future__ import annotations

from flexemr.model.spec import ModelSpec
from flexemr.planner import Availability, Catalog, ModelProfile, PlanRequest, Traffic, load_catalog

SMALL_TYPES = ["r6i.large", "r6i.2xlarge", "c6i.large", "c6i.2xlarge"]


def small_catalog() -> Catalog:
    return load_catalog().subset(SMALL_TYPES)


def small_model(
    rows: tuple[int, ...] = (3_000_000, 1_000_000, 200_000, 5_000), dim: int = 32
) -> ModelProfile:
    spec = ModelSpec(
        table_rows=rows,
        dim=dim,
        bottom_mlp=(13, 64, dim),
        top_mlp=(64, 1),
        interaction="cat",
        pooling_factors=tuple(1 + 7 * (i % 3) for i in range(len(rows))),
    )
    return ModelProfile(spec)


def request(qps: float = 800.0, p99_ms: float = 20.0, k: int = 1, j: int = 0, **model: object) -> PlanRequest:
    return PlanRequest(small_model(**model), Traffic(qps, samples_per_query=32), p99_ms, Availability(k, j))  # type: ignore[arg-type]
