"""A planning result: the chosen deployment, its prediction, the monolithic alternatives; as text
and as the JSON file `flexemr plan --out` writes (its "sharding" key is a `ShardingPlan`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexemr.config.plan import ShardingPlan
from flexemr.planner.calibration import Calibration
from flexemr.planner.catalog import Catalog
from flexemr.planner.inputs import PlanRequest, read_json_object
from flexemr.planner.placement import Placement
from flexemr.planner.search import Candidate


@dataclass(frozen=True)
class PlanResult:
    request: PlanRequest
    chosen: Candidate
    scale_up: Candidate | str
    """The monolithic scale-up alternative, or why there is none."""
    scale_out: Candidate | str
    calibration: Calibration
    catalog: Catalog

    @property
    def _placement(self) -> Placement:
        placement = self.chosen.deployment.placement
        assert placement is not None
        return placement

    @property
    def sharding(self) -> ShardingPlan:
        return self._placement.to_sharding_plan(self.request.model)

    def to_dict(self) -> dict[str, Any]:
        dep = self.chosen.deployment
        return {
            "calibration": self.calibration.label,
            "catalog": {"source": self.catalog.source, "as_of": self.catalog.as_of},
            "request": {
                "model": self.request.model.to_dict(),
                "traffic": self.request.traffic.to_dict(),
                "p99_ms": self.request.p99_ms,
                "embedding_server_failures": self.request.availability.embedding_server_failures,
                "ranker_failures": self.request.availability.ranker_failures,
                "partial_pooling": self.request.partial_pooling,
            },
            "rankers": {"type": dep.ranker_type.name, "count": dep.rankers},
            "embedding_servers": {
                "type": dep.server_type.name,
                "count": dep.servers,
                "storage": dep.storage,
                "max_row_bytes": int(self._placement.server_bytes(self.request.model).max()),
            },
            "cost_per_hour": dep.cost_per_hour,
            "prediction": self.chosen.prediction.to_dict(),
            "alternatives": {
                "scale_up": _alternative(self.scale_up),
                "scale_out": _alternative(self.scale_out),
            },
            "sharding": self.sharding.to_dict(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self) -> str:
        dep, pred = self.chosen.deployment, self.chosen.prediction
        req = self.request
        lines = [
            f"calibration: {self.calibration.label}",
            f"prices: {self.catalog.source.split(';')[0]} (as of {self.catalog.as_of or 'unknown'})",
            f"target: {req.traffic.peak_qps:g} QPS at p99 <= {req.p99_ms:g} ms, surviving "
            f"{req.availability.embedding_server_failures} embedding-server and "
            f"{req.availability.ranker_failures} ranker failure(s)",
            "",
            f"disaggregated: ${dep.cost_per_hour:.2f}/hour",
            f"  rankers:           {dep.rankers} x {dep.ranker_type.name}",
            f"  embedding servers: {dep.servers} x {dep.server_type.name} "
            f"({self.sharding.strategy}-wise, {self.sharding.replicas} copies of each row; "
            f"{_storage(dep.storage, float(self._placement.server_bytes(req.model).max()))})",
            f"  predicted: p99 {pred.p99_ms:.2f} ms healthy, {pred.p99_ms_degraded:.2f} ms degraded; "
            f"throughput {pred.max_qps:.0f} QPS ({pred.max_qps_degraded:.0f} degraded), "
            f"bottleneck {pred.bottleneck}",
            "",
            self.sharding.describe(req.model.table_row_bytes),
            "",
            "monolithic alternatives:",
            f"  scale-up:  {_describe(self.scale_up, dep.cost_per_hour)}",
            f"  scale-out: {_describe(self.scale_out, dep.cost_per_hour)}",
        ]
        return "\n".join(lines)


def _storage(storage: str, row_bytes: float) -> str:
    held = f"up to {row_bytes / 2**30:.2f} GiB of rows a server"
    if storage == "mmap":
        return f"{held} on local SSD, hot rows in the page cache: serve with --storage mmap --storage-dir DIR"
    return f"{held} in DRAM"


def _alternative(alt: Candidate | str) -> dict[str, Any]:
    if isinstance(alt, str):
        return {"feasible": False, "reason": alt}
    return {
        "feasible": True,
        "node_type": alt.deployment.ranker_type.name,
        "count": alt.deployment.rankers,
        "cost_per_hour": alt.cost_per_hour,
        "prediction": alt.prediction.to_dict(),
    }


def _describe(alt: Candidate | str, disaggregated_cost: float) -> str:
    if isinstance(alt, str):
        return f"infeasible: {alt}"
    saving = 100 * (1 - disaggregated_cost / alt.cost_per_hour)
    return (
        f"{alt.deployment.rankers} x {alt.deployment.ranker_type.name}, ${alt.cost_per_hour:.2f}/hour, "
        f"p99 {alt.prediction.p99_ms:.2f} ms (disaggregated is {abs(saving):.1f}% "
        f"{'cheaper' if saving >= 0 else 'dearer'})"
    )


def load_sharding(path: str | Path) -> ShardingPlan:
    """The `ShardingPlan` in a `flexemr plan --out` file (or in a bare ShardingPlan JSON file)."""
    data = read_json_object(path, "plan")
    try:
        return ShardingPlan.from_dict(data.get("sharding", data))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"plan file {path} holds no sharding plan: {exc!r}") from None
