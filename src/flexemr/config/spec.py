"""The cluster spec: one deployment in one JSON file.

It says where the weights come from, how tables are sharded, where each embedding server listens,
and every section of `flexemr.config` (ranker, engine, security, limits, storage, updates, cache,
frames). `flexemr serve` writes one for its local cluster; `flexemr embedding-server` and
`flexemr ranker` read one, so a cluster can span hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexemr.config import (
    CacheMode,
    Endpoint,
    EngineConfig,
    FrameLimits,
    NodeLimits,
    RankerConfig,
    SecurityConfig,
    StorageConfig,
    UpdatesConfig,
)
from flexemr.config.cache import CacheConfig, CostGateConfig, LoadMonitorConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan


def _ranker_config(data: dict[str, Any]) -> RankerConfig:
    """A spec file's ranker section, its cache mode written as text (`fixed:64MiB`)."""
    values = dict(data)
    if "cache" in values:
        values["cache"] = CacheMode.parse(values["cache"])
    return RankerConfig(**values)


def _cache_config(data: dict[str, Any]) -> CacheConfig:
    """A spec file's cache section, with its nested load monitor and cost gate (null: no gate)."""
    values = dict(data)
    if "load" in values:
        values["load"] = LoadMonitorConfig(**values["load"])
    if values.get("gate") is not None:
        values["gate"] = CostGateConfig(**values["gate"])
    return CacheConfig(**values)


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSource
    sharding: ShardingPlan
    embedding_servers: tuple[Endpoint, ...]
    ranker: RankerConfig = field(default_factory=RankerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The ranker's I/O engine."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Secret and TLS of node links."""
    limits: NodeLimits = field(default_factory=NodeLimits)
    """Embedding servers' bounds and the heartbeat."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where the embedding servers keep their rows."""
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    """Row updates: the servers' update logs and bounds."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The ranker's embedding cache tuning. Whether there is one and how big (`--cache`), its device
    budget (`--device-memory`), the lookup mode and the largest batch are the ranker section's."""
    frames: FrameLimits = field(default_factory=FrameLimits)
    """Bounds on the frames of node links, both ends (embedding servers, the ranker's engine)."""

    def __post_init__(self) -> None:
        if len(self.embedding_servers) != self.sharding.num_servers:
            raise ValueError(
                f"the plan has {self.sharding.num_servers} servers but {len(self.embedding_servers)} "
                "embedding server endpoints are listed"
            )
        if self.engine.transport == "ucx" and self.security.tls:
            raise ValueError(
                "--transport ucx has no TLS (UCX does not encrypt): use tcp with TLS, or ucx on a "
                "private fabric without tls_cert/tls_key/tls_ca"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ranker"]["cache"] = str(self.ranker.cache)  # as written: off, fixed:BYTES, adaptive
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the spec to `path` atomically: a reader sees the old file or the new, whole."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with temporary.open("w") as out:
            out.write(self.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        return cls(
            model=ModelSource(**data["model"]),
            sharding=ShardingPlan.from_dict(data["sharding"]),
            embedding_servers=tuple(Endpoint(**e) for e in data["embedding_servers"]),
            ranker=_ranker_config(data.get("ranker", {})),
            engine=EngineConfig(**data.get("engine", {})),
            security=SecurityConfig(**data.get("security", {})),
            limits=NodeLimits(**data.get("limits", {})),
            storage=StorageConfig(**data.get("storage", {})),
            updates=UpdatesConfig(**data.get("updates", {})),
            cache=_cache_config(data.get("cache", {})),
            frames=FrameLimits(**data.get("frames", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> ClusterSpec:
        return cls.from_text(Path(path).read_text(), path)

    @classmethod
    def from_text(cls, text: str, path: str | Path) -> ClusterSpec:
        """The spec in `text`, read from `path` (named in the error if it is not a valid one)."""
        try:
            return cls.from_dict(json.loads(text))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a valid cluster spec: {exc}") from exc
