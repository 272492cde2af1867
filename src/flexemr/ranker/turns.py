"""One request's Python at a time: the ranker's request threads take turns instead of fighting
over the interpreter lock.

Threads that run Python side by side hand the GIL back and forth at every numpy call that drops
it: with 8 requests in flight a ranker made ~400 context switches per request and scored half as
many requests per second as with one. A thread holds its turn while it computes (parse, route,
gather, encode) and gives it up while it waits (for the embedding servers, the dense model's
kernels, a dynamic batch), so waits still overlap with other requests' work.

    with turns.turn():            # reentrant in the same thread
        ...compute...
        with turns.waiting():     # gives the turn up only if this thread holds it
            future.result()
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class InterpreterTurns:
    """Who may run Python now: one request thread at a time (reentrant), given up while it waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = threading.local()

    def _holds(self) -> bool:
        return getattr(self._held, "value", False)

    @contextmanager
    def turn(self) -> Iterator[None]:
        if self._holds():
            yield
            return
        with self._lock:
            self._held.value = True
            try:
                yield
            finally:
                self._held.value = False

    @contextmanager
    def waiting(self) -> Iterator[None]:
        if not self._holds():
            yield
            return
        self._held.value = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._held.value = True


PROCESS_TURNS = InterpreterTurns()
"""The process's turns: it has one interpreter lock, so every ranker and model version in it, and
the front door that takes a turn per request, share one set."""
