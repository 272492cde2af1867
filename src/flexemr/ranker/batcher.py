"""Dynamic batching: requests that arrive within a short window are merged into one batch.

Each request is validated on its own first, so a bad one fails alone. Merging is `batch.concat`:
the merged batch's table t holds table t's bags of every request, in arrival order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from flexemr.batch import SparseBatch, concat
from flexemr.ranker.admission import Dropped, Refused, Ticket


@dataclass
class _Pending:
    batch: SparseBatch
    future: Future[np.ndarray]
    ticket: Ticket | None


def _still_wanted(pending: _Pending) -> bool:
    try:
        if pending.ticket is not None:
            pending.ticket.check()
    except Dropped as exc:
        pending.future.set_exception(exc)
        return False
    return True


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[SparseBatch], np.ndarray],
        max_batch: int,
        window_s: float,
        workers: int = 2,
        max_queued: int = 1024,
    ) -> None:
        self._run = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue(max_queued)
        self._workers = [
            threading.Thread(target=self._work, daemon=True, name=f"batcher-{i}") for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()
        self.merged_batches = 0
        self.merged_requests = 0

    def submit(self, batch: SparseBatch, ticket: Ticket | None = None) -> Future[np.ndarray]:
        """Queue `batch`; it is dropped (its future fails with `Dropped`) if `ticket` expires or its
        client leaves before its batch runs."""
        future: Future[np.ndarray] = Future()
        try:
            self._queue.put_nowait(_Pending(batch, future, ticket))
        except queue.Full:
            raise Refused(f"more than {self._queue.maxsize} requests are waiting; retry later") from None
        return future

    def _collect(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """`first` plus whatever arrives within the window and fits; and the request that did not fit."""
        group = [first]
        size = first.batch.batch_size
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the other workers see the stop signal too
                break
            if size + item.batch.batch_size > self.max_batch:
                return group, item  # does not fit: it leads this worker's next batch
            group.append(item)
            size += item.batch.batch_size
        return group, None

    def _work(self) -> None:
        carry: _Pending | None = None
        while (first := carry or self._queue.get()) is not None:
            group, carry = self._collect(first)
            group = [p for p in group if _still_wanted(p)]
            if not group:
                continue
            try:
                scores = self._run(concat([p.batch for p in group]))
            except Exception as exc:
                for pending in group:
                    pending.future.set_exception(exc)
                continue
            self.merged_batches += 1
            self.merged_requests += len(group)
            bounds = np.cumsum([p.batch.batch_size for p in group])[:-1]
            for pending, part in zip(group, np.split(scores, bounds), strict=True):
                pending.future.set_result(part)
        self._queue.put(None)

    def close(self) -> None:
        self._queue.put(None)
        for worker in self._workers:
            worker.join(5)
