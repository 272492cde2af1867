"""The checker's judge (`flexemr.bench.update_checker.judge`) flags each kind of violation: a read
no prefix gives (MIXED), a read below the version it asked for (stale), the pinned ranker going
back (non-monotonic), a read of a state never committed (visible), and counts lost and
visible-failed updates; correct histories give none. No processes: synthetic reads."""

from __future__ import annotations

import numpy as np

from flexemr.bench.update_checker import Read, Update, judge
from flexemr.updates import RowUpdates

EXPECTED = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], dtype=np.float32)
"""Scores at versions 0..3; the cluster's version at the end of the run is 2 (3: a resend)."""


def read(state: int | None, floor: int = 0, pinned: bool = False, score: np.ndarray | None = None) -> Read:
    got = EXPECTED[state] if state is not None else score
    return Read("r0", pinned, floor, "none", None if got is None else got.copy())


def update(outcome: str, version: int) -> Update:
    rows = RowUpdates(
        np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, 2), np.float32), "h0", version
    )
    return Update("http", rows, "none", outcome, version)


def test_a_correct_history_has_no_violation() -> None:
    problems: list[str] = []
    reads = [read(0), read(1, floor=1, pinned=True), read(2, floor=1, pinned=True), read(1, floor=1)]
    phases, seen = judge(
        (), [update("acknowledged", 1), update("acknowledged", 2)], reads, 2, EXPECTED, problems
    )
    counts = phases["none"]
    assert problems == []
    assert (counts.reads, counts.acknowledged, counts.mixed, counts.stale, counts.backwards) == (
        4,
        2,
        0,
        0,
        0,
    )
    assert seen == {0, 1, 2}


def test_each_violation_is_flagged() -> None:
    problems: list[str] = []
    torn = np.array([0.3, 0.6], dtype=np.float32)  # sample 0 at version 1, sample 1 at version 2
    reads = [
        read(None, score=torn),  # MIXED
        read(1, floor=2),  # stale: asked for 2
        read(2, pinned=True),
        read(1, pinned=True),  # non-monotonic
        read(3),  # a state never committed before the end (2)
        Read("r1", False, 0, "none", None, "503"),  # a refusal: counted, no violation
    ]
    updates = [update("acknowledged", 1), update("lost", 2), update("visible failed", 2)]
    phases, _ = judge((), updates, reads, 2, EXPECTED, problems)
    counts = phases["none"]
    assert (counts.mixed, counts.stale, counts.backwards, counts.visible_failed, counts.lost) == (
        1,
        1,
        1,
        2,
        1,
    )
    assert counts.refused_reads == 1 and counts.reads == 5
    assert len(problems) == 4, problems
