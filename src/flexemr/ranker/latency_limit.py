"""A bound on requests in flight sized by their queueing delay (CoDel's test for a standing queue).

A ranker's requests share one interpreter and a few cores: past a handful in flight, one more only
waits. Each request reports how long it waited between arriving and starting its work (its turn).
Over every interval, the least of those waits says whether a queue stands:

    least wait > target:  even the luckiest request waited: a queue stands; the limit shrinks 10%
    otherwise (limit in use): requests start at once; the limit grows by 1/8

so admitted requests keep about their unloaded latency and the rest are refused at once (HTTP
429), which costs next to nothing. Where requests overlap without waiting (lookups on embedding
servers, a dynamic batch filling), no queue stands and the limit rises.
"""

from __future__ import annotations

import math

TARGET_S = 0.005
"""A wait every request of an interval exceeded means a standing queue."""
INTERVAL_S = 0.1


class LatencyLimit:
    def __init__(
        self,
        minimum: int = 8,
        maximum: int = 1024,
        target_s: float = TARGET_S,
        interval_s: float = INTERVAL_S,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        self.minimum = minimum
        self.maximum = maximum
        self.target_s = target_s
        self.interval_s = interval_s
        self.limit = minimum
        self._least = math.inf
        self._interval_end = -math.inf

    def observe(self, waited_s: float, in_flight: int, now: float) -> None:
        """A request started its work after waiting `waited_s`, with `in_flight` requests in flight;
        `now` is time.monotonic()."""
        self._least = min(self._least, waited_s)
        if now < self._interval_end:
            return
        if self._least > self.target_s:
            self.limit = max(self.minimum, int(self.limit * 0.9))
        elif 2 * in_flight >= self.limit:  # grow only a limit in use
            self.limit = min(self.maximum, self.limit + max(1, self.limit // 8))
        self._least = math.inf
        self._interval_end = now + self.interval_s
