"""A server's liveness as the heartbeat sees it: stalled only when the ranker looked and found no answer."""

from __future__ import annotations

from flexemr.engine.health import STUCK_TIMEOUTS, ServerHealth


def test_a_ping_unanswered_when_the_control_thread_looked_past_the_timeout_stalls_the_server() -> None:
    health = ServerHealth(timeout_s=1.0)
    health.pinged(10.0)
    health.looked(10.9)
    assert not health.check(11.5)  # looked before the timeout passed: the answer may be unread
    health.looked(11.2)
    assert health.check(11.3) and health.state == "stalled"
    assert "no answer to heartbeats" in health.reason
    assert not health.check(11.4)  # newly stalled once
    assert health.answered() and health.up  # the first answer re-admits it


def test_a_ranker_that_could_not_look_does_not_blame_the_server() -> None:
    """A starved ranker (its control thread not run for seconds) reads the answers when it runs."""
    health = ServerHealth(timeout_s=1.0)
    health.pinged(10.0)
    health.looked(10.1)
    assert not health.check(10.0 + STUCK_TIMEOUTS * 1.0)  # 5 s on, never looked since: not stalled
    assert not health.answered()  # the answer, read late: it was up all along
    assert health.up


def test_a_control_thread_that_never_looks_again_stalls_the_server_after_the_stuck_bound() -> None:
    """Blocked in a send to a server that stopped reading, the control thread never looks again."""
    health = ServerHealth(timeout_s=1.0)
    health.pinged(10.0)
    assert not health.check(10.0 + STUCK_TIMEOUTS * 1.0)
    assert health.check(10.1 + STUCK_TIMEOUTS * 1.0) and health.state == "stalled"


def test_answered_pings_never_stall() -> None:
    health = ServerHealth(timeout_s=1.0)
    health.pinged(10.0)
    health.answered()
    health.looked(20.0)
    assert not health.check(30.0) and health.up


def test_the_oldest_unanswered_ping_counts_and_down_is_reported_once() -> None:
    health = ServerHealth(timeout_s=1.0)
    health.pinged(10.0)
    health.pinged(10.5)  # the oldest unanswered ping is the one timed
    health.looked(10.9)
    assert not health.check(10.9) and health.up
    health.looked(11.05)
    assert health.check(11.1) and health.state == "stalled"
    assert health.answered() and health.up
    assert health.lost("control connection failed") and health.state == "down"
    assert not health.lost("again")
    assert health.answered() and health.up
