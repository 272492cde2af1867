"""Issue #27's done-means over real processes: a stream of 10,000 updates keeps every server's
update files bounded (compaction by snapshot, with small `updates.max_log_bytes` and
`max_decided_versions`), and a replica that was down through the stream (so far behind that server
0 no longer remembers the versions it missed) rejoins by resyncing from its replica, then serves
exact scores. 4 embedding servers: 2 row shards x 2 replicas, fp32 rows of the tiny preset."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint, SecurityConfig, UpdatesConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import links
from flexemr.entrypoints.local import READY_PREFIX, LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol.updates import LATEST
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.updates import RowUpdates, Updater
from tests.core.helpers import random_batch, reference_scores
from tests.updates.helpers import apply_monolithic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # ~2.5 min on a loaded 2-core machine

UPDATES = 10_000
MAX_LOG_BYTES = 32 * 2**10
REMEMBERED = 500
"""Decided versions and applied (source, sequence) pairs the servers remember."""


def _last_wins(tables: list[np.ndarray], rows: list[np.ndarray], values: list[np.ndarray]) -> RowUpdates:
    """The updates, in order, as one: each row with the last value it was given."""
    t, r, v = np.concatenate(tables), np.concatenate(rows), np.concatenate(values)
    _, last = np.unique((t * 10**6 + r)[::-1], return_index=True)
    keep = t.size - 1 - last
    return RowUpdates(t[keep], r[keep], v[keep])


def _update_files(log_dir: Path, server: int) -> int:
    return sum(p.stat().st_size for p in log_dir.glob(f"server-{server}.updates*") if p.exists())


def _wait_at(spec: ClusterSpec, server: int, version: int, timeout_s: float) -> None:
    link = links(spec)[server]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if link.changes(LATEST).version == version:
                    return
            except (ServerUnavailable, LookupFailed):
                pass
            assert time.monotonic() < deadline, f"embedding server {server} did not reach version {version}"
            time.sleep(0.2)
    finally:
        link.close()


def _score(
    ranker: Ranker, batch: tuple[np.ndarray, np.ndarray, np.ndarray], timeout_s: float = 60
) -> np.ndarray:
    """The batch's scores, asking again while the ranker refuses it (on a loaded machine its
    heartbeats may call a healthy server stalled for a while): a refusal is never a wrong score."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ranker.score(*batch)
        except (ServerUnavailable, LookupFailed):
            assert time.monotonic() < deadline, "the ranker kept refusing the batch"
            time.sleep(0.5)


def test_a_replica_down_through_10000_updates_rejoins_and_serves_exact_scores(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a secret of the rejoin test")
    source = ModelSource(preset="tiny", seed=27, row_dtype="fp32")
    model = model_spec(source)
    plan = replicated(make_plan("row", model.table_rows, model.dim, 2), 2)  # 0, 2: shard 0; 1, 3: 1
    shm = Path("/dev/shm")
    log_dir = Path(tempfile.mkdtemp(prefix="flexemr-rejoin-", dir=shm if shm.is_dir() else tmp_path))
    bounds = UpdatesConfig(  # logs in memory where there is /dev/shm: bounds, not fsyncs, are the point
        log_dir=str(log_dir),
        max_log_bytes=MAX_LOG_BYTES,
        max_decided_versions=REMEMBERED,
        max_applied_sequences=REMEMBERED,
    )
    spec = ClusterSpec(
        source,
        plan,
        tuple(Endpoint() for _ in range(4)),
        security=SecurityConfig(secret_file=str(secret)),
        updates=bounds,
    )
    local = LocalCluster(spec)
    spec = local.start()
    updater = Updater(spec)
    rejoined: subprocess.Popen[str] | None = None
    try:
        mono = build_monolithic(load_weights(source))
        rng = np.random.default_rng(27)
        half = np.array(model.table_rows) // 2  # rows below it: shard 0 (servers 0 and 2)

        # Rows of both shards change while every server is up.
        tables = np.repeat(np.arange(model.num_tables), 4)
        rows = rng.integers(0, np.array(model.table_rows)[tables])
        first = RowUpdates(tables, rows, rng.standard_normal((tables.size, model.dim)).astype(np.float32))
        at = updater.apply(_last_wins([first.tables], [first.rows], [first.values]))
        apply_monolithic(mono, _last_wins([first.tables], [first.rows], [first.values]))
        _wait_at(spec, 3, at, 30)

        # Server 3 (shard 1's second replica) is down through the stream, which writes shard 0
        # (with a replica down, updates to its rows fail: every replica stages an update's rows).
        local.kill_server(3)
        written: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        largest = [0] * 3
        for i in range(UPDATES):
            t = rng.integers(0, model.num_tables, 2)
            update = RowUpdates(
                t, rng.integers(0, half[t]), rng.standard_normal((2, model.dim)).astype(np.float32)
            )
            updater.apply(update)
            for got, part in zip(written, (update.tables, update.rows, update.values), strict=True):
                got.append(part)
            if i % 250 == 0:
                largest = [max(largest[s], _update_files(log_dir, s)) for s in range(3)]
        latest = updater.version()
        assert latest == at + UPDATES
        apply_monolithic(mono, _last_wins(*written))

        # Every server's update files stayed bounded: a log of at most max_log_bytes (and one
        # record), a snapshot of the rows written, the remembered versions and pairs.
        row_bytes = max(plan.server_rows(s) for s in range(4)) * (model.dim * 4 + 8)
        remembered = REMEMBERED * (8 + 8 * 4) + REMEMBERED * 3 * 8  # decided versions, applied pairs
        bound = MAX_LOG_BYTES + 4 * 2**10 + row_bytes + remembered + 32 * 2**10  # zip headers
        assert bound < UPDATES * 60 / 5  # without compaction: a COMMIT record alone takes 88 bytes
        assert all(0 < size <= bound for size in largest), (largest, bound)
        assert all((log_dir / f"server-{s}.updates.snapshot").exists() for s in range(3))

        # Server 3 comes back with its log: 10,000 versions behind, of which server 0 remembers
        # 500; it resyncs from server 1 (writing a snapshot at the version it copied) and
        # catches up.
        (log_dir / "server-3.updates.snapshot").unlink(missing_ok=True)
        path = tmp_path / "cluster.json"
        spec.save(path)
        rejoined = subprocess.Popen(
            [sys.executable, "-m", "flexemr.cli.main", "embedding-server", "--spec", str(path),
             "--index", "3", "--quiet"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert rejoined.stdout is not None and rejoined.stdout.readline().startswith(READY_PREFIX)
        _wait_at(spec, 3, latest, 60)
        assert (log_dir / "server-3.updates.snapshot").exists()

        # It serves exact scores: with server 1 down, shard 1 is read from server 3 alone.
        batches = [random_batch(model, 16, seed) for seed in range(4)]
        want = [reference_scores(mono, *batch) for batch in batches]
        ranker = build_ranker(spec)
        local.kill_server(1)
        try:
            for batch, scores in zip(batches, want, strict=True):
                np.testing.assert_allclose(_score(ranker, batch), scores, atol=1e-5)
        finally:
            ranker.close()
    finally:
        updater.close()
        if rejoined is not None:
            rejoined.terminate()
            rejoined.wait(30)
            if rejoined.stdout is not None:
                rejoined.stdout.close()
        local.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
