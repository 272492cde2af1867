"""The bounds sized by latency: requests in flight (`LatencyLimit`) and how long a request may have
waited before it was read (`WaitBound`), alone and inside admission."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flexemr.ranker.admission import Admission, Refused
from flexemr.ranker.latency_limit import (
    BASE_WINDOW_S,
    INTERVAL_S,
    QUEUE_ARRIVALS,
    LatencyLimit,
    WaitBound,
)

UNLOADED_S = 0.002


def run(
    limit: LatencyLimit, latency_s: Callable[[int], float], seconds: float, refusing: bool = True
) -> None:
    """Requests answered every 2.5 ms for `seconds`, with the limit's requests in flight, each
    `latency_s(limit)` after it came (alone when the limit is one), two refused with each answer
    while `refusing` (3x the load served comes)."""
    now = 0.0
    for i in range(int(seconds / 0.0025)):
        now += 0.0025
        limit.observe(latency_s(limit.limit), limit.limit == 1, limit.limit, 2 * i if refusing else 0, now)


def test_the_limit_grows_while_requests_overlap_without_slowing_each_other() -> None:
    """Lookups on embedding servers: more in flight, the same latency."""
    limit = LatencyLimit(initial=4, maximum=50)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    run(limit, lambda _: UNLOADED_S * 1.5, seconds=100 * INTERVAL_S)
    assert limit.limit == 50


def test_a_queue_shrinks_the_limit_to_what_keeps_the_latency_near_the_unloaded() -> None:
    """One core: each request in flight adds its service time to everyone's latency."""
    limit = LatencyLimit(initial=64)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    run(limit, lambda n: UNLOADED_S * n, seconds=5.0)
    assert 1 <= limit.limit <= limit.tolerance
    assert limit.unloaded_s == UNLOADED_S


def test_short_of_overload_a_queue_does_not_shrink_the_limit() -> None:
    """A closed loop of N clients chose its queue (refusing some would only make them retry); a
    burst's few refusals are no overload."""
    limit = LatencyLimit(initial=8, maximum=12)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    run(limit, lambda n: UNLOADED_S * n, seconds=3 * BASE_WINDOW_S, refusing=False)
    assert limit.limit == 12 and limit.probing is None
    now = 3 * BASE_WINDOW_S
    for i in range(int(3 * BASE_WINDOW_S / 0.0025)):  # one refused for every 10 answered
        now += 0.0025
        limit.observe(UNLOADED_S * limit.limit, False, limit.limit, i // 10, now)
    assert limit.limit == 12 and limit.probing is None


def test_a_limit_never_falls_below_its_minimum_or_grows_when_idle() -> None:
    limit = LatencyLimit(initial=8, minimum=3)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    run(limit, lambda n: UNLOADED_S * 100, seconds=2.0)
    assert limit.limit == 3
    idle = LatencyLimit(initial=8)
    now = 0.0
    for _ in range(1000):  # one request in flight at a time, at its unloaded latency
        now += 0.01
        idle.observe(UNLOADED_S, True, 1, 0, now)
    assert idle.limit == 8


def test_without_a_lone_request_the_limit_drops_to_one_until_the_unloaded_latency_is_measured() -> None:
    """Under sustained overload every request queues: the least latency seen would be the queue's."""
    limit = LatencyLimit(initial=10)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    now, refused = 0.0, 0
    for _ in range(int(BASE_WINDOW_S / 0.0025) + 100):  # never alone, latency in proportion, refusing
        now, refused = now + 0.0025, refused + 2
        limit.observe(UNLOADED_S * limit.limit, False, limit.limit, refused, now)
    assert limit.limit == 1 and limit.probing is not None
    returns_to = limit.probing
    limit.observe(UNLOADED_S, True, 1, refused, now + INTERVAL_S)  # a lone request: measured
    assert limit.limit == returns_to and limit.probing is None
    assert limit.unloaded_s == UNLOADED_S


def test_under_overload_a_lone_request_slowed_by_the_refusals_does_not_raise_the_unloaded_latency() -> None:
    """Seen at 3x the peak on two cores: requests alone at a limit of two took 3-9x their unloaded
    latency among the refusals; as the least lone latency of 10 s ago expired, theirs took its
    place, the target rose with it and the limit grew to 12 (admitted p99 8x the unloaded)."""
    limit = LatencyLimit(initial=8)
    now, refused = 0.0, 0
    for _ in range(100):  # before the overload: lone requests at their unloaded latency
        now += 0.01
        limit.observe(UNLOADED_S, True, 1, refused, now)
    for i in range(int(3 * BASE_WINDOW_S / 0.0025)):  # overload: two in flight, every 4th alone
        now, refused = now + 0.0025, refused + 2
        slowed = UNLOADED_S * (3 + 6 * (i % 7) / 6)  # 3x to 9x, the queue's latency
        limit.observe(slowed, i % 4 == 0, 2 - (i % 4 == 0), refused, now)
        assert limit.unloaded_s == UNLOADED_S
        assert limit.limit <= 4 or i * 0.0025 < 1.0  # shrunk from 8 in its first second
    assert limit.limit == limit.minimum and limit.probing is None


def test_the_probes_lone_request_sets_the_unloaded_latency_even_when_slower() -> None:
    """A model or host that got slower during a sustained overload is followed through the probe."""
    limit = LatencyLimit(initial=10)
    limit.observe(UNLOADED_S, True, 1, 0, 0.0)
    now, refused = 0.0, 0
    while limit.probing is None:  # never alone, refusing
        now, refused = now + 0.0025, refused + 2
        limit.observe(UNLOADED_S * limit.limit, False, limit.limit, refused, now)
    limit.observe(5 * UNLOADED_S, True, 1, refused, now + INTERVAL_S)
    assert limit.unloaded_s == 5 * UNLOADED_S and limit.probing is None


def test_the_unloaded_latency_follows_a_slower_model() -> None:
    limit = LatencyLimit(initial=8)
    now = 0.0
    for latency_s in (UNLOADED_S, 5 * UNLOADED_S):
        for _ in range(int((BASE_WINDOW_S + 1.0) / 0.01)):  # lone requests, one every 10 ms
            now += 0.01
            limit.observe(latency_s, True, 1, 0, now)
        assert limit.unloaded_s == latency_s


def test_admission_refuses_requests_beyond_the_limit_at_once() -> None:
    admission = Admission(
        max_samples=1000, max_pending=100, limit=LatencyLimit(initial=2, minimum=2, maximum=2)
    )
    first, second = admission.arrive(60), admission.arrive(60)
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


def test_admission_reports_each_admitted_requests_latency_and_whether_it_was_alone() -> None:
    seen: list[tuple[bool, int]] = []

    class Recording(LatencyLimit):
        def observe(self, latency_s: float, alone: bool, in_flight: int, refused: int, now: float) -> None:
            assert 0 <= latency_s < 60
            seen.append((alone, in_flight))

    admission = Admission(max_samples=1000, max_pending=100, limit=Recording())
    lone = admission.arrive(60)
    admission.admit(lone, 1)
    admission.release(lone)
    first, second = admission.arrive(60), admission.arrive(60)
    admission.admit(first, 1)
    admission.admit(second, 1)
    admission.release(first)
    admission.release(second)  # answered alone, but it came while the first was in flight
    unparsed = admission.arrive(60)
    admission.release(unparsed)  # never admitted (bad body, refused, dropped): no latency
    assert seen == [(True, 1), (False, 2), (False, 1)]
