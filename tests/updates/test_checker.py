"""A short-form Jepsen-style checker of row updates (issue #27), over real embedding server
processes (2 row shards x 2 replicas on 127.0.0.1) and two in-process rankers (one with a cache):

- two writers apply updates concurrently (each its own `Updater`, source `w0`/`w1`, sequences
  0, 1, ...), every update touching rows of both shards that the readers read;
- three readers score one fixed batch (rows of every table and both shards) through both rankers;
- a nemesis kills server 1 (kill -9; restarted by the supervisor), stops server 3 (SIGSTOP) for a
  while, then kills server 0 (the decider), one fault at a time.

Then the history is made whole: each update whose outcome was unknown is sent again with its
(source, sequence), which applies it exactly once (or answers the version that applied it), so
every version 1..N is one known update. The checker reports, and the test asserts zero of:
MIXED reads (a 200 score that no prefix of the versions gives), non-monotonic reads (a reader
seeing a ranker go back to an older version), lost acknowledged writes (an acknowledged version
that is not that update's rows, or a final state without it), visible failed updates, and a
cluster not live after healing (an update and exact reads through both rankers). Refusals (503s,
failed updates) are allowed: they are counted, never a wrong score."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.config import CacheMode, Endpoint, RankerConfig, SecurityConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import links
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol.updates import LATEST
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.updates import RowUpdates, UpdateFailed, Updater
from tests.core.helpers import freeze, random_batch, reference_scores
from tests.updates.helpers import apply_monolithic, rows_of

pytestmark = pytest.mark.slow

MIN_UPDATES_PER_WRITER = 12
ROWS_PER_UPDATE = 6


@dataclasses.dataclass
class Outcome:
    update: RowUpdates
    version: int | None = None
    """The version it was acknowledged with; None: failed (or unknown, `unknown`)."""
    unknown: bool = False


@dataclasses.dataclass
class Read:
    reader: int
    ranker: int
    score: np.ndarray


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterSpec, LocalCluster]]:
    secret = tmp_path_factory.mktemp("secret") / "secret"
    secret.write_text("a secret of the update checker")
    source = ModelSource(preset="tiny", seed=41, row_dtype="fp32")
    model = model_spec(source)
    plan = replicated(make_plan("row", model.table_rows, model.dim, 2), 2)
    spec = ClusterSpec(
        source, plan, tuple(Endpoint() for _ in range(4)), security=SecurityConfig(secret_file=str(secret))
    )
    local = LocalCluster(spec, supervise=True)
    spec = local.start()
    yield spec, local
    local.stop()


def _wait_back(spec: ClusterSpec, server: int, timeout_s: float = 120) -> None:
    link = links(spec)[server]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                link.changes(LATEST)
                return
            except (ServerUnavailable, LookupFailed):
                assert time.monotonic() < deadline, f"embedding server {server} did not come back"
                time.sleep(0.2)
    finally:
        link.close()


def test_no_mixed_lost_or_non_monotonic_reads_under_faults(cluster: tuple[ClusterSpec, LocalCluster]) -> None:
    spec, local = cluster
    model = model_spec(spec.model)
    dense, indices, lengths = random_batch(model, 4, 42, max_bag=3)
    hot_tables, hot_rows = rows_of(model, indices, lengths)
    rng = np.random.default_rng(43)
    rankers: list[Ranker] = [
        build_ranker(spec),
        build_ranker(
            dataclasses.replace(spec, ranker=RankerConfig(lookup="raw", cache=CacheMode.parse("fixed:1MiB")))
        ),
    ]
    outcomes: list[Outcome] = []
    reads: list[Read] = []
    refused: list[str] = []
    writing, faulting = threading.Event(), threading.Event()
    writing.set()
    faulting.set()

    def writer(w: int) -> None:
        """Updates of random hot rows, one after another, until the faults are over."""
        updater = Updater(spec)
        mine = np.random.default_rng(w)
        try:
            for sequence in range(1000):
                if sequence >= MIN_UPDATES_PER_WRITER and not faulting.is_set():
                    return
                pick = mine.choice(hot_tables.size, ROWS_PER_UPDATE, replace=False)
                values = mine.standard_normal((ROWS_PER_UPDATE, model.dim)).astype(np.float32)
                outcome = Outcome(RowUpdates(hot_tables[pick], hot_rows[pick], values, f"w{w}", sequence))
                try:
                    outcome.version = updater.apply(outcome.update)
                except UpdateFailed as exc:
                    outcome.unknown = "outcome unknown" in str(exc)
                    refused.append(f"update: {exc}")
                outcomes.append(outcome)
                time.sleep(0.2)
        finally:
            updater.close()

    def reader(r: int) -> None:
        while writing.is_set():
            for k, ranker in enumerate(rankers):
                try:
                    reads.append(Read(r, k, ranker.score(dense, indices, lengths)))
                except (ServerUnavailable, LookupFailed) as exc:
                    refused.append(f"read: {exc}")

    def nemesis() -> None:
        time.sleep(1)
        local.kill_server(1)
        _wait_back(spec, 1)
        stopped = local.pids[3]
        freeze(stopped)
        time.sleep(2)
        os.kill(stopped, signal.SIGCONT)
        time.sleep(1)
        local.kill_server(0)
        _wait_back(spec, 0)
        faulting.clear()

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    readers = [threading.Thread(target=reader, args=(r,)) for r in range(3)]
    faults = threading.Thread(target=nemesis)
    try:
        for thread in [*writers, *readers, faults]:
            thread.start()
        for thread in [*writers, faults]:
            thread.join(150)
        writing.clear()
        for thread in readers:
            thread.join(60)

        # Make the history whole: resend each update whose outcome is unknown (exactly once).
        healer = Updater(spec)
        try:
            for outcome in outcomes:
                if outcome.unknown:
                    outcome.version = healer.apply(outcome.update)
            final_update = RowUpdates(
                hot_tables, hot_rows, rng.standard_normal((hot_tables.size, model.dim)).astype(np.float32)
            )
            final = healer.apply(final_update)  # liveness after healing
        finally:
            healer.close()

        # Every version 1..final is exactly one known update, in order.
        by_version = {o.version: o.update for o in outcomes if o.version is not None}
        assert len(by_version) == sum(o.version is not None for o in outcomes), "two updates, one version"
        assert sorted(by_version) == list(range(1, final)), f"versions {sorted(by_version)} of {final - 1}"
        by_version[final] = final_update
        mono = build_monolithic(load_weights(spec.model))
        expected = [reference_scores(mono, dense, indices, lengths)]
        for version in range(1, final + 1):
            apply_monolithic(mono, by_version[version])
            expected.append(reference_scores(mono, dense, indices, lengths))

        mixed, backwards, last, states = 0, 0, {}, set()
        for read in reads:
            match = [v for v, want in enumerate(expected) if np.allclose(read.score, want, atol=1e-5, rtol=0)]
            if not match:
                mixed += 1
                continue
            states.update(match)
            key = (read.reader, read.ranker)
            if max(match) < last.get(key, 0):
                backwards += 1
            last[key] = max(last.get(key, 0), min(match))
        lost = 0
        for ranker in rankers:
            assert ranker.row_version is not None
            ranker.row_version.read_at_least(final)
            if not np.allclose(ranker.score(dense, indices, lengths), expected[final], atol=1e-5, rtol=0):
                lost += 1
        report = (
            f"{len(reads)} reads checked, {len(states)} states seen, "
            f"{sum(o.version is not None for o in outcomes)} updates acknowledged of {len(outcomes)}, "
            f"{len(refused)} refusals; MIXED {mixed}, non-monotonic {backwards}, lost {lost}"
        )
        print(report)
        assert (mixed, backwards, lost) == (0, 0, 0), report
        assert len(reads) > 20, report
    finally:
        for thread in [*writers, *readers, faults]:
            if thread.is_alive():
                writing.clear()
                thread.join(30)
        for ranker in rankers:
            ranker.close()
