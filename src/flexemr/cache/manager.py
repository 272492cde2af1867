"""The ranker's adaptive embedding cache: a `RowCache` sized by load, filled with hot rows.

    plan_batch(keys, offsets, B, queue)   a request's batch, before its remote lookup:
      before_batch(B, queue, now)  LoadMonitor -> planned batch -> MemoryModel -> cache budget
                                   -> shrink now (evict LRU) or grow (allocate empty room)
      observe(keys)                queue a sample of the batch's keys (hits and misses) ...
      CostGate                     does consulting the cache speed lookups up here? if so:
      cached_part(keys, offsets)   hits summed per bag on the device; misses go to the servers
    finish(plan, keys, rows)      after it: raw-mode misses admitted, the lookup phase timed
                                  for the CostGate
    warm_candidates(k)           ... count it in the FrequencySketch; the hottest missing keys,
                                 for a background fetch ...
    admit(keys, rows, token)     ... whose rows are cached here (or raw-mode misses)
    invalidate(keys)             rows changed at the source: never serve the old value

Modes (`--cache`): `off` (no cache, everything misses), `fixed:BYTES` (constant capacity, still
warmed), `adaptive` (capacity follows `MemoryModel.cache_budget(planned batch)`).

Threads: every public method is safe from any thread. One lock guards the cache, the monitor and
the counters; it is held only for the tensor ops on them (no I/O, no waiting), and host-to-device
copies of admitted rows happen before it is taken. The sketch has a lock of its own: counting a
batch (a sort of its distinct keys) takes as long as a lookup, so the request thread only queues
a sample of its keys and the warming thread counts the queue in `warm_candidates`, off the
request path. Intended use: the request thread calls `plan_batch` and `finish` once per batch;
one background thread calls `warm_candidates` and, after fetching, `admit`;
the update stream calls `invalidate`; anyone calls `stats`.

Consistency: a fetch races with updates (a row read before an update can arrive after it). So
a fetch takes a token (`fetch_token()`, or the one `warm_candidates` returns) *before* it reads,
and `admit(..., token=)` drops every key invalidated since; if the record of invalidations no
longer reaches back to the token, it drops the whole admit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flexemr.cache.cost_gate import CostGate
from flexemr.cache.load_monitor import LoadMonitor, LoadState
from flexemr.cache.memory_model import MemoryModel
from flexemr.cache.pooling import CachedPart, cached_partial_sums
from flexemr.cache.row_cache import RowCache
from flexemr.cache.sketch import FrequencySketch
from flexemr.config import CacheMode, LookupMode
from flexemr.config.cache import CacheConfig
from flexemr.model.dlrm import DenseArch
from flexemr.stats import Count

INVALIDATION_LOG = 256
"""Invalidation batches remembered for checking admits against their fetch token."""
OBSERVED_BACKLOG = 64
"""Batch samples waiting to be counted; beyond this the oldest are dropped (the warming thread
is behind, and recent traffic says more about what is hot)."""


@dataclass(frozen=True)
class ResizeEvent:
    now: float
    old_bytes: int
    new_bytes: int
    evicted: int
    """Rows dropped by the resize."""
    state: LoadState
    plan_batch: int
    seconds: float
    """How long the resize took (lookups wait for it)."""


@dataclass(frozen=True)
class BatchPlan:
    """What `plan_batch` did for one batch, for its remote lookup and `finish`."""

    token: int
    """Taken before the lookup: `finish` admits only rows not invalidated since."""
    keys: int
    """The batch's key count."""
    started: float
    """perf_counter() when the lookup phase began."""
    miss: tuple[np.ndarray, np.ndarray] | None = None
    """The keys the cache lacks, to look up remotely: a bool mask [N] and each bag's count, int64
    [num_bags] (the bags the servers still see); None: the cache was bypassed (every key goes to
    the servers)."""

    def remote(self, keys: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys (of `keys` [N] in bags of `lengths`) to look up remotely, in bags of lengths."""
        return (keys, lengths) if self.miss is None else (keys[self.miss[0]], self.miss[1])


@dataclass(frozen=True)
class WarmRequest:
    keys: Tensor
    """int64 [k]: global keys to fetch, hottest first."""
    token: int
    """Pass to `admit` with the fetched rows."""


@dataclass(frozen=True)
class CacheStats:
    mode: str
    state: LoadState
    plan_batch: int
    capacity_bytes: int
    size_bytes: int
    rows: int
    capacity_rows: int
    lookups: Count
    hits: Count
    hit_rate: float
    bytes_saved: Count
    """Wire bytes the hits avoided. raw: hits * (4 * dim + 8), the row not returned and its index
    not sent. partial: hits * 8 (indices not sent) + 4 * dim per bag served wholly from the cache
    (at least one partial vector not returned); a lower bound, since a server whose rows of a
    bag all hit also skips its partial."""
    resizes: Count
    shrinks: Count
    grows: Count
    evicted_by_resize: Count
    admitted: Count
    invalidated: Count
    admits_dropped_stale: Count
    """Admits (keys) dropped because their keys were invalidated after the fetch began."""
    bypassed_batches: Count
    """Batches looked up without consulting the cache (the cost gate's choice, or no capacity)."""
    seconds_per_key_with_cache: float
    """The cost gate's mean lookup-phase time per key, consulting the cache (0: not measured)."""
    seconds_per_key_without_cache: float
    """The same without consulting it (0: not measured)."""


class AdaptiveCacheManager:
    def __init__(
        self,
        mode: CacheMode,
        dim: int,
        device: torch.device | str | None = None,
        memory: MemoryModel | None = None,
        start: float = 0.0,
        *,
        config: CacheConfig | None = None,
        wire: LookupMode = "partial",
        max_batch: int = 8192,
    ) -> None:
        """A cache of `mode` (the ranker's `--cache`) for rows of `dim` columns, tuned by `config`;
        `wire`: the ranker's lookup mode (only changes how `bytes_saved` is counted); `max_batch`:
        the largest batch it forms (loads are fractions of it)."""
        config = config or CacheConfig()
        self.config = config
        self.mode = mode
        self.wire = wire
        if self.mode.kind == "adaptive" and memory is None:
            raise ValueError("the adaptive cache needs a MemoryModel (use AdaptiveCacheManager.for_model)")
        self.memory = memory
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.monitor = LoadMonitor(config.load, max_batch, start)
        self.gate = CostGate(config.gate) if self.mode.kind == "adaptive" and config.gate else None
        self.cache = RowCache(dim, self._initial_bytes(), self.device, config.ways)
        self.sketch = FrequencySketch(
            config.sketch_width,
            config.sketch_depth,
            config.sketch_candidates,
            config.sketch_half_life,
            self.device,
            config.sketch_sample,
        )
        self._lock = threading.Lock()
        self._sketch_lock = threading.Lock()
        self._observed: deque[tuple[Tensor, int]] = deque(maxlen=OBSERVED_BACKLOG)
        """Key samples of batches not yet counted, and the batch size each stands for."""
        self._epoch = 0
        self._invalidations: deque[tuple[int, Tensor]] = deque(maxlen=INVALIDATION_LOG)
        self._state: LoadState = "low"
        self._plan_batch = 0
        self._last_shrink = -math.inf
        self._lookups = self._hits = self._bytes_saved = 0
        self._shrinks = self._grows = self._evicted = 0
        self._admitted = self._invalidated = self._stale = self._bypassed = 0
        self.events: deque[ResizeEvent] = deque(maxlen=1024)
        """The latest resizes, oldest first."""

    @classmethod
    def for_model(
        cls,
        mode: CacheMode,
        dense: DenseArch,
        device: torch.device | str | None = None,
        start: float = 0.0,
        *,
        config: CacheConfig | None = None,
        wire: LookupMode = "partial",
        max_batch: int = 8192,
        device_budget_bytes: int | None = None,
    ) -> AdaptiveCacheManager:
        """A manager for `dense` (already on `device`); `adaptive` calibrates a MemoryModel first,
        within `device_budget_bytes` (None: 90% of GPU memory, or 25% of RAM on CPU)."""
        config = config or CacheConfig()
        memory = None
        if mode.kind == "adaptive":
            memory = MemoryModel.calibrate(
                dense,
                device,
                device_budget_bytes=device_budget_bytes,
                safety_margin_bytes=config.safety_margin_bytes,
            )
        return cls(mode, dense.spec.dim, device, memory, start, config=config, wire=wire, max_batch=max_batch)

    def _initial_bytes(self) -> int:
        if self.mode.kind == "fixed":
            return self.mode.fixed_bytes
        if self.mode.kind == "adaptive":
            return self._budget(self.monitor.max_batch)  # start safe, grow when load is low
        return 0

    def _budget(self, plan_batch: int) -> int:
        assert self.memory is not None
        budget = self.memory.cache_budget(plan_batch)
        if self.config.max_bytes is not None:
            budget = min(budget, self.config.max_bytes)
        return budget if budget >= self.config.min_bytes else 0

    # -- request thread -----------------------------------------------------------------------------

    def before_batch(self, batch_size: int, queue_depth: int, now: float) -> ResizeEvent | None:
        """Call before running a batch of `batch_size` samples with `queue_depth` samples waiting
        (monotonic seconds `now`). `adaptive` shrinks here, before the batch needs the memory, or
        grows (empty room for `warm_candidates`). Returns the resize, if any."""
        with self._lock:
            # Concurrent callers read their clocks before taking the lock, so `now` may trail slightly.
            now = max(now, self.monitor.last_time)
            decision = self.monitor.observe(batch_size, queue_depth, now)
            self._state, self._plan_batch = decision.state, decision.plan_batch
            if self.mode.kind != "adaptive":
                return None
            target = self._budget(decision.plan_batch)
            current = self.cache.capacity_bytes
            after = self.cache.capacity_after_resize(target)
            grow_by = max(current * self.config.grow_threshold, self.cache.slot_bytes * self.config.ways)
            recently_shrunk = now - self._last_shrink < self.config.grow_after_s
            if after == current or (after > current and (after < current + grow_by or recently_shrunk)):
                return None
            began = time.perf_counter()
            evicted = self.cache.resize(target)
            event = ResizeEvent(
                now,
                current,
                self.cache.capacity_bytes,
                evicted,
                decision.state,
                decision.plan_batch,
                time.perf_counter() - began,
            )
            if event.new_bytes < current:
                self._shrinks += 1
                self._last_shrink = now
            elif event.new_bytes > current:
                self._grows += 1
            self._evicted += evicted
            self.events.append(event)
            return event

    def plan_batch(
        self, keys: Tensor, offsets: Tensor, batch_size: int, queue_depth: int, out: Tensor
    ) -> BatchPlan:
        """A request's batch of `batch_size` samples, `queue_depth` more waiting, its `keys` [N]
        in bags of KJT `offsets` [num_bags + 1], before its remote lookup: resize (`before_batch`),
        count its keys, and (unless the cost gate bypasses the cache) add each bag's cached rows
        into `out` [num_bags, dim]. Look up what `BatchPlan.remote` says; then call `finish`."""
        self.before_batch(batch_size, queue_depth, time.monotonic())
        token = self.fetch_token()
        self.observe(keys)
        with self._lock:
            use = self.mode.kind != "off" and self.cache.capacity_rows > 0
            use = use and (self.gate is None or self.gate.use_cache(keys.numel()))
        started = time.perf_counter()
        if not use:
            return BatchPlan(token, keys.numel(), started)
        part = self.cached_part(keys, offsets, out)
        return BatchPlan(
            token, keys.numel(), started, (part.miss.cpu().numpy(), part.miss_lengths.cpu().numpy())
        )

    def finish(self, plan: BatchPlan, keys: list[Tensor], rows: list[Tensor]) -> None:
        """The batch's remote lookup is done: admit the rows it fetched raw (`rows[i]` [n_i, dim]
        of `keys[i]` [n_i], one pair per subrequest; none for partial sums) and time its lookup
        phase (cache, remote lookups, pooling) for the cost gate."""
        if keys:
            self.admit(torch.cat(keys), torch.cat(rows), plan.token)
        seconds = time.perf_counter() - plan.started
        used = plan.miss is not None
        with self._lock:
            self._bypassed += not used
            if self.gate is not None:
                self.gate.record(used, plan.keys, seconds)

    def cached_part(self, keys: Tensor, offsets: Tensor, out: Tensor | None = None) -> CachedPart:
        """Look up a batch's keys [N] in bags of KJT `offsets` [num_bags + 1]: `hit` [N] and, per
        bag, the sum of its cached rows, added into `out` [num_bags, dim] when given (e.g. the
        ranker's `pooled`) or into a new tensor. Send `keys[part.miss]` to the servers."""
        with self._lock:
            part = cached_partial_sums(self.cache, keys, offsets, out)
        hits = part.hits
        if self.wire == "raw":
            saved = hits * (4 * self.cache.dim + 8)
        else:
            whole_bags = int(((part.miss_lengths == 0) & (part.offsets.diff() > 0)).sum()) if hits else 0
            saved = hits * 8 + whole_bags * 4 * self.cache.dim
        with self._lock:
            self._lookups += keys.numel()
            self._hits += hits
            self._bytes_saved += saved
        return part

    def observe(self, keys: Tensor) -> None:
        """Count a batch's keys (all of them, hits too) towards hotness: a sample is queued here
        and counted by the next `warm_candidates`."""
        if self.mode.kind == "off" or keys.numel() == 0:
            return
        self._observed.append(self.sketch.take_sample(keys))

    def _contains(self, keys: Tensor) -> Tensor:
        with self._lock:
            return self.cache.contains(keys)

    def _count_observed(self) -> None:
        with self._sketch_lock:
            while self._observed:
                sample, total = self._observed.popleft()
                self.sketch.observe(sample, self._contains, total)

    # -- background warming ---------------------------------------------------------------------

    def fetch_token(self) -> int:
        """Take before reading rows from the servers that will be passed to `admit`."""
        with self._lock:
            return self._epoch

    def free_rows(self) -> int:
        """Empty slots (after a grow or invalidations): a good `k` for `warm_candidates`."""
        with self._lock:
            return self.cache.capacity_rows - self.cache.num_rows

    def warm_candidates(self, k: int) -> WarmRequest:
        """Up to `k` of the hottest keys not cached, hottest first, and the token for `admit`.
        Admitting them replaces least recently used rows once the cache is full."""
        self._count_observed()
        with self._lock:
            token = self._epoch
            if self.mode.kind == "off" or self.cache.capacity_rows == 0:
                return WarmRequest(torch.empty(0, dtype=torch.int64, device=self.device), token)
        with self._sketch_lock:
            return WarmRequest(self.sketch.hottest_missing(k, self._contains), token)

    def admit(self, keys: Tensor, rows: Tensor, token: int | None = None) -> int:
        """Cache `rows` [n, dim] (exact source values) of `keys` [n]. With `token` (taken before
        the rows were read), keys invalidated since are left out. Returns rows written."""
        if self.mode.kind == "off" or keys.numel() == 0:
            return 0
        keys = keys.to(self.device, torch.int64)
        rows = rows.to(self.device, torch.float32)
        with self._lock:
            if token is not None:
                fresh = self._not_invalidated_since(keys, token)
                self._stale += int((~fresh).sum())
                keys, rows = keys[fresh], rows[fresh]
            written = self.cache.insert(keys, rows)
            self._admitted += written
            return written

    def _not_invalidated_since(self, keys: Tensor, token: int) -> Tensor:
        if token >= self._epoch:
            return torch.ones(keys.shape, dtype=torch.bool, device=self.device)
        if not self._invalidations or self._invalidations[0][0] > token + 1:
            return torch.zeros(keys.shape, dtype=torch.bool, device=self.device)  # log too short
        changed = torch.cat([k for epoch, k in self._invalidations if epoch > token])
        return ~torch.isin(keys, changed)

    # -- any thread -----------------------------------------------------------------------------

    def invalidate(self, keys: Tensor) -> int:
        """Rows of `keys` changed at the source: drop them, and refuse in-flight admits of them."""
        keys = keys.to(self.device, torch.int64).reshape(-1).clone()
        with self._lock:
            self._epoch += 1
            self._invalidations.append((self._epoch, keys))
            dropped = self.cache.invalidate(keys)
            self._invalidated += dropped
            return dropped

    def clear(self) -> int:
        """Any row may have changed at the source: drop them all, and refuse in-flight admits."""
        with self._lock:
            self._epoch += 1
            self._invalidations.clear()  # too short for any earlier token: their admits are dropped
            dropped = self.cache.num_rows
            self.cache.clear()
            self._invalidated += dropped
            return dropped

    def stats(self) -> CacheStats:
        with self._lock:
            cache = self.cache
            return CacheStats(
                mode=str(self.mode),
                state=self._state,
                plan_batch=self._plan_batch,
                capacity_bytes=cache.capacity_bytes,
                size_bytes=cache.size_bytes,
                rows=cache.num_rows,
                capacity_rows=cache.capacity_rows,
                lookups=Count(self._lookups),
                hits=Count(self._hits),
                hit_rate=self._hits / self._lookups if self._lookups else 0.0,
                bytes_saved=Count(self._bytes_saved),
                resizes=Count(self._shrinks + self._grows),
                shrinks=Count(self._shrinks),
                grows=Count(self._grows),
                evicted_by_resize=Count(self._evicted),
                admitted=Count(self._admitted),
                invalidated=Count(self._invalidated),
                admits_dropped_stale=Count(self._stale),
                bypassed_batches=Count(self._bypassed),
                seconds_per_key_with_cache=(self.gate and self.gate.cost[True]) or 0.0,
                seconds_per_key_without_cache=(self.gate and self.gate.cost[False]) or 0.0,
            )
