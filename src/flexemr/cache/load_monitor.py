"""Is the ranker under load, and what batch size must memory be planned for? A pure policy.

Each batch reports its size and the queue depth behind it (samples waiting), with the time. The
load is the mean of `batch_size + queue_depth` over a sliding time window, as a fraction of
`max_batch`. Two thresholds and a dwell time keep the state from flapping:

    LOW  -> HIGH  when load >= enter_high  (and LOW has lasted min_dwell_s)
    HIGH -> LOW   when load <= exit_high   (and HIGH has lasted min_dwell_s)

The planned batch size is what the dense network's memory must be sized for:
HIGH: `max_batch` (the batcher may fill batches at any moment); LOW: the largest batch in the
window rounded up to a power of two (few distinct plans, so few cache resizes). It is never below
the batch about to run, whatever the state or dwell says.

No threads, no clock: time comes in as an argument (monotonic seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from flexemr.config.cache import LoadMonitorConfig

LoadState = Literal["low", "high"]


@dataclass(frozen=True)
class LoadDecision:
    state: LoadState
    plan_batch: int
    """Batch size to plan memory for (>= the batch about to run)."""
    load: float
    """Window mean of (batch + queue) / max_batch."""
    changed: bool
    """The state changed with this observation."""


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class LoadMonitor:
    def __init__(self, config: LoadMonitorConfig, max_batch: int, start: float = 0.0) -> None:
        """`max_batch`: the largest batch the ranker forms; loads are fractions of it."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.config = config
        self.max_batch = max_batch
        self.state: LoadState = "low"
        self._since = start
        self._now = start
        self._window: deque[tuple[float, int, int]] = deque()  # (time, batch_size, demand)

    @property
    def last_time(self) -> float:
        """The time of the latest observation."""
        return self._now

    def observe(self, batch_size: int, queue_depth: int, now: float) -> LoadDecision:
        """Record a batch about to run and decide the state and the batch size to plan for."""
        if batch_size < 0 or queue_depth < 0:
            raise ValueError(f"batch_size and queue_depth must be >= 0, got {batch_size}, {queue_depth}")
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        cfg = self.config
        self._now = now
        self._window.append((now, batch_size, batch_size + queue_depth))
        while self._window[0][0] < now - cfg.window_s:
            self._window.popleft()
        load = sum(d for _, _, d in self._window) / len(self._window) / self.max_batch

        previous = self.state
        if now - self._since >= cfg.min_dwell_s:
            if self.state == "low" and load >= cfg.enter_high:
                self.state = "high"
            elif self.state == "high" and load <= cfg.exit_high:
                self.state = "low"
        if self.state != previous:
            self._since = now

        if self.state == "high":
            plan = self.max_batch
        else:
            plan = min(next_power_of_two(max(b for _, b, _ in self._window)), self.max_batch)
        return LoadDecision(self.state, max(plan, batch_size), load, self.state != previous)
