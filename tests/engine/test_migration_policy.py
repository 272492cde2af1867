"""The migration policy alone: pure, no threads or sockets."""

from __future__ import annotations

import pytest

from flexemr.engine.migration import MigrationPolicy, Move


def run(policy: MigrationPolicy, queued: dict[int, int], owners: dict[int, int], ticks: int) -> list[Move]:
    moves = []
    for _ in range(ticks):
        move = policy.observe(queued, owners)
        if move is not None:
            moves.append(move)
            owners[move.connection] = move.target
    return moves


def test_balanced_threads_never_move() -> None:
    policy = MigrationPolicy(threads=2, window=4, cooldown=2)
    assert run(policy, {0: 10, 1: 10, 2: 10, 3: 10}, {0: 0, 1: 0, 2: 1, 3: 1}, ticks=50) == []


def test_moves_from_busiest_to_idlest_and_settles() -> None:
    policy = MigrationPolicy(threads=3, window=4, cooldown=2)
    owners = {0: 0, 1: 0, 2: 0, 3: 1}
    moves = run(policy, {0: 20, 1: 20, 2: 20, 3: 1}, owners, ticks=100)
    assert moves, "a thread with three hot connections next to idle ones must shed one"
    assert moves[0].source == 0 and moves[0].target == 2  # thread 2 owns nothing: least busy
    per_thread = [sum(1 for c, t in owners.items() if t == thread and c != 3) for thread in range(3)]
    assert per_thread == [1, 1, 1]  # the hot connections end up spread, one per thread
    assert len(moves) == 2  # and then it stops: no ping-pong


def test_single_hot_connection_does_not_ping_pong() -> None:
    policy = MigrationPolicy(threads=2, window=2, cooldown=0)
    assert run(policy, {0: 100, 1: 0}, {0: 0, 1: 1}, ticks=50) == []


def test_cooldown_spaces_moves() -> None:
    policy = MigrationPolicy(threads=2, window=1, cooldown=5, min_load=1)
    owners = {c: 0 for c in range(6)}
    ticks_with_moves = []
    for tick in range(30):
        move = policy.observe({c: 10 for c in range(6)}, owners)
        if move is not None:
            ticks_with_moves.append(tick)
            owners[move.connection] = move.target
    assert ticks_with_moves, "an idle thread next to six busy connections must get some"
    assert all(b - a > 5 for a, b in zip(ticks_with_moves, ticks_with_moves[1:], strict=False))


def test_window_smooths_a_spike() -> None:
    policy = MigrationPolicy(threads=2, window=10, cooldown=0, imbalance=2.0, min_load=4)
    owners = {0: 0, 1: 0, 2: 1}
    for _ in range(9):
        assert policy.observe({0: 2, 1: 2, 2: 3}, owners) is None
    assert policy.observe({0: 20, 1: 2, 2: 3}, owners) is None  # one spike, averaged away


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="imbalance"):
        MigrationPolicy(threads=2, imbalance=0.5)
