"""The ranker: validate, route, look up remotely, pool globally, run the dense model.

    request -> validate -> route (one searchsorted) -> one subrequest per server, all in flight
            -> gather: index_add partial sums (or raw rows) into [T*B, D] -> mean? divide
            -> dense forward on the device -> scores

A lookup that fails or times out fails the whole request: a score is never computed from a
partial set of rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flexemr.cache import AdaptiveCacheManager, CacheConfig, LoadMonitorConfig
from flexemr.cache.pooling import offsets_of
from flexemr.config import RankerConfig
from flexemr.model.dlrm import DenseArch
from flexemr.model.spec import ModelSpec
from flexemr.ranker.admission import Admission, Ticket
from flexemr.ranker.batch import SparseBatch, validate_batch
from flexemr.ranker.batcher import DynamicBatcher
from flexemr.ranker.turns import Turns
from flexemr.sharding.plan import ShardingPlan
from flexemr.sharding.router import RangeRouter, Subrequest
from flexemr.stats import counts
from flexemr.transport.base import LookupFailed, LookupRequest, LookupTransport, ServerUnavailable

MAX_REQUESTS_BEING_READ = 64
"""Requests whose bodies are being received or parsed at once (each at most the body limit)."""


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
        self._waiting = 0  # samples accepted and not yet scored: the load monitor's queue depth
        self._lock = threading.Lock()
        self.turns = Turns()
        self.admission = Admission(config.in_flight_limit, MAX_REQUESTS_BEING_READ)
        self.cache = self._make_cache()
        self._stop = threading.Event()
        self._warmer: threading.Thread | None = None
        if self.cache is not None:
            self._warmer = threading.Thread(target=self._warm_loop, daemon=True, name="cache-warmer")
            self._warmer.start()
        self.batcher = (
            DynamicBatcher(self._score_batch_in_turn, config.max_batch, config.batch_window_ms / 1000)
            if config.batch_window_ms > 0
            else None
        )

    def _make_cache(self) -> AdaptiveCacheManager | None:
        if self.config.cache == "off":
            return None
        cache_config = CacheConfig(
            mode=self.config.cache,
            wire=self.config.lookup,
            device_budget_bytes=self.config.device_memory_bytes,
            load=LoadMonitorConfig(max_batch=self.config.max_batch),
        )
        return AdaptiveCacheManager.for_model(cache_config, self.dense, self.device, start=time.monotonic())

    def ready(self) -> bool:
        return all(self.transport.connected())

    def score(
        self, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray, ticket: Ticket | None = None
    ) -> np.ndarray:
        """Click probabilities float32 [B]. Raises `InvalidRequest` for bad input,
        `ServerUnavailable` / `LookupFailed` when a lookup cannot complete, and `Dropped` when the
        ticket's deadline passes (or its client leaves) before the work starts. With dynamic batching
        on, the request may be scored together with others that arrive at about the same time."""
        with self.turns.turn():
            if ticket is not None:
                ticket.check()
            batch = validate_batch(
                self.spec, dense, indices, lengths, self.config.max_batch, self.config.max_indices_per_sample
            )
            with self._lock:
                self._waiting += batch.batch_size
            try:
                if self.batcher is None:
                    return self.score_batch(batch, ticket)
                with self.turns.waiting():
                    return self.batcher.submit(batch, ticket).result()
            finally:
                with self._lock:
                    self._waiting -= batch.batch_size

    def _score_batch_in_turn(self, batch: SparseBatch) -> np.ndarray:
        with self.turns.turn():
            return self.score_batch(batch)

    def score_batch(self, batch: SparseBatch, ticket: Ticket | None = None) -> np.ndarray:
        pooled = self.pool(batch)
        if ticket is not None:
            ticket.check()
        # The dense model runs in torch's kernels (or on the GPU), outside the interpreter lock:
        # other requests take their turn meanwhile.
        with self.turns.waiting(), torch.inference_mode():
            scores = self.dense(torch.from_numpy(batch.dense).to(self.device), pooled)
            result: np.ndarray = scores.float().cpu().numpy()
        with self._lock:
            self.requests += 1
            self.samples += batch.batch_size
        return result

    def pool(self, batch: SparseBatch) -> torch.Tensor:
        """Pooled embeddings [B, T, D] on the device: cached rows summed locally, the rest gathered
        from every server that holds rows of the batch."""
        keys = self.router.keys(batch.indices, batch.rows_per_table())
        pooled = torch.zeros(batch.lengths.size, self.spec.dim, device=self.device)
        raw = self.config.lookup == "raw"
        cache, token, use_cache = self.cache, None, False
        if cache is not None:
            with self._lock:
                queued = max(self._waiting - batch.batch_size, 0)
            cache.before_batch(batch.batch_size, queued, time.monotonic())
            token = cache.fetch_token()
            cache.observe(torch.from_numpy(keys))
            use_cache = cache.use_cache(keys.size)
        start = time.perf_counter()
        remote_keys, remote_lengths = keys, batch.lengths
        if use_cache:
            assert cache is not None
            offsets = offsets_of(torch.from_numpy(batch.lengths))
            part = cache.cached_part(torch.from_numpy(keys), offsets, out=pooled)
            remote_keys, remote_lengths = keys[part.miss.cpu().numpy()], part.miss_lengths.cpu().numpy()
        for sub, values in self._lookup(remote_keys, remote_lengths, raw):
            target = sub.row_bags() if raw else sub.bags
            rows = torch.from_numpy(values).to(self.device)
            pooled.index_add_(0, torch.from_numpy(target).to(self.device), rows)
            if raw and cache is not None:
                cache.admit(torch.from_numpy(sub.keys), rows, token)
        if cache is not None:
            cache.record_lookup(use_cache, keys.size, time.perf_counter() - start)
        if self.spec.pooling == "mean":
            pooled /= torch.from_numpy(batch.lengths).to(self.device).clamp(min=1).unsqueeze(1)
        return pooled.view(batch.num_tables, batch.batch_size, self.spec.dim).transpose(0, 1)

    def _lookup(
        self, keys: np.ndarray, lengths: np.ndarray, raw: bool
    ) -> Iterator[tuple[Subrequest, np.ndarray]]:
        """Send one subrequest per server holding any of `keys` (in bags of `lengths`), all in
        flight at once; yield each with its answer. Fails the whole lookup if any server fails or
        times out."""
        in_flight = [
            (sub, self.transport.submit(sub.server, LookupRequest(sub.rows, sub.offsets, raw=raw)))
            for sub in self.router.route(keys, lengths)
        ]
        deadline = time.monotonic() + self.config.request_timeout_s
        for sub, future in in_flight:
            try:
                with self.turns.waiting():
                    values = future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except concurrent.futures.TimeoutError:
                raise ServerUnavailable(
                    sub.server, f"#{sub.server}", f"no answer within {self.config.request_timeout_s} s"
                ) from None
            yield sub, values

    def _warm_loop(self) -> None:
        """Fill the cache's free room with the hottest rows it misses, fetched raw in the
        background; requests never wait for it."""
        assert self.cache is not None
        while not self._stop.wait(0.05):
            request = self.cache.warm_candidates(min(self.cache.free_rows() or 64, 8192))
            if request.keys.numel() == 0:
                continue
            keys = np.sort(request.keys.cpu().numpy())
            try:
                for sub, rows in self._lookup(keys, np.ones(keys.size, dtype=np.int64), raw=True):
                    self.cache.admit(torch.from_numpy(sub.keys), torch.from_numpy(rows), request.token)
            except (ServerUnavailable, LookupFailed):
                continue  # a later round retries; requests report the failure themselves

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            **counts({"requests": self.requests, "samples": self.samples}),
            "transport": self.transport.stats(),
            "admission": self.admission.stats(),
        }
        if self.cache is not None:
            cache = self.cache.stats()
            stats["cache"] = {
                k: v for k, v in dataclasses.asdict(cache).items() if isinstance(v, int | float)
            }
        if self.batcher is not None:
            stats["batcher"] = counts(
                {"batches": self.batcher.merged_batches, "requests": self.batcher.merged_requests}
            )
        return stats

    def close(self) -> None:
        self._stop.set()
        if self._warmer is not None:
            self._warmer.join(5)
        if self.batcher is not None:
            self.batcher.close()
        self.transport.close()
