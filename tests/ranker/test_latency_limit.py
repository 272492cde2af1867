"""The bounds sized by queueing delay: requests in flight (`LatencyLimit`) and how long a request may
have waited before it was read (`WaitBound`), alone and inside admission."""

from __future__ import annotations

import pytest

from flexemr.ranker.admission import Admission, Refused
from flexemr.ranker.latency_limit import (
    INTERVAL_S,
    QUEUE_ARRIVALS,
    TARGET_S,
    LatencyLimit,
    WaitBound,
)


def run(limit: LatencyLimit, waited_s: float, in_flight: int | None, intervals: int) -> None:
    """Requests every 10 ms for `intervals` intervals, each having waited `waited_s`."""
    now = 0.0
    for _ in range(int(intervals * INTERVAL_S / 0.01)):
        now += 0.01
        limit.observe(waited_s, limit.limit if in_flight is None else in_flight, now)


def test_the_limit_grows_while_requests_start_at_once() -> None:
    limit = LatencyLimit(minimum=4, maximum=50)
    run(limit, waited_s=0.0, in_flight=None, intervals=100)
    assert limit.limit == 50


def test_a_standing_queue_shrinks_the_limit_to_its_minimum() -> None:
    limit = LatencyLimit(minimum=3, maximum=100)
    limit.limit = 100
    run(limit, waited_s=2 * TARGET_S, in_flight=None, intervals=100)
    assert limit.limit == 3


def test_one_request_that_did_not_wait_means_no_standing_queue() -> None:
    limit = LatencyLimit(minimum=3, maximum=100)
    limit.limit = 40
    now = 0.0
    for i in range(1000):
        now += 0.01
        limit.observe(0.0 if i % 10 == 0 else 1.0, 40, now)  # most waited, one per interval did not
    assert limit.limit >= 40


def test_an_idle_limit_does_not_grow() -> None:
    limit = LatencyLimit(minimum=8, maximum=100)
    run(limit, waited_s=0.0, in_flight=1, intervals=50)  # 1 in flight of 8: no sign more would fit
    assert limit.limit == 8


def test_admission_refuses_requests_beyond_the_limit_at_once() -> None:
    admission = Admission(max_samples=1000, max_pending=100, limit=LatencyLimit(minimum=2, maximum=2))
    first, second = admission.arrive(60), admission.arrive(60)
    admission.started(first)
    admission.admit(first, 1)
    with pytest.raises(Refused, match="2 requests in flight of 2"):
        admission.arrive(60)
    admission.release(first)
    third = admission.arrive(60)
    stats = admission.stats()
    assert stats["requests_in_flight"] == 2 and stats["requests_limit"] == 2
    for ticket in (second, third):
        admission.release(ticket)
    assert admission.stats()["requests_in_flight"] == 0


def arrivals(bound: WaitBound, waited_s: float, count: int, start: float) -> list[bool]:
    """`count` requests spread over one interval from `start`, each having waited `waited_s`:
    whether each was refused."""
    step = bound.interval_s / count
    return [bound.too_late(waited_s, start + i * step) for i in range(count)]


def test_without_a_standing_queue_only_a_wait_past_the_long_bound_is_refused() -> None:
    bound = WaitBound(short_s=0.01, long_s=1.0)
    assert not any(arrivals(bound, 0.5, 50, start=0.0))
    assert not any(arrivals(bound, 0.001, 50, start=1.0))
    assert bound.too_late(1.5, 2.0) and not bound.standing


def test_a_standing_queue_refuses_requests_that_waited_past_the_short_bound() -> None:
    bound = WaitBound(short_s=0.01, long_s=1.0)
    assert not any(arrivals(bound, 0.05, 50, start=0.0))  # the interval that shows the queue
    refused = arrivals(bound, 0.05, 50, start=0.1)  # every arrival of the next interval waited too
    assert bound.standing and all(refused)
    assert not bound.too_late(0.001, 0.25)  # a fresh request is admitted while the queue drains


def test_once_one_request_is_read_at_once_the_queue_no_longer_stands() -> None:
    bound = WaitBound(short_s=0.01, long_s=1.0)
    arrivals(bound, 0.05, 50, start=0.0)
    arrivals(bound, 0.05, 50, start=0.1)
    assert bound.standing
    arrivals(bound, 0.05, 49, start=0.2)
    bound.too_late(0.0, 0.299)  # one of them waited nothing: the queue drained
    assert not bound.too_late(0.05, 0.31) and not bound.standing


def test_a_few_late_requests_are_no_standing_queue() -> None:
    """A loaded host's scheduler can hold a lone request: too few arrivals to call it a queue."""
    bound = WaitBound(short_s=0.01, long_s=1.0)
    for interval in range(20):
        assert not any(arrivals(bound, 0.05, QUEUE_ARRIVALS - 1, start=interval * 0.15))


def test_admission_refuses_a_request_that_waited_too_long_before_it_was_read() -> None:
    admission = Admission(max_samples=1000, max_pending=100, wait_bound=WaitBound(short_s=0.01, long_s=0.5))
    assert admission.refusal(0.2) is None
    refused = admission.refusal(0.6)
    assert isinstance(refused, Refused) and "waited 600 ms before it was read" in str(refused)
    stats = admission.stats()
    assert stats["refused_requests"] == stats["refused_late_requests"] == 1
    assert stats["requests_in_flight"] == 0  # a refusal from the headers takes no place
