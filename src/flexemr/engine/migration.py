"""When to move a connection between I/O threads: a pure policy, fed samples, returning moves.

Every tick the engine reports how many subrequests each connection has queued or in flight, and
which thread owns it. The policy sums each connection's samples over a sliding window, adds them
up per thread, and when the busiest thread carries more than `imbalance` times the load of the
least busy one (and at least `min_load` more), proposes moving one connection from the busiest to
the least busy thread: the one whose load best halves the gap, and only if moving it narrows the
gap (so a single hot connection never ping-pongs). After a move it waits `cooldown` ticks, and a
connection just moved is not moved again within `2 * cooldown` ticks: the hysteresis.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    connection: int
    source: int
    target: int


class MigrationPolicy:
    def __init__(
        self,
        threads: int,
        window: int = 10,
        imbalance: float = 1.5,
        min_load: float = 4.0,
        cooldown: int = 10,
    ) -> None:
        if threads < 1 or window < 1 or imbalance < 1.0 or cooldown < 0:
            raise ValueError(
                f"bad migration policy: threads={threads} window={window} imbalance={imbalance} "
                f"cooldown={cooldown} (need threads, window >= 1, imbalance >= 1, cooldown >= 0)"
            )
        self.threads = threads
        self.window = window
        self.imbalance = imbalance
        self.min_load = min_load
        self.cooldown = cooldown
        self._samples: dict[int, deque[int]] = {}
        self._tick = 0
        self._last_move = -(10**9)
        self._moved_at: dict[int, int] = {}

    def observe(self, queued: dict[int, int], owners: dict[int, int]) -> Move | None:
        """One tick: `queued[c]` subrequests on connection c, owned by thread `owners[c]`."""
        self._tick += 1
        for conn, n in queued.items():
            self._samples.setdefault(conn, deque(maxlen=self.window)).append(n)
        for conn in list(self._samples):
            if conn not in queued:
                del self._samples[conn]
        if self._tick - self._last_move <= self.cooldown:
            return None
        load = {conn: sum(s) / len(s) for conn, s in self._samples.items()}
        per_thread = [0.0] * self.threads
        for conn, value in load.items():
            per_thread[owners[conn]] += value
        busiest = max(range(self.threads), key=lambda t: per_thread[t])
        idlest = min(range(self.threads), key=lambda t: per_thread[t])
        gap = per_thread[busiest] - per_thread[idlest]
        if gap < self.min_load or per_thread[busiest] < self.imbalance * per_thread[idlest]:
            return None
        candidates = [
            conn
            for conn, owner in owners.items()
            if owner == busiest
            and 0 < load.get(conn, 0.0) < gap
            and self._tick - self._moved_at.get(conn, -(10**9)) > 2 * self.cooldown
        ]
        if not candidates:
            return None
        best = min(candidates, key=lambda c: (abs(load[c] - gap / 2), c))
        self._last_move = self._tick
        self._moved_at[best] = self._tick
        return Move(best, busiest, idlest)
