"""The ranker: validate, route, look up remotely, pool globally, run the dense model.

    request -> validate -> route (one searchsorted) -> one subrequest per server, all in flight
            -> gather: index_add partial sums (or raw rows) into [T*B, D], each column block's
               answers into its columns where tables are split by column -> mean? divide
            -> dense forward on the device -> scores

Each subrequest goes to one replica of the rows it needs (`ranker.replicas`); one that fails or
times out is sent again, whole, to another replica. A lookup that still cannot complete fails the
whole request: a score is never computed from a partial set of rows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.cache import AdaptiveCacheManager
from flexemr.config import RankerConfig
from flexemr.config.cache import CacheConfig
from flexemr.config.plan import ShardingPlan
from flexemr.engine.link import ServerLink
from flexemr.model import rows as stored_rows
from flexemr.model.dlrm import DenseArch
from flexemr.model.spec import ModelSpec
from flexemr.ranker.admission import Ticket
from flexemr.ranker.batcher import DenseBatcher
from flexemr.ranker.replicas import ReplicaLoad
from flexemr.ranker.row_versions import RowReadVersion
from flexemr.ranker.turns import PROCESS_TURNS
from flexemr.sharding.router import RangeRouter, Subrequest, Uncovered
from flexemr.stats import counts
from flexemr.transport.base import (
    LookupFailed,
    LookupRequest,
    LookupTransport,
    NoReplica,
    ServerUnavailable,
    Stale,
    SubrequestRefused,
)
from flexemr.transport.local import LocalTransport

log = logging.getLogger(__name__)

MAX_VERSION_RETRIES = 4
"""Times a request is pooled again after the rows' version moved under it, before it fails."""


def _joined(answers: list[tuple[Subrequest, np.ndarray]]) -> np.ndarray:
    """The answers' values one after the other: the buffer they were received into (`Ranker._send`)
    when they fill it, in order (no subrequest failed over, the transport honoured `out`), else a
    copy. An abandoned subrequest's part of a buffer is never read: a late answer may land there."""
    buffer = answers[0][1].base
    if (
        isinstance(buffer, np.ndarray)
        and all(values.base is buffer for _, values in answers)
        and sum(values.shape[0] for _, values in answers) == buffer.shape[0]
    ):
        return buffer
    return np.concatenate([values for _, values in answers])


class _AllAnswers:
    """A gate that opens once every answer watched so far is in, or as soon as one fails, and
    stays open: one wake-up per request for the thread waiting on its subrequests. It is what
    `concurrent.futures.wait(FIRST_EXCEPTION)` gives, without that call's per-wait waiter objects,
    conditions and locks taken on every future (twice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gate = threading.Lock()
        self._gate.acquire()  # held while closed
        self._left = 0
        self._open = False

    def watch(
        self, sent: list[tuple[Subrequest, concurrent.futures.Future[np.ndarray]]]
    ) -> list[tuple[Subrequest, concurrent.futures.Future[np.ndarray]]]:
        """Watch the futures of `sent` (all counted before any can open the gate); returns `sent`."""
        with self._lock:
            self._left += len(sent)
        for _, future in sent:
            future.add_done_callback(self._finished)
        return sent

    def _finished(self, future: concurrent.futures.Future[np.ndarray]) -> None:
        failed = future.cancelled() or future.exception() is not None
        with self._lock:
            self._left -= 1
            if self._open or (self._left and not failed):
                return
            self._open = True
        self._gate.release()

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` for the gate to open."""
        if self._gate.acquire(timeout=timeout):
            self._gate.release()


@functools.cache
def dense_slots() -> threading.BoundedSemaphore:
    """The process's dense forwards that may run at once: as many as its cores hold at torch's
    intra-op thread count (set before the first ranker is built). Overlapping requests would
    otherwise split each op over more threads than there are cores, and every op waits for its
    slowest thread."""
    return threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) // torch.get_num_threads()))


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
        links: list[ServerLink] | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        """`links`: control links to the embedding servers; with them the ranker reads one version
        of every row per request (`ranker.row_versions`), without them whatever servers hold. `cache`:
        the cache's tuning (a spec's cache section); its mode, budget, wire and batch are `config`'s."""
        self.spec = spec
        self.config = config
        self._cache_tuning = cache or CacheConfig()
        self.router = RangeRouter(plan)
        self.transport = transport
        self.device = resolve_device(config.device)
        self.dense = dense.to(self.device).eval()
        self.samples = self.requests = 0
        self.load = ReplicaLoad(plan.num_servers)
        self.failovers = 0
        """Subrequests sent again to another replica after theirs failed or did not answer."""
        self._waiting = 0  # samples accepted and not yet scored: the load monitor's queue depth
        self._lock = threading.Lock()
        self.turns = PROCESS_TURNS  # given up while waiting; the caller takes one per request
        self.cache = self._make_cache()
        self._whole_store = (
            transport.stores[0] if isinstance(transport, LocalTransport) and self.router.identity else None
        )
        """The store holding every row at its key, in this process (the local tier), or None."""
        self.row_version = None if links is None else RowReadVersion(links, self.cache)
        self._stop = threading.Event()
        self._warmer: threading.Thread | None = None
        if self.cache is not None:
            self._warmer = threading.Thread(target=self._warm_loop, daemon=True, name="cache-warmer")
            self._warmer.start()
        self.batcher = (
            DenseBatcher(self.dense, config.max_batch, config.batch_window_ms / 1000)
            if config.batching or config.batch_window_ms > 0
            else None
        )

    def _make_cache(self) -> AdaptiveCacheManager | None:
        config = self.config
        if config.cache.kind == "off":
            return None
        return AdaptiveCacheManager.for_model(
            config.cache,
            self.dense,
            self.device,
            start=time.monotonic(),
            config=self._cache_tuning,
            wire=config.lookup,
            max_batch=config.max_batch,
            device_budget_bytes=config.device_memory_bytes,
        )

    def ready(self) -> bool:
        """Every row has a usable replica (with replicas, some servers may be down), and the rows'
        version is known (a fresh ranker has heard from the servers)."""
        if self.row_version is not None and not self.row_version.synced.is_set():
            return False
        return self.router.coverable(np.array(self.transport.connected(), dtype=bool))

    def score(
        self, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray, ticket: Ticket | None = None
    ) -> np.ndarray:
        """Click probabilities float32 [B]. Raises `InvalidRequest` for bad input,
        `ServerUnavailable` / `LookupFailed` when a lookup cannot complete, and `Dropped` when the
        ticket's deadline passes (or its client leaves) before the work starts. With dynamic batching
        on, its dense forward may be merged with those of requests that wait for the model with it.
        A caller holding a turn (the front door takes one per request) gives it up while this waits."""
        if ticket is not None:
            ticket.check()
        batch = SparseBatch(dense, indices, lengths)
        batch.check(self.spec, self.config.max_batch, self.config.max_indices_per_sample)
        with self._lock:
            self._waiting += batch.batch_size
        try:
            return self.score_batch(batch, ticket)
        finally:
            with self._lock:
                self._waiting -= batch.batch_size

    def score_batch(self, batch: SparseBatch, ticket: Ticket | None = None) -> np.ndarray:
        pooled = self._pool_one_version(batch, None if ticket is None else ticket.deadline)
        if ticket is not None:
            ticket.check()
        # The dense model runs in torch's kernels (or on the GPU), outside the interpreter lock:
        # other requests take their turn meanwhile.
        with self.turns.waiting(), torch.inference_mode():
            dense = torch.from_numpy(batch.dense).to(self.device)
            if self.batcher is not None:  # one forward at a time, merged with the waiting ones
                scores = self.batcher.run(dense, pooled, ticket)
            else:
                with dense_slots():
                    scores = self.dense(dense, pooled)
            result: np.ndarray = scores.float().cpu().numpy()
        with self._lock:
            self.requests += 1
            self.samples += batch.batch_size
        return result

    def _pool_one_version(self, batch: SparseBatch, deadline: float | None) -> torch.Tensor:
        """`pool` with every row at one version: pooled again, whole, after a server answers
        STALE and the read version moves (a few times at most, then the request fails)."""
        for _ in range(MAX_VERSION_RETRIES):
            with contextlib.ExitStack() as reading:
                with self.turns.waiting():  # a version change may be waiting for a turn to finish
                    version = reading.enter_context(self._reading())
                try:
                    return self.pool(batch, deadline, version)
                except Stale as exc:  # only a versioned lookup gets one
                    stale = exc
            assert self.row_version is not None
            with self.turns.waiting():
                self.row_version.stale(stale.version)
        raise LookupFailed(
            f"the rows' version changed {MAX_VERSION_RETRIES} times during the request (last: {stale})"
        )

    def _reading(self) -> contextlib.AbstractContextManager[int | None]:
        """The version to read, the same until the block ends (None: whatever servers hold)."""
        return contextlib.nullcontext() if self.row_version is None else self.row_version.reading()

    def pool(
        self, batch: SparseBatch, deadline: float | None = None, version: int | None = None
    ) -> torch.Tensor:
        """Pooled embeddings [B, T, D] on the device: cached rows summed locally, the rest gathered
        from every server that holds rows of the batch, by `deadline` (time.monotonic(); the
        request's) if it comes before the lookup timeout, at `version` (`Stale` if a server is
        at another)."""
        raw = self.config.lookup == "raw"
        store = self._whole_store
        if store is not None and self.cache is None and not raw:
            # The local tier: one call pools the batch, in the kernel and order a server would. With
            # one row format it is the kernel itself, without the store's checks of a subrequest
            # from the network (`SparseBatch.check` checked these rows against the tables). The
            # kernel drops the interpreter lock and the local tier's rows never change: the turn
            # is given up meanwhile, so two requests pool side by side as a server's would.
            keys, starts = self.router.keys(batch.indices, batch.rows_per_table), batch.offsets[:-1]
            if len(store.segments) == 1:
                rows, bags = torch.from_numpy(keys), torch.from_numpy(starts)
                with self.turns.waiting():
                    sums = stored_rows.pool(store.tables[0], store.segments[0].fmt, rows, bags)
            else:
                sums = torch.from_numpy(store.pooled(keys, starts))
            return self._finish_pooling(sums.to(self.device), batch)
        pooled = torch.zeros(batch.lengths.size, self.spec.dim, device=self.device)
        cache = self.cache
        route = functools.partial(self.router.route_batch, batch.indices, batch.rows_per_table, batch.lengths)
        if cache is not None:  # the cached rows are summed into `pooled`; the servers see the rest
            keys = self.router.keys(batch.indices, batch.rows_per_table)
            with self._lock:
                queued = max(self._waiting - batch.batch_size, 0)
            offsets = torch.from_numpy(batch.offsets)
            plan = cache.plan_batch(torch.from_numpy(keys), offsets, batch.batch_size, queued, pooled)
            route = functools.partial(self.router.route, *plan.remote(keys, batch.lengths))
        answers = list(self._lookup(route, raw, deadline, version))
        if self.router.split:
            for sub, values in answers:  # each column block's sums into its columns
                rows = torch.from_numpy(values).to(self.device)
                bags = torch.from_numpy(sub.row_bags() if raw else sub.bags).to(self.device)
                for part, first, last in self.router.column_runs(sub, raw):
                    pooled[:, first:last].index_add_(0, bags[part], rows[part, : last - first])
        elif answers:  # one index_add_ over every answer
            bag_ids = torch.from_numpy(
                np.concatenate([sub.row_bags() if raw else sub.bags for sub, _ in answers])
            )
            pooled.index_add_(0, bag_ids.to(self.device), torch.from_numpy(_joined(answers)).to(self.device))
        if cache is not None:  # raw rows are cached whole; the lookup is timed for the cost gate
            whole_keys, whole_rows = self.router.whole_rows(answers if raw else [])
            cache.finish(plan, [torch.from_numpy(whole_keys)], [torch.from_numpy(whole_rows)])
        return self._finish_pooling(pooled, batch)

    def _finish_pooling(self, sums: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
        """[T*B, D] bag sums -> [B, T, D] pooled embeddings (means, for mean pooling)."""
        if self.spec.pooling == "mean":
            sums /= torch.from_numpy(batch.lengths).to(self.device).clamp(min=1).unsqueeze(1)
        return sums.view(batch.num_tables, batch.batch_size, self.spec.dim).transpose(0, 1)

    def _lookup(
        self,
        route: Callable[[np.ndarray], Iterator[Subrequest]],
        raw: bool,
        deadline: float | None = None,
        version: int | None = None,
    ) -> Iterator[tuple[Subrequest, np.ndarray]]:
        """Send the subrequests that `route` (given the servers' rank, `RangeRouter.route`) makes,
        one per server holding rows of the batch, each to one replica of the rows it needs, all in
        flight at once; yield each with its answer. A
        subrequest whose replica fails, is stalled, does not answer in time or is behind `version`
        (STALE) is sent again, whole, to another replica (its late answer, if any, is never used);
        the lookup fails only when no replica of some rows is left, or the time (the lookup
        timeout, or the request's earlier `deadline`) runs out."""
        start = time.monotonic()
        limit = start + self.config.request_timeout_s
        deadline = limit if deadline is None else min(limit, deadline)
        timeout = max(deadline - start, 0.0)
        failed: set[int] = set()
        waited_out: set[concurrent.futures.Future[np.ndarray]] = set()  # had their share of time
        answers = _AllAnswers()

        def send(
            subs: Iterator[Subrequest],
        ) -> list[tuple[Subrequest, concurrent.futures.Future[np.ndarray]]]:
            return answers.watch(self._send(subs, raw, version))

        pending = collections.deque(send(route(self._rank(failed))))
        while pending:
            sub, future = pending.popleft()
            left = max(deadline - time.monotonic(), 0.0)
            # With a replica to fall back on, one try may take half of what is left.
            wait = left / 2 if self.router.max_copies > 1 else left
            try:
                if not future.done() and future not in waited_out:
                    waited_out |= self._await_answers(future, [f for _, f in pending], wait, answers)
                values = future.result(timeout=0)
            except (ServerUnavailable, SubrequestRefused, concurrent.futures.TimeoutError) as exc:
                reason = str(exc) or f"no answer within {wait:.3g} s"
                if self.router.max_copies == 1 or time.monotonic() >= deadline:  # nothing to fall back on
                    if isinstance(exc, concurrent.futures.TimeoutError):
                        raise ServerUnavailable(
                            sub.server, f"#{sub.server}", f"no answer within {timeout:.3g} s"
                        ) from None
                    raise
                failed.add(sub.server)
                with self._lock:
                    self.failovers += 1
                log.info(
                    "subrequest to embedding server %d failed (%s); trying another replica",
                    sub.server,
                    reason,
                )
                pending.extend(send(self._reroute(sub, failed)))
                continue
            except Stale as exc:
                # A replica behind the read version (down while it was decided, or one that cannot
                # prove it holds it): another replica may be at it. Ahead of it: the version moves.
                if version is None or exc.version > version or self.router.max_copies == 1:
                    raise
                failed.add(sub.server)
                with self._lock:
                    self.failovers += 1
                try:
                    pending.extend(send(self._reroute(sub, failed)))
                except NoReplica:
                    raise exc from None
                continue
            yield sub, values

    def _await_answers(
        self,
        first: concurrent.futures.Future[np.ndarray],
        others: list[concurrent.futures.Future[np.ndarray]],
        wait: float,
        answers: _AllAnswers,
    ) -> set[concurrent.futures.Future[np.ndarray]]:
        """Wait up to `wait` for `first`, waking once when every answer is in rather than once per
        answer (or earlier when one fails: `answers`); the turn is given up meanwhile. Returns the
        futures among `first` and `others` that were waited on for all of `wait` and are still out:
        each has had its share of the time."""
        start = time.monotonic()
        with self.turns.waiting():
            answers.wait(wait)
            if not first.done():  # another one failed early: `first` still has the rest of its time
                concurrent.futures.wait([first], max(start + wait - time.monotonic(), 0.0))
        if time.monotonic() - start < wait:
            return set()
        return {f for f in (first, *others) if not f.done()}

    def _rank(self, failed: set[int]) -> np.ndarray:
        usable = np.array(self.transport.connected(), dtype=bool)
        usable[list(failed)] = False
        if self.router.max_copies == 1:  # one holder per row: no load to balance, only usability
            return np.where(usable, 0.0, np.inf)
        return self.load.rank(usable)

    def _reroute(self, sub: Subrequest, failed: set[int]) -> Iterator[Subrequest]:
        """`sub`'s keys, routed again away from the `failed` servers, with their batch bag ids."""
        yield from self.router.route_again(sub, self._rank(failed))

    def _send(
        self, subs: Iterator[Subrequest], raw: bool, version: int | None
    ) -> list[tuple[Subrequest, concurrent.futures.Future[np.ndarray]]]:
        try:
            routed = list(subs)
        except Uncovered as exc:
            raise NoReplica(exc.servers, str(exc)) from None
        # Every answer is received into one buffer, in order (`_joined`): one index_add_ adds them
        # up (column blocks are narrower: each is added into its columns from an array of its own).
        sizes = [sub.rows.size if raw else sub.offsets.size for sub in routed]
        ends = np.cumsum(sizes, dtype=np.int64).tolist()
        buffer = None if self.router.split else np.empty((sum(sizes), self.spec.dim), dtype=np.float32)
        sent = []
        for sub, start, end in zip(routed, np.subtract(ends, sizes).tolist(), ends, strict=True):
            out = None if buffer is None else buffer[start:end]
            request = LookupRequest(sub.rows, sub.offsets, raw=raw, version=version, out=out)
            future = self.transport.submit(sub.server, request)
            self.load.sent(sub.server, future)
            sent.append((sub, future))
        return sent

    def replica_health(self) -> dict[str, Any]:
        """Which servers are usable, and whether every row still has a usable replica."""
        connected = self.transport.connected()
        down = [i for i, up in enumerate(connected) if not up]
        return {
            "replicas": self.router.replicas,
            "servers_up": len(connected) - len(down),
            "servers_down": down,
            "degraded": bool(down),
            "every_shard_served": self.router.coverable(np.array(connected, dtype=bool)),
        }

    def _warm_loop(self) -> None:
        """Fill the cache's free room with the hottest rows it misses, fetched raw in the
        background; requests never wait for it."""
        assert self.cache is not None
        while not self._stop.wait(0.05):
            request = self.cache.warm_candidates(min(self.cache.free_rows() or 64, 8192))
            if request.keys.numel() == 0:
                continue
            keys = np.sort(request.keys.cpu().numpy())
            # At the read version, admitted before it can move: no cached row is of another one.
            try:
                with self._reading() as version:
                    lengths = np.ones(keys.size, dtype=np.int64)
                    route = functools.partial(self.router.route, keys, lengths)
                    answers = list(self._lookup(route, True, None, version))
                    whole_keys, whole_rows = self.router.whole_rows(answers)  # slices side by side
                    self.cache.admit(
                        torch.from_numpy(whole_keys), torch.from_numpy(whole_rows), request.token
                    )
            except (ServerUnavailable, LookupFailed):
                continue  # a later round retries; requests report failures (and move the version)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            **counts({"requests": self.requests, "samples": self.samples, "failovers": self.failovers}),
            "replicas": {
                **{k: v for k, v in self.replica_health().items() if k != "servers_down"},
                "outstanding": self.load.outstanding(),  # per server (the transport says which is down)
            },
            "transport": self.transport.stats(),
        }
        if self.cache is not None:
            cache = self.cache.stats()
            stats["cache"] = {
                k: v for k, v in dataclasses.asdict(cache).items() if isinstance(v, int | float)
            }
        if self.row_version is not None:
            stats["versions"] = self.row_version.stats()
        if self.batcher is not None:
            stats["batcher"] = counts({"batches": self.batcher.batches, "requests": self.batcher.requests})
        return stats

    def close(self) -> None:
        self._stop.set()
        if self._warmer is not None:
            self._warmer.join(5)
        self.transport.close()
        if self.row_version is not None:
            self.row_version.close()
