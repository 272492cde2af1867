"""Factories for engine tests: in-thread embedding servers, engines, and a reference lookup."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from flexemr.config import Endpoint, EngineConfig, ModelSource
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine
from flexemr.sharding.plan import ShardingPlan, make_plan
from flexemr.transport.base import LookupRequest


@dataclass
class Servers:
    plan: ShardingPlan
    servers: list[EmbeddingServer]
    stores: list[ShardStore]

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(s.endpoint for s in self.servers)

    def engine(self, **config: object) -> IoEngine:
        engine = IoEngine(
            self.endpoints,
            [self.plan.server_rows(i) for i in range(self.plan.num_servers)],
            self.plan.dim,
            EngineConfig(**config),  # type: ignore[arg-type]
        )
        engine.start(timeout=10)
        return engine


@contextmanager
def thread_servers(num_servers: int = 2, preset: str = "tiny") -> Iterator[Servers]:
    weights = ModelSource(preset=preset).load()
    spec = weights.spec
    plan = make_plan("row", spec.table_rows, spec.dim, num_servers)
    stores = [ShardStore(plan, i, weights, progress=False) for i in range(num_servers)]
    servers = [EmbeddingServer(store, Endpoint()) for store in stores]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield Servers(plan, servers, stores)
    finally:
        for s in servers:
            s.close()
        for t in threads:
            t.join(5)


def random_request(
    rng: np.random.Generator, rows: int, raw: bool = False, max_bags: int = 16
) -> LookupRequest:
    bags = int(rng.integers(1, max_bags + 1))
    lengths = rng.integers(0, 6, size=bags)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    indices = rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64)
    return LookupRequest(indices, offsets, raw=raw)


def reference(store: ShardStore, request: LookupRequest) -> np.ndarray:
    """What the server must answer, computed locally with numpy (not the server's kernel)."""
    table = store.raw(np.arange(store.num_rows))  # every row's stored value, as float32
    if request.raw:
        return table[request.rows]
    bounds = [*request.offsets.tolist(), request.rows.size]
    return np.stack(
        [table[request.rows[a:b]].sum(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ).astype(np.float32)
