"""Admission control: a bounded number of samples in flight, requests in flight bounded by their
latency (`flexemr.ranker.latency_limit`), requests that already waited too long before they were
read refused, and a deadline on every request.

The process's front door (`flexemr.api.front_door`) drives its one `Admission`:

    admission.refusal(waited_s)           # from the headers: Refused when full, or when the request
                                          # waited too long before it was read (429, body unread)
    ticket = admission.arrive(timeout_s)  # Refused: full, or too many requests in flight (429)
    ...read the body; take a turn; parse the body...
    admission.admit(ticket, batch_size)   # Refused: the samples would pass the bound (429)
    ranker.score(..., ticket=ticket)      # Dropped: deadline passed or client gone, not computed
    admission.release(ticket)             # always, in a finally; an admitted request's latency
                                          # sizes the requests' limit

A request is refused at once rather than queued, so overload costs the ranker almost nothing and
the requests it admitted keep their latency. `ticket.check()` is called where work would start
(after waiting for a turn or a batch, before routing, before the dense model): a request whose
deadline has passed, or whose client has gone, is dropped there instead of computed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from flexemr.ranker.latency_limit import LatencyLimit, WaitBound


class Refused(RuntimeError):
    """The ranker is full; the request was not started (HTTP 429 with Retry-After)."""


class Dropped(RuntimeError):
    """The request was dropped before its work started: its deadline passed or its client left."""

    def __init__(self, reason: Literal["deadline", "disconnected"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Ticket:
    """One request's place in the ranker: its deadline, its samples, and whether its client left."""

    deadline: float
    """time.monotonic() after which the request's work is dropped."""
    timeout_s: float
    arrived: float = field(default_factory=time.monotonic)
    samples: int = 0
    """Samples admitted (0 while the body is being read)."""
    alone: bool = False
    """Nothing else was in flight when it arrived."""
    _gone: threading.Event = field(default_factory=threading.Event)

    def client_gone(self) -> None:
        self._gone.set()

    def check(self) -> None:
        """Raise `Dropped` if the work should not start."""
        if self._gone.is_set():
            raise Dropped("disconnected", "the client disconnected")
        if time.monotonic() >= self.deadline:
            raise Dropped("deadline", f"deadline of {self.timeout_s * 1000:g} ms passed before work began")


class Admission:
    """Counts samples in flight (admitted, not yet answered) and requests still being read.

    `max_samples` bounds the work and memory of parsed requests; `max_pending` bounds the bodies
    being received and parsed (each at most the body limit), whose size is not known yet; `limit`
    bounds the requests in flight by their latency (default: a `LatencyLimit` from 8 requests);
    `wait_bound` how long a request may have waited before it was read (default: `WaitBound()`)."""

    def __init__(
        self,
        max_samples: int,
        max_pending: int,
        limit: LatencyLimit | None = None,
        wait_bound: WaitBound | None = None,
    ) -> None:
        if max_samples < 1 or max_pending < 1:
            raise ValueError(f"need max_samples >= 1 and max_pending >= 1, got {max_samples}, {max_pending}")
        self.max_samples = max_samples
        self.max_pending = max_pending
        self.limit = limit or LatencyLimit()
        self.wait_bound = wait_bound or WaitBound()
        self._lock = threading.Lock()
        self.samples = self.pending = self.requests = 0
        self.counts = {
            "admitted": 0,
            "refused": 0,
            "refused_late": 0,
            "dropped_deadline": 0,
            "dropped_disconnected": 0,
        }

    def refusal(self, waited_s: float = 0.0) -> Refused | None:
        """The refusal (counted) of a request whose headers were just read, after it waited
        `waited_s` before they were (in the kernel's queues, behind the event loop), when the ranker
        is full or it waited too long (`WaitBound`); else None."""
        now = time.monotonic()
        with self._lock:
            if self.wait_bound.too_late(waited_s, now):
                self.counts["refused"] += 1
                self.counts["refused_late"] += 1
                return Refused(
                    f"the ranker is behind (this request waited {waited_s * 1000:.0f} ms before it was "
                    "read); retry later"
                )
            return self._refusal()

    def _refusal(self) -> Refused | None:
        if (
            self.samples < self.max_samples
            and self.pending < self.max_pending
            and self.requests < self.limit.limit
        ):
            return None
        self.counts["refused"] += 1
        return Refused(
            f"the ranker is full ({self.samples} of {self.max_samples} samples in flight, "
            f"{self.pending} requests being read, {self.requests} requests in flight of "
            f"{self.limit.limit} its latency allows); retry later"
        )

    def arrive(self, timeout_s: float) -> Ticket:
        """A ticket for a request that just arrived, or `Refused` when the ranker is full."""
        with self._lock:
            if (refused := self._refusal()) is not None:
                raise refused
            self.pending += 1
            self.requests += 1
            alone = self.requests == 1
        return Ticket(time.monotonic() + timeout_s, timeout_s, alone=alone)

    def admit(self, ticket: Ticket, samples: int) -> None:
        """Admit the parsed request's `samples`, or raise `Refused` if they would pass the bound."""
        with self._lock:
            if self.samples + samples > self.max_samples:
                self.counts["refused"] += 1
                raise Refused(
                    f"{samples} more samples would pass the ranker's bound of {self.max_samples} in "
                    f"flight ({self.samples} now); retry later"
                )
            self.pending -= 1
            self.samples += samples
            ticket.samples = samples
            self.counts["admitted"] += 1

    def dropped(self, exc: Dropped) -> None:
        with self._lock:
            self.counts[f"dropped_{exc.reason}"] += 1

    def release(self, ticket: Ticket) -> None:
        """The request is answered (or refused, or dropped): its place is free again, and an
        admitted one's latency sizes the limit."""
        now = time.monotonic()
        with self._lock:
            if ticket.samples:
                self.samples -= ticket.samples
                alone = ticket.alone and self.requests == 1
                self.limit.observe(now - ticket.arrived, alone, self.requests, self.counts["refused"], now)
            else:
                self.pending -= 1
            self.requests -= 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "samples_in_flight": self.samples,
                "samples_limit": self.max_samples,
                "requests_being_read": self.pending,
                "requests_in_flight": self.requests,
                "requests_limit": self.limit.limit,
                **{f"{kind}_requests": n for kind, n in self.counts.items()},
            }
