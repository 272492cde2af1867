"""Bounds sized by latency: on requests in flight (`LatencyLimit`, a gradient limit in the spirit of
TCP Vegas), and on how long a request may have waited before it was read (`WaitBound`, CoDel's
adaptive timeout).

A ranker's requests share one interpreter and a few cores: past the few in flight that keep them
busy (one computing while another waits for its lookups), one more only waits, and every request
takes longer (Little's law: in flight = throughput x latency). Each answered request reports its
latency, from its headers to its answer, and whether it was alone (nothing else in flight when it
came, nor when it was answered): the least latency of a lone request in the last `BASE_WINDOW_S` is
the unloaded latency (under overload it may fall, never rise: a request alone among refusals is
slowed by them). Over each interval, the median latency decides:

    median > 3 x unloaded, and more requests refused than answered (over twice what is served
    comes): requests queue; the limit shrinks in proportion (x 3 unloaded / median, by half at most)
    otherwise (limit in use): the limit grows by one

so the requests admitted keep a few times their unloaded latency and the rest are refused at once
(HTTP 429). Short of that overload the limit does not shrink: clients that keep N requests in
flight (a closed loop, a pool of N threads) chose that queue, and refusing some of them would only
make them retry (8 keep-alive clients that retried at once got ~40% fewer answers); under Poisson
arrivals at 75% of the capacity the median is 4-5x the unloaded latency, and a burst's refusals
must not collapse the limit (shrinking on any refusal refused 7-10% of such requests). The limit
keeps at least two (one request computes while another waits for its lookups): at 3x the peak on
two shared cores it sits there, and a least of one (or a tolerance of 2) gave less goodput for
little less latency. Where requests overlap without slowing each other (lookups on embedding
servers, a dynamic batch filling), the median does not rise and the limit does. Under sustained
overload no request is alone: when none was for `BASE_WINDOW_S`, the limit drops to one until one
is (as BBR probes its round-trip time), and the unloaded latency is what that lone request took (a
slower model or host is followed) rather than taken from a queue.
"""

from __future__ import annotations

import collections
import math
import statistics

TOLERANCE = 3.0
"""An interval whose median latency passes this many times the unloaded latency has a queue."""
INTERVAL_S = 0.1
BASE_WINDOW_S = 10.0
"""The unloaded latency is the least of a lone request's over this long: it follows a model or a
host that changed."""


class LatencyLimit:
    def __init__(
        self,
        initial: int = 8,
        minimum: int = 2,
        maximum: int = 1024,
        tolerance: float = TOLERANCE,
        interval_s: float = INTERVAL_S,
        base_window_s: float = BASE_WINDOW_S,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        if tolerance <= 1:
            raise ValueError(f"need a tolerance above 1, got {tolerance}")
        self.minimum = minimum
        """The least a queue shrinks the limit to (a probe takes it to one)."""
        self.maximum = maximum
        self.tolerance = tolerance
        self.interval_s = interval_s
        self.base_window_s = base_window_s
        self.limit = initial
        self.probing: int | None = None
        """While the unloaded latency is measured again: the limit to return to."""
        self._latencies: list[float] = []
        self._alone = math.inf  # the least latency of a lone request this interval
        self._in_use = 0  # the most requests in flight this interval
        self._unloaded: collections.deque[tuple[float, float]] = collections.deque()
        """(interval end, least latency of a lone request) of the last `base_window_s`; under
        overload none expires, and only a new least is added."""
        self._last_lone = math.nan  # when a lone request was last answered (first: the first answer)
        self._refused = 0  # requests refused before this interval
        self._interval_end = -math.inf

    @property
    def unloaded_s(self) -> float:
        """The unloaded latency: the least of a lone request's lately (inf: none lately)."""
        return min((least for _, least in self._unloaded), default=math.inf)

    def observe(self, latency_s: float, alone: bool, in_flight: int, refused: int, now: float) -> None:
        """A request was answered `latency_s` after it arrived, `alone` or with `in_flight` requests
        in flight (itself included), when `refused` requests had been refused so far (by any
        bound); `now` is time.monotonic()."""
        self._latencies.append(latency_s)
        if alone:
            self._alone = min(self._alone, latency_s)
        self._in_use = max(self._in_use, in_flight)
        if now < self._interval_end:
            return
        overloaded = refused - self._refused > len(self._latencies)  # more refused than answered
        if self._alone < math.inf or math.isnan(self._last_lone):
            self._last_lone = now
        # Under overload a request alone in flight is slowed by the refusals around it: the
        # unloaded latency may fall then, never rise (by the least before it expiring), or the
        # limit would grow with the latency it bounds.
        if self._alone < (self.unloaded_s if overloaded else math.inf):
            self._unloaded.append((now, self._alone))
        while not overloaded and self._unloaded and self._unloaded[0][0] < now - self.base_window_s:
            self._unloaded.popleft()
        if self.probing is not None:
            if self._alone < math.inf:  # measured alone at a limit of one: that is the latency now
                self._unloaded = collections.deque([(now, self._alone)])
                self.limit, self.probing = self.probing, None
        elif now - self._last_lone > self.base_window_s and overloaded:  # measure again
            self.limit, self.probing = 1, self.limit
        else:  # (no unloaded latency yet: the target is infinite, the limit only grows)
            target = self.tolerance * self.unloaded_s
            median = statistics.median(self._latencies)
            if median > target and overloaded:
                self.limit = max(self.minimum, int(self.limit * max(0.5, target / median)))
            elif 2 * self._in_use >= self.limit:  # grow only a limit in use
                self.limit = min(self.maximum, self.limit + 1)
        self._latencies, self._alone, self._in_use, self._refused = [], math.inf, 0, refused
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

    That wait is invisible to `LatencyLimit` (it counts from the headers' reading), and under overload
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
