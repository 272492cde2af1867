"""The liveness of one embedding server as the ranker's heartbeat sees it (pure bookkeeping).

The control channel pings the server every `heartbeat_interval_s`; a server whose oldest
unanswered ping is older than `heartbeat_timeout_s` (stopped, deadlocked, or its host gone quiet)
is `stalled`; one whose control connection broke is `down`. Either way it is not ready and no
subrequest goes to it; the first answer re-admits it. Readiness reads this, and so can a router
choosing among replicas.

A ping counts as unanswered only once the control thread has looked for its answer past the
timeout and found none: on a ranker starved of CPU the answer may be waiting, unread, in the
socket, and the server is not the one that stalled. A control thread that has not looked for
`STUCK_TIMEOUTS` timeouts (blocked in a send to a server that stopped reading) stalls it anyway.
"""

from __future__ import annotations

import threading
from typing import Literal

HealthState = Literal["up", "stalled", "down"]

STUCK_TIMEOUTS = 5
"""Timeouts without a look at the socket after which the control thread is taken to be stuck."""


class ServerHealth:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.state: HealthState = "up"
        self.reason = ""
        self._unanswered_since: float | None = None
        self._looked_at = 0.0
        """When the control thread last read every answer that had come."""
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.state == "up"

    def pinged(self, now: float) -> None:
        with self._lock:
            if self._unanswered_since is None:
                self._unanswered_since = now

    def answered(self) -> bool:
        """The server answered a ping; True when that re-admits it."""
        with self._lock:
            self._unanswered_since = None
            back = self.state != "up"
            self.state, self.reason = "up", ""
            return back

    def looked(self, now: float) -> None:
        """The control thread read every answer that had come by `now`."""
        with self._lock:
            self._looked_at = now

    def check(self, now: float) -> bool:
        """True when this check finds the server newly stalled."""
        with self._lock:
            since = self._unanswered_since
            if self.state != "up" or since is None:
                return False
            unanswered = self._looked_at - since > self.timeout_s
            if not unanswered and now - since <= STUCK_TIMEOUTS * self.timeout_s:
                return False
            self.state = "stalled"
            self.reason = f"no answer to heartbeats for {now - since:.1f} s (stopped or hung)"
            return True

    def lost(self, reason: str) -> bool:
        """The control connection broke; True when that newly marks the server down."""
        with self._lock:
            self._unanswered_since = None
            newly = self.state != "down"
            self.state, self.reason = "down", reason
            return newly
