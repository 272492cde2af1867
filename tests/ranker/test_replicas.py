"""Replicated serving: replica choice by load, failover without losing a request, supervision.

In-process tests drive a ranker over a transport whose servers fail on cue; the slow ones run
`flexemr serve --replicas` and kill (or stop) real embedding-server processes under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from flexemr.cli.main import main
from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.ranker.admission import Admission
from flexemr.sharding.plan import make_plan, replicated
from flexemr.sharding.router import RangeRouter, Uncovered
from flexemr.transport.base import LookupRequest, NoReplica, ServerUnavailable
from flexemr.transport.local import LocalTransport
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import freeze, random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)


class FailingTransport(LocalTransport):
    """Local stores; servers in `failing` fail every subrequest as a dead server would, and
    servers in `hung` never answer."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.failing: set[int] = set()
        self.hung: set[int] = set()
        self.sent = [0] * len(self.stores)

    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        self.sent[server] += 1
        if server in self.hung:
            return Future()
        if server in self.failing:
            future: Future[np.ndarray] = Future()
            future.set_exception(ServerUnavailable(server, "test", "killed"))
            return future
        return super().submit(server, request)


@pytest.mark.parametrize("strategy", ["table", "row"])
def test_router_sends_each_piece_to_one_usable_replica(strategy: str) -> None:
    plan = replicated(make_plan(strategy, SPEC.table_rows, SPEC.dim, 2), 2)
    assert (plan.num_servers, plan.replicas) == (4, 2)
    router = RangeRouter(plan)
    _, indices, lengths = random_batch(SPEC, 32, seed=1)
    keys = router.keys(indices, np.bincount(np.repeat(np.arange(lengths.size) // 32, lengths), minlength=4))
    first = {s.server for s in router.route(keys, lengths, np.array([0.0, 0, 9, 9]))}
    assert first <= {0, 1}  # the less loaded replica set takes everything
    second = {s.server for s in router.route(keys, lengths, np.array([9.0, 9, 0, 0]))}
    assert second <= {2, 3}
    # every key goes to exactly one server, whichever replicas answer
    mixed = list(router.route(keys, lengths, np.array([0, np.inf, np.inf, 0])))
    assert {s.server for s in mixed} <= {0, 3}
    assert sum(s.rows.size for s in mixed) == keys.size
    with pytest.raises(Uncovered, match="no replica of table"):
        list(router.route(keys, lengths, np.array([np.inf, 0, np.inf, 0])))
    assert router.coverable(np.array([True, False, False, True]))
    assert not router.coverable(np.array([False, True, False, True]))


@pytest.mark.parametrize("lookup", ["partial", "raw"])
def test_failover_keeps_scores_exact(lookup: str) -> None:
    plan = replicated(make_plan("row", SPEC.table_rows, SPEC.dim, 2), 2)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(4)))
    spec = ClusterSpec.from_dict({**spec.to_dict(), "ranker": {"lookup": lookup, "request_timeout_s": 2.0}})
    transport = FailingTransport(plan, load_weights(SOURCE))
    ranker = build_ranker(spec, transport=transport)
    monolithic = build_monolithic(load_weights(SOURCE))
    try:
        dense, indices, lengths = random_batch(SPEC, 16, seed=5)
        expected = reference_scores(monolithic, dense, indices, lengths)
        transport.failing = {0}  # a replica that fails every subrequest...
        transport.hung = {3}  # ...and one that never answers: both are routed around
        for _ in range(6):
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), expected, atol=1e-5)
        assert ranker.failovers > 0 and transport.sent[1] > 0 and transport.sent[2] > 0
        transport.failing = {0, 2}  # rows of servers 0 and 2 have no replica left
        with pytest.raises(NoReplica, match="embedding server 0, 2"):
            ranker.score(dense, indices, lengths)
    finally:
        ranker.close()


def test_without_replicas_a_server_down_fails_the_request_before_anything_is_sent() -> None:
    """One holder per row: the ranker skips balancing by load, but a server that is not usable
    still ranks out, so its rows have no replica and nothing is sent to anyone."""
    plan = make_plan("table", SPEC.table_rows, SPEC.dim, 2)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(2)))
    transport = FailingTransport(plan, load_weights(SOURCE))
    ranker = build_ranker(spec, transport=transport)
    monolithic = build_monolithic(load_weights(SOURCE))
    try:
        dense, indices, lengths = random_batch(SPEC, 16, seed=5)
        np.testing.assert_allclose(
            ranker.score(dense, indices, lengths),
            reference_scores(monolithic, dense, indices, lengths),
            atol=1e-5,
        )
        sent = list(transport.sent)
        transport.connected = lambda: [True, False]  # type: ignore[method-assign]
        with pytest.raises(NoReplica, match="embedding server 1 "):
            ranker.score(dense, indices, lengths)
        assert transport.sent == sent
    finally:
        ranker.close()


@pytest.mark.timeout(60)
def test_a_hung_lookup_gives_up_at_the_requests_deadline_not_the_lookup_timeout() -> None:
    """The lookup timeout is an hour here: only the ticket's deadline can end the wait (a hang would
    trip the test's timeout instead)."""
    plan = make_plan("row", SPEC.table_rows, SPEC.dim, 2)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(2)))
    spec = ClusterSpec.from_dict({**spec.to_dict(), "ranker": {"request_timeout_s": 3600.0}})
    transport = FailingTransport(plan, load_weights(SOURCE))
    ranker = build_ranker(spec, transport=transport)
    try:
        transport.hung = {1}
        ticket = Admission(max_samples=64, max_pending=4).arrive(timeout_s=0.5)
        with pytest.raises(ServerUnavailable, match="no answer within"):
            ranker.score(*random_batch(SPEC, 8, seed=6), ticket=ticket)
    finally:
        ranker.close()


# -- real processes -----------------------------------------------------------------------------------

BATCH = random_batch(SPEC, 8, seed=4)
EXPECTED = reference_scores(build_monolithic(load_weights(SOURCE)), *BATCH)
BODY = infer_body(*BATCH)


class Load:
    """A bounded loop of requests from a thread; every answer is checked against the monolith."""

    def __init__(self, url: str, requests: int) -> None:
        self.statuses: list[int] = []
        self.wrong = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(url, requests), daemon=True)
        self._thread.start()

    def _run(self, url: str, requests: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(requests):
                response = client.post("/v2/models/dlrm/infer", json=BODY)
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    scores = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
                    self.wrong += not np.allclose(scores, EXPECTED, atol=1e-5)
                else:
                    self.errors.append(response.json()["error"])

    def wait_for(self, count: int) -> None:
        while len(self.statuses) < count and self._thread.is_alive():
            time.sleep(0.02)

    def join(self) -> None:
        self._thread.join(300)


def _wait_until(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def _dead(pid: int) -> bool:
    """Exited (a zombie until its parent reaps it: its sockets are closed already) or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _ready(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v2/health/ready")
    return {"status": response.status_code, **response.json()}


def _subrequests(client: httpx.Client) -> list[int]:
    return [s["subrequests"] for s in client.get("/v2/stats").json()["transport"]["servers"]]


@pytest.mark.slow
def test_two_replicas_survive_a_kill_and_a_stop(serve: Callable[..., ServeProcess]) -> None:
    server = serve(
        "--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--sharding", "row",
        "--replicas", "2", "--cache", "off",
    )  # fmt: skip
    children = server.children()
    assert len(children) == 4
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # a hung (SIGSTOPped) replica is routed around
        freeze(children[1])
        try:
            stopped = Load(server.url, 20)
            stopped.join()
            assert stopped.statuses == [200] * 20 and stopped.wrong == 0, stopped.errors
            _wait_until(lambda: _ready(client)["degraded"], "the stopped server shows as degraded")
            ready = _ready(client)
            assert ready["status"] == 200 and ready["every_shard_served"] and len(ready["servers_down"]) == 1
        finally:
            os.kill(children[1], signal.SIGCONT)
        _wait_until(lambda: not _ready(client)["degraded"], "the resumed server is re-admitted")

        # kill -9 under steady load: no failed request, no wrong score
        load = Load(server.url, 120)
        load.wait_for(20)
        os.kill(children[0], signal.SIGKILL)
        load.join()
        assert load.statuses == [200] * 120 and load.wrong == 0, load.errors
        metrics = client.get("/metrics").text
        assert "flexemr_failovers" in metrics and "flexemr_replicas_servers_up" in metrics

        # serve restarts it on the same address; the ranker puts it back in rotation
        _wait_until(lambda: len(server.children()) == 4, "serve restarts the killed server")
        _wait_until(lambda: not _ready(client)["degraded"], "the restarted server is re-admitted")
        before = _subrequests(client)
        again = Load(server.url, 40)
        again.join()
        assert again.statuses == [200] * 40 and again.wrong == 0
        after = _subrequests(client)
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


@pytest.mark.slow
def test_one_replica_gives_503_then_resumes_by_itself(serve: Callable[..., ServeProcess]) -> None:
    server = serve(
        "--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--sharding", "row", "--cache", "off"
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v2/models/dlrm/infer", json=BODY).status_code == 200
        os.kill(server.children()[1], signal.SIGKILL)
        statuses: list[int] = []

        def served() -> bool:
            response = client.post("/v2/models/dlrm/infer", json=BODY)
            statuses.append(response.status_code)
            if response.status_code == 200:
                scores = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
                np.testing.assert_allclose(scores, EXPECTED, atol=1e-5)  # never a wrong score
                return True
            assert response.status_code == 503, response.text
            assert "embedding server" in response.json()["error"] and "outputs" not in response.json()
            return False

        _wait_until(served, "service resumes after serve restarts the server")
        assert 503 in statuses  # the kill was seen as failed requests, not as scores


@pytest.mark.slow
def test_a_replicated_plan_from_the_planner_serves(
    serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--preset", "tiny", "--qps", "100", "--p99-ms", "50", "--availability", "1",
                 "--uncalibrated", "--out", str(plan_path)]) == 0  # fmt: skip
    assert json.loads(plan_path.read_text())["sharding"]["replicas"] == 2
    # a plan for another row scale is refused, saying what differs (in a process of its own: a serve
    # that failed to refuse would start serving)
    refused = subprocess.run(
        [sys.executable, "-m", "flexemr.cli.main", "serve", "--preset", "tiny", "--row-scale", "0.5",
         "--plan", str(plan_path), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "same --row-scale" in refused.stderr, refused.stderr
    server = serve("--preset", "tiny", "--seed", "3", "--plan", str(plan_path), "--cache", "off")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/v2/models/dlrm/infer", json=BODY)
        assert response.status_code == 200, response.text
        scores = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(scores, EXPECTED, atol=1e-5)
        assert _ready(client)["replicas"] == 2


@pytest.mark.slow
def test_rankers_share_one_address_and_survive_one_dying(serve: Callable[..., ServeProcess]) -> None:
    server = serve("--preset", "tiny", "--seed", "3", "--embedding-servers", "1", "--rankers", "2")
    children = server.children()
    assert len(children) == 2  # one embedding server, one more ranker

    def fresh_connection_scores() -> int:
        with httpx.Client(base_url=server.url, timeout=60) as client:  # a new connection each time
            response = client.post("/v2/models/dlrm/infer", json=BODY)
            if response.status_code == 200:
                scores = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
                np.testing.assert_allclose(scores, EXPECTED, atol=1e-5)
            return response.status_code

    assert [fresh_connection_scores() for _ in range(10)] == [200] * 10
    (ranker,) = [
        pid for pid in children if b"embedding-server" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(ranker, signal.SIGKILL)
    _wait_until(lambda: _dead(ranker), "the killed ranker is gone (its sockets closed)")
    assert [fresh_connection_scores() for _ in range(10)] == [200] * 10
