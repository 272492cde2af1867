"""Which replica of a shard to ask: the usable holder with the fewest outstanding subrequests.

The ranker counts the subrequests it has sent to each server and not yet seen finish. Per batch it
ranks the servers by that count, with a random fraction added to break ties (so equal replicas share
the load, and every piece with the same holders picks the same one within a batch, keeping the fan
out low); a server that is not usable (down or stalled by the heartbeat, or failed this request)
ranks infinite and is never chosen. The router turns the ranking into one holder per piece.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np


class ReplicaLoad:
    def __init__(self, num_servers: int) -> None:
        self._outstanding = np.zeros(num_servers, dtype=np.int64)
        self._lock = threading.Lock()
        self._rng = np.random.default_rng()

    def rank(self, usable: np.ndarray) -> np.ndarray:
        """float64 [servers]: lower is preferred; inf where `usable` is False."""
        with self._lock:
            rank = self._outstanding.astype(np.float64)
            rank += self._rng.random(rank.size)
        rank[~usable] = np.inf
        return rank

    def sent(self, server: int, future: Future[Any]) -> None:
        """Count a subrequest to `server` until its future finishes."""
        with self._lock:
            self._outstanding[server] += 1

        def finished(_: Future[Any]) -> None:
            with self._lock:
                self._outstanding[server] -= 1

        future.add_done_callback(finished)

    def outstanding(self) -> list[int]:
        with self._lock:
            return [int(n) for n in self._outstanding]
