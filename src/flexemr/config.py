"""Configuration: small dataclasses, validated on construction, gathered in one `ClusterSpec`.

A cluster spec file (JSON) describes one deployment: where the weights come from, how tables are
sharded, where each embedding server listens, and how the ranker serves. `flexemr serve` writes
one for its local cluster; `flexemr embedding-server` and `flexemr ranker` read one, so a cluster
can span hosts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flexemr.model.presets import preset
from flexemr.model.spec import Interaction, ModelSpec, Pooling
from flexemr.model.weights import CheckpointWeights, PresetWeights, WeightSource
from flexemr.sharding.plan import ShardingPlan

LookupMode = Literal["partial", "raw"]


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a seeded preset or a reference checkpoint (exactly one)."""

    preset: str | None = None
    """Preset name (tiny, rmc1, rmc2, rmc3, dlrm-v2)."""
    row_scale: float = 1.0
    """Preset tables' rows are multiplied by this, to fit the machine."""
    seed: int = 0
    """Seed of a preset's random weights; every process derives the same weights from it."""
    checkpoint: str | None = None
    """Path to a `torch.save`d state_dict of Meta's reference DLRM_Net."""
    interaction: Interaction | None = None
    """Override the interaction (a checkpoint does not record it; default `dot`)."""
    interaction_itself: bool | None = None
    """Override self-interaction for `dot` (default off)."""
    pooling: Pooling | None = None
    """Override the pooling (default `sum`)."""

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of a preset or a checkpoint")

    def load(self) -> WeightSource:
        if self.checkpoint is not None:
            return CheckpointWeights(
                self.checkpoint,
                interaction=self.interaction or "dot",
                interaction_itself=bool(self.interaction_itself),
                pooling=self.pooling or "sum",
            )
        assert self.preset is not None
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("interaction", self.interaction),
                ("interaction_itself", self.interaction_itself),
                ("pooling", self.pooling),
            )
            if v is not None
        }
        spec = preset(self.preset, self.row_scale).with_overrides(**overrides)
        return PresetWeights(spec, self.seed)

    def spec(self) -> ModelSpec:
        return self.load().spec


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 0
    """0 lets the OS choose (local clusters report the chosen port back)."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RankerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "dlrm"
    """The name clients use in /v2/models/{name}."""
    lookup: LookupMode = "partial"
    """`partial`: servers pool their rows per bag; `raw`: servers return rows, the ranker pools."""
    max_batch: int = 8192
    """Largest batch (samples per request) accepted; larger ones get HTTP 400."""
    max_indices_per_sample: int = 4096
    """Largest number of indices per sample on average; bounds request memory."""
    request_timeout_s: float = 10.0
    """A lookup that has not completed by then fails the request (HTTP 503)."""
    device: str = "auto"
    """Where the dense model runs: `auto` picks `cuda` when available, else `cpu`."""
    batch_window_ms: float = 0.0
    """Dynamic batching: merge requests arriving within this window, up to `max_batch`; 0 = off."""

    def __post_init__(self) -> None:
        if self.lookup not in ("partial", "raw"):
            raise ValueError(f"lookup must be 'partial' or 'raw', got {self.lookup!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {self.max_batch}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSource
    sharding: ShardingPlan
    embedding_servers: tuple[Endpoint, ...]
    ranker: RankerConfig = field(default_factory=RankerConfig)

    def __post_init__(self) -> None:
        if len(self.embedding_servers) != self.sharding.num_servers:
            raise ValueError(
                f"the plan has {self.sharding.num_servers} servers but {len(self.embedding_servers)} "
                "embedding server endpoints are listed"
            )
        if self.sharding.replicas != 1:
            raise ValueError(
                f"the plan keeps {self.sharding.replicas} replicas of each row; serving replicated plans "
                "is not supported yet, so plan with --availability 0 to serve it"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        return cls(
            model=ModelSource(**data["model"]),
            sharding=ShardingPlan.from_dict(data["sharding"]),
            embedding_servers=tuple(Endpoint(**e) for e in data["embedding_servers"]),
            ranker=RankerConfig(**data.get("ranker", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> ClusterSpec:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a valid cluster spec: {exc}") from exc
