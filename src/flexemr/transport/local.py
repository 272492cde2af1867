"""Every shard in the ranker's own process: the served monolithic deployment.

For a model that fits one machine, `flexemr serve --embedding-tier local` keeps the shard stores an
embedding server would hold (`ShardStore`, the same huge-page arrays and `embedding_bag` kernels)
inside the ranker and answers each subrequest with a direct call: the same API, router, pooling
and dense model as over servers, without the network hop. It is the baseline a disaggregated
deployment is compared with when both serve the same requests over the same front end.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.config.plan import ShardingPlan
from flexemr.embedding_server.store import BadSubrequest, ShardStore
from flexemr.model.weights import WeightSource
from flexemr.transport.base import LookupFailed, LookupRequest


class LocalTransport:
    """A `LookupTransport` whose "servers" are shard stores in this process."""

    def __init__(self, plan: ShardingPlan, source: WeightSource, progress: bool = False) -> None:
        self.stores = [ShardStore(plan, s, source, progress=progress) for s in range(plan.num_servers)]

    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        # The lookup runs in the caller's thread: torch's kernel drops the interpreter lock, and a
        # thread hop would only add latency.
        future: Future[np.ndarray] = Future()
        store = self.stores[server]
        try:
            rows = (
                store.raw(request.rows)
                if request.raw
                else store.pooled(request.rows, request.offsets, request.weights)
            )
        except BadSubrequest as exc:  # the router produced it: a bug, reported like a server's error
            future.set_exception(LookupFailed(f"local shard store {server}: {exc}"))
            return future
        future.set_result(rows)
        return future

    def connected(self) -> list[bool]:
        return [True] * len(self.stores)

    def stats(self) -> dict[str, Any]:
        return {"local": {"table_bytes": sum(s.nbytes for s in self.stores)}}

    def close(self) -> None:
        self.stores.clear()
