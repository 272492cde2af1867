"""Shared by the UCX tests: the links tested (`UCX_TLS`) and a tiny cluster spec over UCX."""

from __future__ import annotations

from flexemr.config import Endpoint, EngineConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan

SECRET = "ucx-test-secret"
LINKS = {"tcp": "tcp", "shm": "tcp,sm,self"}
"""UCX_TLS of each link tested: UCX's TCP, and shared memory (TCP only to set the endpoints up)."""


def ucx_spec(
    sharding: str = "row", servers: int = 2, preset: str = "tiny", row_scale: float = 1.0
) -> ClusterSpec:
    source = ModelSource(preset=preset, row_scale=row_scale)
    model = model_spec(source)
    plan = make_plan(sharding, model.table_rows, model.dim, servers)  # type: ignore[arg-type]
    endpoints = tuple(Endpoint() for _ in range(servers))
    return ClusterSpec(source, plan, endpoints, engine=EngineConfig(transport="ucx"))
