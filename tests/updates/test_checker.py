"""The short form of the Jepsen-style row-update checker (`flexemr.bench.update_checker`; the long
form is `benchmarks/update_checker.py`), over real processes on 127.0.0.1: `flexemr serve
--rankers 2` over 2 row shards x 2 replicas with small bounds, one more ranker with a cache, HTTP
pushes through serve's rankers, `flexemr update` subprocesses and a Redis stream consumer writing
concurrently, readers through every ranker carrying the highest acknowledged version, and the
faults one at a time: SIGSTOP of server 3, kill -9 of a `flexemr update` mid-update, a full disk
under the update logs (a tmpfs, where root), kill -9 of server 0 (the decider). A fault that starts
another ranker or consumer costs a minute or more on a loaded machine, so the long form
(`benchmarks/update_checker.py`) has the rest: kill -9 and SIGSTOP of every server, kill -9 of the
stream consumer, kill -9 and restart of the extra ranker, and a run with default bounds.

It asserts zero MIXED, stale, non-monotonic, lost or visible-failed reads and updates, and a
cluster live and exact after healing; refusals are allowed (counted, never a wrong score)."""

from __future__ import annotations

import pytest

from flexemr.bench.update_checker import CheckerConfig, check

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT = CheckerConfig(
    faults=("stop-server-3", "kill-cli", "full-disk", "kill-server-0"),
    min_updates=6,
    pause_s=0.5,
    hold_s=1.5,
    quiet_s=0.5,
    max_staged_bytes=4096,
    max_changelog_keys=16,
)  # fmt: skip


def test_no_violation_under_writers_over_http_cli_and_redis_and_faults() -> None:
    report = check(SHORT)  # without redis-server or root, it says what it left out (`skipped`)
    summary = report.table() + "\n" + "\n".join(report.problems[:20])
    print(summary)
    assert report.violations() == 0, summary
    assert report.live, summary
    reads = sum(p.reads for p in report.phases.values())
    acknowledged = sum(p.acknowledged for p in report.phases.values())
    assert reads > 100 and acknowledged > 10 and report.states_seen > 5, summary
    # The faults happened with writers and readers at work (else the check proves little).
    assert report.phases["kill-server-0"].reads > 0 and report.phases["kill-server-0"].updates > 0, summary
