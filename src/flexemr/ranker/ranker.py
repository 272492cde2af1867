"""The ranker: validate, route, look up remotely, pool globally, run the dense model.

    request -> validate -> route (one searchsorted) -> one subrequest per server, all in flight
            -> gather: index_add partial sums (or raw rows) into [T*B, D] -> mean? divide
            -> dense forward on the device -> scores

A lookup that fails or times out fails the whole request: a score is never computed from a
partial set of rows.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import numpy as np
import torch

from flexemr.config import RankerConfig
from flexemr.model.dlrm import DenseArch
from flexemr.model.spec import ModelSpec
from flexemr.ranker.batch import SparseBatch, validate_batch
from flexemr.ranker.batcher import DynamicBatcher
from flexemr.sharding.plan import ShardingPlan
from flexemr.sharding.router import RangeRouter
from flexemr.transport.base import LookupRequest, LookupTransport, ServerUnavailable


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Ranker:
    def __init__(
        self,
        spec: ModelSpec,
        plan: ShardingPlan,
        dense: DenseArch,
        transport: LookupTransport,
        config: RankerConfig,
    ) -> None:
        self.spec = spec
        self.config = config
        self.router = RangeRouter(plan)
        self.transport = transport
        self.device = resolve_device(config.device)
        self.dense = dense.to(self.device).eval()
        self.samples = self.requests = 0
        self.batcher = (
            DynamicBatcher(self.score_batch, config.max_batch, config.batch_window_ms / 1000)
            if config.batch_window_ms > 0
            else None
        )

    def ready(self) -> bool:
        return all(self.transport.connected())

    def score(self, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Click probabilities float32 [B]. Raises `InvalidRequest` for bad input and
        `ServerUnavailable` / `LookupFailed` when a lookup cannot complete. With dynamic batching
        on, the request may be scored together with others that arrive at about the same time."""
        batch = validate_batch(
            self.spec, dense, indices, lengths, self.config.max_batch, self.config.max_indices_per_sample
        )
        if self.batcher is None:
            return self.score_batch(batch)
        return self.batcher.submit(batch).result()

    def score_batch(self, batch: SparseBatch) -> np.ndarray:
        pooled = self.pool(batch)
        with torch.inference_mode():
            scores = self.dense(torch.from_numpy(batch.dense).to(self.device), pooled.to(self.device))
        self.requests += 1
        self.samples += batch.batch_size
        result: np.ndarray = scores.float().cpu().numpy()
        return result

    def pool(self, batch: SparseBatch) -> torch.Tensor:
        """Pooled embeddings [B, T, D], gathered from every server that holds rows of the batch."""
        bag_ids = batch.bag_ids()
        keys = self.router.keys(batch.indices, batch.rows_per_table())
        raw = self.config.lookup == "raw"
        in_flight = [
            (sub, self.transport.submit(sub.server, LookupRequest(sub.rows, sub.offsets, raw=raw)))
            for sub in self.router.route(keys, bag_ids)
        ]
        pooled = torch.zeros(batch.lengths.size, self.spec.dim)
        deadline = time.monotonic() + self.config.request_timeout_s
        for sub, future in in_flight:
            try:
                values = future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except concurrent.futures.TimeoutError:
                endpoint = f"#{sub.server}"
                raise ServerUnavailable(
                    sub.server, endpoint, f"no answer within {self.config.request_timeout_s} s"
                ) from None
            target = sub.row_bags() if raw else sub.bags
            pooled.index_add_(0, torch.from_numpy(target), torch.from_numpy(values))
        if self.spec.pooling == "mean":
            pooled /= torch.from_numpy(batch.lengths).clamp(min=1).unsqueeze(1)
        return pooled.view(batch.num_tables, batch.batch_size, self.spec.dim).transpose(0, 1)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "requests": self.requests,
            "samples": self.samples,
            "transport": self.transport.stats(),
        }
        if self.batcher is not None:
            stats["batcher"] = {
                "batches": self.batcher.merged_batches,
                "requests": self.batcher.merged_requests,
            }
        return stats

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.transport.close()
