"""Dynamic batching of the dense model: one forward at a time, the requests that arrive while it
runs merged into the next one.

Each request pools its own embeddings (its lookups overlap with other requests' work); only the
dense model is shared. A request that finds the model idle runs its forward at once, in its own
thread (no window, no thread hop). Requests that arrive while a forward runs queue; when it ends,
the oldest of them runs one forward for as many of them as fit `max_batch` samples, and hands the
model on to the next one still queued, if any. So the model is never idle while a request waits,
a forward grows with the load (a merged forward costs less than its parts one by one: little
for rmc1's small MLPs on a CPU, 0.98 ms for 540 pairs against 2 x 0.51 ms, more on a GPU), and a
request waits for the forward in progress and, only when more than `max_batch` samples queued
before it, for the forwards of those.

    scores = batcher.run(dense, pooled)   # [B] for this request's [B, F] and [B, T, D]
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexemr.ranker.admission import Ticket

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""The dense model: (dense features [B, F], pooled embeddings [B, T, D]) -> scores [B]."""


@dataclass(eq=False)
class _Request:
    dense: torch.Tensor
    pooled: torch.Tensor
    ticket: Ticket | None
    done: threading.Event = field(default_factory=threading.Event)
    scores: torch.Tensor | None = None
    error: BaseException | None = None
    leads: bool = False
    """Handed the model: this request's thread runs the next forward."""

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])

    def still_wanted(self) -> bool:
        """False (and its error set: `Dropped`) if its deadline passed or its client left."""
        try:
            if self.ticket is not None:
                self.ticket.check()
        except Exception as exc:
            self.error = exc
            return False
        return True

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        assert self.scores is not None
        return self.scores


class DenseBatcher:
    def __init__(self, forward: Forward, max_batch: int, window_s: float = 0.0) -> None:
        """`window_s`: how long a forward waits for more requests before it starts, unless
        `max_batch` samples are queued (0: it takes only those already waiting)."""
        self._forward = forward
        self.max_batch = max_batch
        self.window_s = window_s
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._queued_samples = 0
        self._running = False
        self.batches = 0
        """Forwards run."""
        self.requests = 0
        """Requests they scored."""

    def run(self, dense: torch.Tensor, pooled: torch.Tensor, ticket: Ticket | None = None) -> torch.Tensor:
        """Scores [B] of one request, computed alone or merged with others that wait meanwhile.
        Call it in inference mode; the forward's error, if any, is raised in every request it had.
        `Dropped` if `ticket`'s deadline passes (or its client leaves) before its forward starts."""
        request = _Request(dense, pooled, ticket)
        with self._lock:
            self._queue.append(request)
            self._queued_samples += request.size
            self._filled.notify()
            leads, self._running = not self._running, True
        if not leads:
            request.done.wait()
            if not request.leads:
                return request.result()
        group = self._take()
        assert group[0] is request  # the one handed the model is the oldest still queued
        self._score(group)
        self._hand_on()
        return request.result()

    def _take(self) -> list[_Request]:
        """The oldest queued requests that fit `max_batch` samples (at least one), after the window."""
        with self._lock:
            if self.window_s > 0:
                deadline = time.monotonic() + self.window_s
                while self._queued_samples < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._filled.wait(left)
            group = [self._queue.popleft()]
            size = group[0].size
            while self._queue and size + self._queue[0].size <= self.max_batch:
                size += self._queue[0].size
                group.append(self._queue.popleft())
            self._queued_samples -= size
            return group

    def _score(self, group: list[_Request]) -> None:
        """One forward for the requests of `group` still wanted; then every one but the first (the
        caller's) is told."""
        wanted = [r for r in group if r.still_wanted()]
        try:
            if len(wanted) == 1:
                wanted[0].scores = self._forward(wanted[0].dense, wanted[0].pooled)
            elif wanted:
                dense = torch.cat([r.dense for r in wanted])
                pooled = torch.cat([r.pooled for r in wanted])
                parts = torch.split(self._forward(dense, pooled), [r.size for r in wanted])
                for r, part in zip(wanted, parts, strict=True):
                    r.scores = part
        except Exception as exc:
            for r in wanted:
                r.error = exc
        if wanted:
            with self._lock:
                self.batches += 1
                self.requests += len(wanted)
        for r in group[1:]:
            r.done.set()

    def _hand_on(self) -> None:
        """The model to the oldest queued request, or idle if none waits."""
        with self._lock:
            if self._queue:
                self._queue[0].leads = True
                self._queue[0].done.set()
            else:
                self._running = False
