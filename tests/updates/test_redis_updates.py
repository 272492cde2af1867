"""`flexemr update --redis`: a consumer SIGKILLed mid-stream and restarted loses nothing and applies
nothing twice (the servers' counters say so); the rows served are the stream's last values."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch

from flexemr.config.model import ModelSource
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.engine import IoEngine
from flexemr.entrypoints.redis_server import RedisServer
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import NEEDS_REDIS_SERVER, freeze, reference_scores

# Multi-process (`make test-fast` leaves them out); clusters start slowly on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), NEEDS_REDIS_SERVER]

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)
SECRET = secrets.token_hex(16)
ENTRIES = 120
ROWS = 20
"""Every entry writes 4 of table 0's first ROWS rows."""


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


def consumer(spec_path: Path, url: str, log: Path, *more: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "flexemr.cli.main", "update", "--spec", str(spec_path),
               "--redis", url, "--stream", "rows", "--group", "serving", "--batch", "1", *more]  # fmt: skip
    env = {**os.environ, "FLEXEMR_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:  # the child keeps its own copy
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def group(client: redis.Redis) -> dict[str, int]:
    groups = client.xinfo_groups("rows")
    if not groups:  # the consumer has not made it yet
        return {"read": 0, "pending": 0}
    info = groups[0]
    return {"read": int(info["entries-read"] or 0), "pending": int(info["pending"])}


def wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_killed_consumer_resumes_without_loss_or_duplicates(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    spec_path, log = tmp_path / "cluster.json", tmp_path / "consumer.log"
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin", "--preset",
               "tiny", "--seed", "3", "--embedding-servers", "2", "--spec-out", str(spec_path)]  # fmt: skip
    serve = ServeProcess(command, "flexemr ready:", 240.0, {**os.environ, "FLEXEMR_SECRET": SECRET})
    client = redis.Redis.from_url(redis_server.url)
    rng = np.random.default_rng(5)
    final = np.zeros((ROWS, SPEC.dim), dtype=np.float32)
    unique_rows = 0
    for _ in range(ENTRIES):
        rows = rng.choice(ROWS, 4, replace=False).astype(np.int64)
        values = rng.standard_normal((4, SPEC.dim)).astype(np.float32)
        final[rows] = values
        unique_rows += rows.size
        client.xadd(
            "rows", {"table": np.zeros(4, "<i8").tobytes(), "row": rows.tobytes(), "values": values.tobytes()}
        )
    client.xadd("rows", {"table": b"\x00" * 8, "row": b"\x01"})  # malformed: set aside, nothing applied
    started: list[subprocess.Popen[bytes]] = []
    try:
        first = consumer(spec_path, redis_server.url, log)
        started.append(first)
        wait_for(lambda: group(client)["read"] >= ENTRIES // 4, 120, "the consumer to start")
        freeze(first.pid)  # a still picture of the group, then the kill
        at_kill = group(client)
        first.kill()
        first.wait(30)
        acked = at_kill["read"] - at_kill["pending"]
        assert 0 < acked < ENTRIES, at_kill  # killed mid-way

        second = consumer(spec_path, redis_server.url, log, "--metrics-port", "0")
        started.append(second)
        wait_for(
            lambda: group(client) == {"read": ENTRIES + 1, "pending": 0}, 300, "the stream to be consumed"
        )
        metrics_url = re.search(r"metrics: (http://\S+)", log.read_text())
        assert metrics_url is not None
        metrics = httpx.get(metrics_url.group(1), timeout=30).text
        assert re.search(r"^flexemr_update_lag_seconds_count [1-9]", metrics, re.MULTILINE), metrics
        assert re.search(r"^flexemr_updates_rows_total [1-9]", metrics, re.MULTILINE)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        assert "stopped:" in log.read_text()
        rejected = client.xrange("rows:rejected")
        assert len(rejected) == 1 and b"field" in rejected[0][1][b"error"]

        # The rows served are the last value each got in the stream.
        model = build_monolithic(load_weights(SOURCE))
        with torch.no_grad():
            model.emb_l[0].weight[:ROWS] = torch.from_numpy(final)
        lengths = np.zeros((SPEC.num_tables, ROWS), dtype=np.int32)
        lengths[0] = 1
        dense = rng.standard_normal((ROWS, SPEC.num_dense)).astype(np.float32)
        batch = (dense, np.arange(ROWS, dtype=np.int64), lengths.reshape(-1))
        with httpx.Client(base_url=serve.url, timeout=60) as http:
            out = http.post("/v2/models/dlrm/infer", json=infer_body(*batch)).json()
        np.testing.assert_allclose(out["outputs"][0]["data"], reference_scores(model, *batch), atol=1e-5)

        # Every entry's rows were written exactly once (a re-delivered entry was a duplicate).
        spec = ClusterSpec.load(spec_path)
        engine = IoEngine(spec.embedding_servers, identities(spec), spec.engine, secret=SECRET.encode(),
                          node_limits=spec.limits)  # fmt: skip
        engine.start(timeout=60)
        try:
            updates = [engine.server_credit_stats(s)["updates"] for s in range(spec.sharding.num_servers)]
        finally:
            engine.close()
        assert sum(u["rows_applied"] for u in updates) == unique_rows, updates
        assert sum(u["duplicates"] for u in updates) <= 1, updates  # at most the entry in flight at the kill
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        serve.stop()
        client.close()
