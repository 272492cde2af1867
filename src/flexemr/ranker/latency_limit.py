"""Bounds sized by queueing delay: on requests in flight (`LatencyLimit`, CoDel's test for a
standing queue), and on how long a request may have waited before it was read (`WaitBound`).

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


SHORT_WAIT_S = 0.010
"""While a queue stands before admission, a request that waited longer than this is refused."""
LONG_WAIT_S = 1.0
"""Otherwise (a burst, a scheduling hiccup) it may have waited up to this long."""
QUEUE_ARRIVALS = 10
"""Fewer arrivals in an interval are no standing queue, however long they waited (a loaded host's
scheduler can hold a lone request for tens of milliseconds)."""


class WaitBound:
    """How long a request may have waited before the process read its headers (in the kernel's
    listen and receive queues, or behind the event loop) and still be admitted.

    That wait is invisible to `LatencyLimit` (it starts counting at admission), and under overload
    it is where the queue grows: past a point, every admitted request arrives too late to be worth
    computing. CoDel's adaptive queue timeout, as "Fail at Scale" (ACM Queue 13(8), 2015) applies it:

        last interval: >= 10 arrivals, least wait > short:  a queue stands; refuse waits > short
        otherwise:                                          refuse only waits > long

    A refusal is a few bytes written, so refusing the stale ones drains the queue fast, and the
    requests that are admitted are fresh ones that can still get their unloaded latency."""

    def __init__(
        self, short_s: float = SHORT_WAIT_S, long_s: float = LONG_WAIT_S, interval_s: float = INTERVAL_S
    ) -> None:
        if not 0 < short_s <= long_s:
            raise ValueError(f"need 0 < short_s <= long_s, got {short_s}, {long_s}")
        self.short_s = short_s
        self.long_s = long_s
        self.interval_s = interval_s
        self.standing = False
        """Whether a queue stood over the last interval."""
        self._least = math.inf
        self._arrivals = 0
        self._interval_end = -math.inf

    def too_late(self, waited_s: float, now: float) -> bool:
        """Whether a request arriving at `now` (time.monotonic()) after waiting `waited_s` before its
        headers were read should be refused."""
        if now >= self._interval_end:  # this request opens the next interval
            self.standing = self._arrivals >= QUEUE_ARRIVALS and self._least > self.short_s
            self._least, self._arrivals = math.inf, 0
            self._interval_end = now + self.interval_s
        self._least = min(self._least, waited_s)
        self._arrivals += 1
        return waited_s > (self.short_s if self.standing else self.long_s)
