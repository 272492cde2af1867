"""The commit protocol over real processes (4 embedding servers on 127.0.0.1: 2 row shards x 2
replicas, fp32 rows, small bounds), one test per way issue #27 found to lose or tear an
acknowledged write: a (source, sequence) seen out of order, a COMMIT of an attempt that lost its
version long ago, stages leaked by failed attempts, and a server that lost its log (it resyncs)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint, SecurityConfig, UpdatesConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.versions import STAGE_RECORD_BYTES
from flexemr.engine.link import ServerLink, links
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol.frames import MessageType
from flexemr.protocol.updates import LATEST, StagedRows
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.updates import RowUpdates, UpdateFailed, Updater
from tests.core.helpers import freeze, random_batch, reference_scores
from tests.updates.helpers import apply_monolithic, rows_of

pytestmark = pytest.mark.slow

DIM = 8
MAX_STAGED_ROWS = 32
STAGE_BOUND = MAX_STAGED_ROWS * DIM * 4 + 2 * STAGE_RECORD_BYTES
"""One stage of 32 rows (the filler of server 3 below), and room for one more small one."""


@dataclasses.dataclass
class Cluster:
    spec: ClusterSpec
    local: LocalCluster
    updater: Updater
    links: list[ServerLink]

    def holders(self, table: int, row: int) -> list[int]:
        return sorted(
            s.server for s in self.spec.sharding.shards if s.table == table and s.row_start <= row < s.row_end
        )

    def rows_on(self, server: int, want: int) -> tuple[np.ndarray, np.ndarray]:
        """`want` (table, row) pairs held by `server` (and its replica), none by the others."""
        tables, rows = [], []
        for shard in self.spec.sharding.shards_of(server):
            for row in range(shard.row_start, shard.row_end):
                tables.append(shard.table)
                rows.append(row)
        pick = np.random.default_rng(server).choice(len(rows), want, replace=False)
        return np.array(tables)[pick], np.array(rows)[pick]

    def read(self, server: int, table: int, row: int) -> np.ndarray:
        """Row (table, row) as `server` holds it now (a bag of one row)."""
        shard = next(
            s
            for s in self.spec.sharding.shards_of(server)
            if s.table == table and s.row_start <= row < s.row_end
        )
        local = np.array([row - shard.row_start + shard.local_start], dtype=np.int64)
        answer = self.links[server].request(MessageType.LOOKUP, [local, np.zeros(1, dtype=np.int64)])
        row: np.ndarray = answer.buffers[0][0]
        return row

    def assert_everywhere(self, updates: RowUpdates) -> None:
        """Every replica of every row of `updates` holds its value."""
        for table, row, value in zip(
            updates.tables.tolist(), updates.rows.tolist(), updates.values, strict=True
        ):
            for server in self.holders(table, row):
                np.testing.assert_array_equal(self.read(server, table, row), value)

    def wait_back(self, server: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.links[server].changes(LATEST)
                return
            except (ServerUnavailable, LookupFailed):
                assert time.monotonic() < deadline, f"embedding server {server} did not come back"
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    secret = tmp_path_factory.mktemp("secret") / "secret"
    secret.write_text("a secret of the commit protocol tests")
    source = ModelSource(preset="tiny", seed=21, row_dtype="fp32")
    model = model_spec(source)
    assert model.dim == DIM
    plan = replicated(make_plan("row", model.table_rows, model.dim, 2), 2)
    bounds = UpdatesConfig(max_changelog_keys=4, max_staged_bytes=STAGE_BOUND)
    spec = ClusterSpec(
        source,
        plan,
        tuple(Endpoint() for _ in range(4)),
        security=SecurityConfig(secret_file=str(secret)),
        updates=bounds,
    )
    local = LocalCluster(spec, supervise=True)
    spec = local.start()
    state = Cluster(spec, local, Updater(spec), links(spec))
    yield state
    state.updater.close()
    for link in state.links:
        link.close()
    local.stop()


def _updates(tables: np.ndarray, rows: np.ndarray, seed: int, **kwargs: object) -> RowUpdates:
    values = np.random.default_rng(seed).standard_normal((tables.size, DIM)).astype(np.float32)
    return RowUpdates(tables, rows, values, **kwargs)  # type: ignore[arg-type]


def test_a_lower_sequence_after_a_higher_one_is_applied_everywhere(cluster: Cluster) -> None:
    """Item 5: (w, 11) touches only the second shard's servers, then (w, 10) touches both shards:
    both are applied on every replica (before: the second shard skipped (w, 10), a torn version
    acknowledged with 200); resending either is acknowledged with its version, not applied."""
    assert cluster.holders(*(int(x[0]) for x in cluster.rows_on(0, 1))) == [0, 2]
    t1, r1 = cluster.rows_on(1, 2)  # servers 1 and 3 only
    t0, r0 = cluster.rows_on(0, 2)
    higher = _updates(t1, r1, 1, source="w", sequence=11)
    lower = _updates(np.concatenate([t0, t1]), np.concatenate([r0, r1]), 2, source="w", sequence=10)
    first = cluster.updater.apply(higher)
    second = cluster.updater.apply(lower)
    assert second == first + 1
    cluster.assert_everywhere(lower)
    assert cluster.updater.apply(dataclasses.replace(higher, values=higher.values + 1)) == first
    assert cluster.updater.apply(dataclasses.replace(lower, values=lower.values + 1)) == second
    assert cluster.updater.version() == second
    cluster.assert_everywhere(lower)


def test_a_writer_that_lost_its_version_long_ago_is_not_acknowledged_with_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1: writer A stages version v and pauses before its COMMIT; writer B commits v and
    enough versions after it that v leaves the changelog; A's COMMIT is then STALE (before: it
    was acknowledged with B's version and A's rows were never applied), so A applies its rows at
    a later version."""
    a = Updater(cluster.spec)
    try:
        paused, resume = threading.Event(), threading.Event()
        commit = a._links[0].commit

        def commit_after_a_pause(version: int, token: int, written: np.ndarray) -> int:
            if not resume.is_set():
                paused.set()
                resume.wait(60)
            return commit(version, token, written)

        monkeypatch.setattr(a._links[0], "commit", commit_after_a_pause)
        tables, rows = cluster.rows_on(0, 2)
        mine = _updates(tables, rows, 3)
        got: list[int | Exception] = []
        writer = threading.Thread(target=lambda: got.append(a.apply(mine)))
        writer.start()
        assert paused.wait(60)
        v = cluster.updater.version() + 1
        for seed in range(3):  # 8 rows per server each: version v leaves the changelog
            t = np.concatenate([cluster.rows_on(0, 4)[0], cluster.rows_on(1, 4)[0]])
            r = np.concatenate([cluster.rows_on(0, 4)[1], cluster.rows_on(1, 4)[1]])
            cluster.updater.apply(_updates(t, r, 10 + seed))
        assert cluster.links[0].changes(v - 1).truncated
        resume.set()
        writer.join(60)
        assert got and isinstance(got[0], int) and got[0] > v + 2, got
        cluster.assert_everywhere(mine)
    finally:
        a.close()


def test_failed_attempts_do_not_fill_the_stage_for_good(cluster: Cluster) -> None:
    """Item 2: while one server refuses every update (its stage full), retries fail; each
    failed attempt is aborted on the servers that staged it (before: it stayed there, so after
    `max_staged_bytes` every update touching them was refused, even after the healing and a
    restart, which replayed the leaked stages)."""
    filler_version, filler_token = cluster.updater.version() + 1000, 7
    filler = StagedRows(
        filler_version,
        filler_token,
        np.arange(MAX_STAGED_ROWS, dtype=np.int64),
        np.zeros((MAX_STAGED_ROWS, DIM), np.float32),
    )
    assert cluster.links[3].stage(filler) == 0  # server 3 refuses every update now
    t0, r0 = cluster.rows_on(0, 4)
    t1, r1 = cluster.rows_on(1, 4)
    update = _updates(np.concatenate([t0, t1]), np.concatenate([r0, r1]), 4)
    for _ in range(3 * MAX_STAGED_ROWS // 4):  # enough leaked 4-row stages to fill servers 0..2 thrice
        with pytest.raises(UpdateFailed, match="staged bytes"):
            cluster.updater.apply(update)
    assert not cluster.links[3].abort(filler_version, filler_token)  # healed
    version = cluster.updater.apply(update)
    cluster.assert_everywhere(update)
    cluster.local.kill_server(0)  # the log replay does not bring failed attempts back
    cluster.wait_back(0)
    again = _updates(np.concatenate([t0, t1]), np.concatenate([r0, r1]), 5)
    assert cluster.updater.apply(again) == version + 1
    cluster.assert_everywhere(again)


def _first_shard_batch(cluster: Cluster, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch whose rows all lie on servers 0 and 2 (the first row shard of every table)."""
    model = model_spec(cluster.spec.model)
    dense, indices, lengths = random_batch(model, 4, seed, max_bag=2)  # <= 32 rows: the stage bound
    halves = np.repeat(
        [rows // 2 for rows in model.table_rows], lengths.reshape(model.num_tables, -1).sum(axis=1)
    )
    return dense, indices % halves, lengths


def test_a_fresh_ranker_serves_the_current_version_from_its_first_request(cluster: Cluster) -> None:
    """Item 8: a ranker started after updates scores its first request at the current version
    (before: it read version 0, the checkpoint's rows, until its first poll)."""
    model = model_spec(cluster.spec.model)
    mono = build_monolithic(load_weights(cluster.spec.model))
    dense, indices, lengths = random_batch(model, 8, 31)
    update = _updates(*rows_of(model, indices, lengths), 31)  # every row the batch reads
    cluster.updater.apply(update)
    apply_monolithic(mono, update)
    want = reference_scores(mono, dense, indices, lengths)
    for _ in range(3):
        ranker = build_ranker(cluster.spec)
        try:
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)
            assert ranker.ready()
        finally:
            ranker.close()


def test_a_stalled_server_does_not_freeze_reads(cluster: Cluster) -> None:
    """Item 9: with server 3 stopped (SIGSTOP), an update is decided; the ranker's sync round
    waits for server 3 while requests go on at the version they had, then it reads the new one
    (before: the sync held the read lock for the link timeout and a reconnect, ~60 s)."""
    model = model_spec(cluster.spec.model)
    mono = build_monolithic(load_weights(cluster.spec.model))
    dense, indices, lengths = _first_shard_batch(cluster, 32)
    tables, rows = rows_of(model, indices, lengths)
    before = _updates(tables, rows, 32)
    cluster.updater.apply(before)
    apply_monolithic(mono, before)
    old = reference_scores(mono, dense, indices, lengths)
    ranker = build_ranker(cluster.spec)
    pusher = Updater(cluster.spec)
    stopped = cluster.local.pids[3]
    try:
        np.testing.assert_allclose(ranker.score(dense, indices, lengths), old, atol=1e-5)
        versions = ranker.row_version
        assert versions is not None
        start = versions.version
        freeze(stopped)
        after = _updates(tables, rows, 33)
        push = threading.Thread(target=pusher.apply, args=(after,))  # waits for server 3's commit
        push.start()
        deadline = time.monotonic() + 60
        while not (
            cluster.links[0].changes(LATEST).version > start and versions._started > versions._finished
        ):
            assert time.monotonic() < deadline, "no sync round started for the new version"
            time.sleep(0.01)
        in_flight = versions._started
        for _ in range(5):
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), old, atol=1e-5)
        assert versions._finished < in_flight  # the reads did not wait for the round
        os.kill(stopped, signal.SIGCONT)
        push.join(120)
        apply_monolithic(mono, after)
        ranker.row_version.read_at_least(start + 1)
        np.testing.assert_allclose(
            ranker.score(dense, indices, lengths), reference_scores(mono, dense, indices, lengths), atol=1e-5
        )
    finally:
        os.kill(stopped, signal.SIGCONT)
        pusher.close()
        ranker.close()


def test_a_lost_commit_answer_is_resolved_or_reported_as_unknown_never_applied_twice(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 7: server 0 commits, but its answer is lost. The updater asks server 0 (ABORT) and
    acknowledges the version it decided; when server 0 cannot be asked either, the update fails
    with an unknown outcome naming the (source, sequence) it was given (one is generated when
    none is), and resending those applies it once (before: "not applied", and a retry without a
    sequence applied it twice)."""
    a = Updater(cluster.spec)
    try:
        link = a._links[0]
        commit, abort = link.commit, link.abort

        def answer_lost(version: int, token: int, written: np.ndarray) -> int:
            commit(version, token, written)
            raise ServerUnavailable(0, "127.0.0.1", "the answer was lost")

        monkeypatch.setattr(link, "commit", answer_lost)
        first = _updates(*cluster.rows_on(0, 2), 8)
        version = a.apply(first)  # resolved by asking server 0
        assert version == cluster.updater.version()
        cluster.assert_everywhere(first)

        def unreachable(version: int, token: int) -> bool:
            raise ServerUnavailable(0, "127.0.0.1", "down")

        monkeypatch.setattr(link, "abort", unreachable)
        second = _updates(*cluster.rows_on(0, 2), 9)
        with pytest.raises(UpdateFailed, match="outcome unknown") as failed:
            a.apply(second)
        source, sequence = re.search(r"source '(.+)' and sequence (\d+)", str(failed.value)).groups()  # type: ignore[union-attr]
        assert cluster.updater.version() == version + 1  # it was applied
        again = dataclasses.replace(second, values=second.values + 1, source=source, sequence=int(sequence))
        assert cluster.updater.apply(again) == version + 1  # once
        assert cluster.updater.version() == version + 1
        cluster.assert_everywhere(second)
        monkeypatch.setattr(link, "abort", abort)
    finally:
        a.close()


def test_a_server_that_lost_its_log_resyncs_from_its_replica(cluster: Cluster) -> None:
    """Items 3 and 4: server 3 comes back without its log (at version 0, checkpoint rows).
    Committing the versions it missed is refused wherever they wrote its rows, so it claims no
    version it lacks; it resyncs its rows from its replica (server 1) and catches up, answering
    STALE meanwhile, so requests reading its rows are exact throughout (before the resync: it
    stayed behind for good, its rows served by server 1 only; before that, an empty commit moved
    it to the current version holding checkpoint rows, and it served them)."""
    t1, r1 = cluster.rows_on(1, 2)
    update = _updates(t1, r1, 6)
    version = cluster.updater.apply(update)
    assert cluster.links[3].changes(LATEST).version == version
    log_dir = cluster.spec.updates.log_dir
    assert log_dir is not None
    cluster.local.kill_server(3)
    for path in Path(log_dir).glob("server-3.updates*"):
        path.unlink()  # the disk was replaced
    cluster.wait_back(3)
    latest = cluster.updater.apply(_updates(*cluster.rows_on(0, 1), 7))  # catch-up runs for server 3
    assert latest == version + 1  # one version (before: each retry committed one more, up to 16)
    # Requests reading its rows are exact while it resyncs and after.
    model = model_spec(cluster.spec.model)
    dense, indices, lengths = random_batch(model, 4, 51, max_bag=2)
    second = np.repeat(
        [rows // 2 for rows in model.table_rows], lengths.reshape(model.num_tables, -1).sum(axis=1)
    )
    indices = indices % second + second  # rows of the second shard only: servers 1 and 3
    mono = build_monolithic(load_weights(cluster.spec.model))
    tables, rows = rows_of(model, indices, lengths)
    held = np.stack([cluster.read(1, t, r) for t, r in zip(tables.tolist(), rows.tolist(), strict=True)])
    apply_monolithic(mono, RowUpdates(tables, rows, held))  # the rows as the up-to-date replica holds them
    want = reference_scores(mono, dense, indices, lengths)
    ranker = build_ranker(cluster.spec)
    deadline = time.monotonic() + 60
    try:
        while cluster.links[3].changes(LATEST).version != latest:
            assert time.monotonic() < deadline, "server 3 did not resync"
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)
        for _ in range(4):
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)
    finally:
        ranker.close()
    for i, (table, row) in enumerate(zip(t1.tolist(), r1.tolist(), strict=True)):
        np.testing.assert_array_equal(cluster.read(3, table, row), update.values[i])  # resynced
    np.testing.assert_array_equal(
        np.stack([cluster.read(3, t, r) for t, r in zip(tables.tolist(), rows.tolist(), strict=True)]), held
    )
