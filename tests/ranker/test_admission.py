"""Admission control on its own: the bound on samples in flight, requests being read, deadlines."""

from __future__ import annotations

import pytest

from flexemr.ranker.admission import Admission, Dropped, Refused


def test_samples_beyond_the_bound_are_refused_and_released_ones_admitted_again() -> None:
    admission = Admission(max_samples=10, max_pending=8)
    first, second, third = (admission.arrive(60) for _ in range(3))
    admission.admit(first, 6)
    admission.admit(second, 4)
    with pytest.raises(Refused, match="bound of 10"):
        admission.admit(third, 1)
    with pytest.raises(Refused, match="10 of 10 samples"):  # full: refused before its body is read
        admission.arrive(60)
    admission.release(first)
    admission.admit(third, 6)
    for ticket in (second, third):
        admission.release(ticket)
    stats = admission.stats()
    assert stats["samples_in_flight"] == 0 and stats["requests_being_read"] == 0
    assert stats["admitted_requests"] == 3 and stats["refused_requests"] == 2


def test_requests_being_read_are_bounded() -> None:
    admission = Admission(max_samples=100, max_pending=2)
    tickets = [admission.arrive(60), admission.arrive(60)]
    with pytest.raises(Refused, match="2 requests being read"):
        admission.arrive(60)
    admission.release(tickets[0])  # e.g. its body was too large
    tickets[0] = admission.arrive(60)
    assert admission.stats()["requests_being_read"] == 2


def test_a_ticket_past_its_deadline_or_whose_client_left_is_dropped() -> None:
    admission = Admission(max_samples=10, max_pending=8)
    expired = admission.arrive(0.0)
    with pytest.raises(Dropped, match="deadline of 0 ms") as info:
        expired.check()
    admission.dropped(info.value)
    live = admission.arrive(3600)
    live.check()  # plenty of time left: no exception
    live.client_gone()
    with pytest.raises(Dropped, match="disconnected") as info:
        live.check()
    admission.dropped(info.value)
    stats = admission.stats()
    assert stats["dropped_deadline_requests"] == 1 and stats["dropped_disconnected_requests"] == 1
