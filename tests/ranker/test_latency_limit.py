"""The bound on requests in flight sized by their queueing delay, alone and inside admission."""

from __future__ import annotations

import pytest

from flexemr.ranker.admission import Admission, Refused
from flexemr.ranker.latency_limit import INTERVAL_S, TARGET_S, LatencyLimit


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
