"""One request's Python at a time: the ranker's request threads take turns instead of fighting
over the interpreter lock.

Threads that run Python side by side hand the GIL back and forth at every numpy call that drops
it: with 8 requests in flight a ranker made ~400 context switches per request and scored half as
many requests per second as with one. A thread holds its turn while it computes (parse, route,
gather, encode) and gives it up while it waits (for the embedding servers, the dense model's
kernels, a dynamic batch), so waits still overlap with other requests' work.

The turn is handed on, not grabbed: when it is given up, the waiting thread that took its first
turn earliest gets it (a request that has started finishes before newer ones start, and none is
overtaken without end). A plain lock lets whichever thread the OS runs first take it, so a
request back from the dense model could lose its turn to every request that arrived meanwhile.

    with turns.turn():            # reentrant in the same thread
        ...compute...
        with turns.waiting():     # gives the turn up only if this thread holds it
            future.result()
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class InterpreterTurns:
    """Who may run Python now: one request thread at a time (reentrant), given up while it waits,
    handed on to the waiting thread whose first turn began earliest."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy = False
        """A thread holds the turn. While it does, the waiters queue; giving it up hands it on."""
        self._waiters: list[tuple[float, int, threading.Lock]] = []
        """A heap of (first turn's start, arrival order, the gate its thread sleeps on)."""
        self._order = itertools.count()
        self._thread = threading.local()

    def _holds(self) -> bool:
        return getattr(self._thread, "holds", False)

    def _take(self, since: float) -> None:
        with self._mutex:
            if not self._busy:
                self._busy = True
                return
            gate = threading.Lock()
            gate.acquire()
            heapq.heappush(self._waiters, (since, next(self._order), gate))
        gate.acquire()  # opened by the holder that hands the turn to this thread

    def _give_up(self) -> None:
        with self._mutex:
            if self._waiters:
                heapq.heappop(self._waiters)[2].release()  # still busy: the turn changes hands
            else:
                self._busy = False

    @contextmanager
    def turn(self) -> Iterator[None]:
        if self._holds():
            yield
            return
        self._thread.since = time.monotonic()
        self._take(self._thread.since)
        self._thread.holds = True
        try:
            yield
        finally:
            self._thread.holds = False
            self._give_up()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        if not self._holds():
            yield
            return
        self._thread.holds = False
        self._give_up()
        try:
            yield
        finally:
            self._take(self._thread.since)  # queued by its first turn's start, ahead of newer requests
            self._thread.holds = True


PROCESS_TURNS = InterpreterTurns()
"""The process's turns: it has one interpreter lock, so every ranker and model version in it, and
the front door that takes a turn per request, share one set."""
