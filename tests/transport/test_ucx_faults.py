"""UCX node links under faults and updates, with real processes, over UCX's TCP and over shared
memory: a stopped server (the heartbeat), a killed replica (failover, exact scores), a wire fuzz,
row updates applied to every replica."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ucxx", reason="the ucx extra is not installed (pip install 'flexemr[ucx]')")

from flexemr.config import Endpoint, EngineConfig, FrameLimits, NodeLimits
from flexemr.config.model import ModelSource
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import make_engine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol import ucx_stream
from flexemr.protocol.frames import MessageType, recv_frame, send_frame
from flexemr.protocol.handshake import Hello, client_handshake, new_nonce
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupRequest, ServerUnavailable
from flexemr.updates import Updater
from tests.conftest import ServeProcess
from tests.core.helpers import freeze, random_batch, reference_scores
from tests.embedding_server.test_wire_fuzz import random_frame, random_json
from tests.engine.helpers import lookup_frame, random_request, reference, server_process
from tests.ranker.test_replicas import Load
from tests.transport.ucx_helpers import SECRET, ucx_spec
from tests.updates.helpers import apply_monolithic, random_updates


def test_a_stopped_ucx_server_fails_fast_by_the_heartbeat_and_comes_back(link: str) -> None:
    """SIGSTOP: no reset comes (over shared memory UCX has no peer error handling): the heartbeat
    marks it stalled, fails what is in flight to it, the other serves on; SIGCONT brings it back."""
    with LocalCluster(ucx_spec()) as local:
        spec = local.spec
        engine = make_engine(
            spec.embedding_servers,
            identities(spec),
            spec.engine,
            secret=SECRET.encode(),
            node_limits=NodeLimits(heartbeat_timeout_s=2.0),
        )
        engine.start(timeout=30)
        stores = [ShardStore(spec.sharding, i, load_weights(spec.model), progress=False) for i in (0, 1)]
        rng = np.random.default_rng(1)

        def exact(server: int) -> None:
            request = random_request(rng, stores[server].num_rows)
            values = engine.submit(server, request).result(30)
            np.testing.assert_allclose(values, reference(stores[server], request), rtol=1e-5, atol=1e-6)

        try:
            exact(0)
            freeze(local.pids[0])
            try:
                stuck = [engine.submit(0, random_request(rng, stores[0].num_rows)) for _ in range(20)]
                _, not_done = wait(stuck, timeout=60)  # no timeout of their own: only the heartbeat ends them
                assert not not_done
                assert all(isinstance(f.exception(), ServerUnavailable) for f in stuck)
                assert engine.health[0].state == "stalled"
                exact(1)
            finally:
                os.kill(local.pids[0], signal.SIGCONT)
            deadline = time.monotonic() + 60
            while not engine.connected()[0]:
                assert time.monotonic() < deadline, engine.health[0].reason
                time.sleep(0.2)
            exact(0)
        finally:
            engine.close()


def _dial_ucx(endpoint: Endpoint) -> ucx_stream.UcxSocket:
    return ucx_stream.connect(endpoint, timeout_s=5)


def fuzz_one(endpoint: Endpoint, rng: random.Random) -> None:
    """One UCX endpoint: maybe a real handshake first (data, credited data or control), then junk."""
    stage = rng.randrange(4)
    sock = _dial_ucx(endpoint)
    try:
        if stage == 0:
            sock.sendall(rng.choice([random_json(rng), rng.randbytes(rng.randrange(1, 300))]))
        else:
            role, credits = [("data", None), ("data", 4), ("control", None)][stage - 1]
            hello = Hello(role, f"fuzz{rng.randrange(3)}", new_nonce(), rng.randrange(4), credits)  # type: ignore[arg-type]
            client_handshake(sock, hello, SECRET.encode(), FrameLimits())  # type: ignore[arg-type]
        for _ in range(rng.randrange(1, 4)):
            sock.sendall(random_frame(rng))
        sock.settimeout(0.05)
        sock.recv_into(memoryview(bytearray(24)))
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


@pytest.mark.slow
def test_malformed_wire_input_over_ucx_never_kills_the_server(link: str, tmp_path: Path) -> None:
    spec = ucx_spec("table", servers=1)
    with server_process(spec, tmp_path, max_fds=1024) as (spec, lines):  # asserts it is alive after
        endpoint = spec.embedding_servers[0]
        rng = random.Random(20261207)
        for _ in range(60):
            fuzz_one(endpoint, rng)
        store = ShardStore(spec.sharding, 0, load_weights(spec.model), progress=False)
        good = _dial_ucx(endpoint)
        try:
            client_handshake(good, Hello("data", "good", new_nonce()), SECRET.encode(), FrameLimits())  # type: ignore[arg-type]
            request = LookupRequest(np.array([1, 2, 7], np.int64), np.array([0, 1], np.int64))
            send_frame(good, lookup_frame(1, request))  # type: ignore[arg-type]
            frame = recv_frame(good, FrameLimits())  # type: ignore[arg-type]
            assert frame.type == MessageType.RESULT
            np.testing.assert_allclose(frame.buffers[0], reference(store, request), rtol=1e-6)
        finally:
            good.close()
    assert not any("Traceback" in line for line in lines), "".join(lines[-40:])
    assert any("malformed" in line for line in lines)  # the fuzz reached the checks


@pytest.mark.slow
def test_replicas_over_ucx_survive_a_kill_9_with_exact_scores(
    link: str, serve: Callable[..., ServeProcess]
) -> None:
    server = serve(
        "--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--sharding", "row",
        "--replicas", "2", "--cache", "off", "--transport", "ucx",
    )  # fmt: skip
    children = server.children()
    assert len(children) == 4
    load = Load(server.url, 80)
    load.wait_for(15)
    os.kill(children[0], signal.SIGKILL)
    load.join()
    assert load.statuses == [200] * 80 and load.wrong == 0, load.errors
    with httpx.Client(base_url=server.url, timeout=60) as client:
        servers = client.get("/v2/stats").json()["transport"]["servers"]
    assert all(s["subrequests"] > 0 for s in servers[1:])  # the replicas carried the load


@pytest.mark.slow
def test_row_updates_over_ucx_reach_every_replica_and_scores_stay_exact(link: str) -> None:
    source = ModelSource(preset="tiny", seed=11)
    model = model_spec(source)
    plan = replicated(make_plan("row", model.table_rows, model.dim, 2), 2)
    endpoints = tuple(Endpoint() for _ in range(4))
    spec = ClusterSpec(source, plan, endpoints, engine=EngineConfig(transport="ucx"))
    with LocalCluster(spec) as local:
        ranker = build_ranker(local.spec, connect_timeout_s=60)
        updater = Updater(local.spec)
        try:
            mono = build_monolithic(load_weights(source))
            for seed in range(2):
                updates = random_updates(model, 20, seed)
                version = updater.apply(updates)
                apply_monolithic(mono, updates)
                deadline = time.monotonic() + 30
                assert ranker.row_version is not None
                while ranker.row_version.version < version:
                    assert time.monotonic() < deadline, "the ranker did not reach the new version"
                    time.sleep(0.05)
                dense, indices, lengths = random_batch(model, 16, seed)
                np.testing.assert_allclose(
                    ranker.score(dense, indices, lengths),
                    reference_scores(mono, dense, indices, lengths),
                    atol=1e-5,
                )
        finally:
            updater.close()
            ranker.close()
