"""UCX node links (`--transport ucx`) with real embedding-server processes on this machine, over
UCX's TCP transport and over shared memory (`UCX_TLS`): exact scores in every engine mode and
sharding, the handshake's security, the heartbeat, failover and a wire fuzz."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ucxx", reason="the ucx extra is not installed (pip install 'flexemr[ucx]')")

from flexemr.config import Endpoint, EngineConfig, FrameLimits, NodeLimits
from flexemr.config.model import ModelSource
from flexemr.config.security import SecurityConfig, identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine, make_engine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol import ucx_stream
from flexemr.protocol.frames import MessageType, recv_frame, send_frame
from flexemr.protocol.handshake import Hello, client_handshake, new_nonce
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import ConfigMismatch, LookupRequest, ServerUnavailable
from tests.conftest import ServeProcess
from tests.core.helpers import freeze, random_batch, reference_scores
from tests.embedding_server.test_wire_fuzz import random_frame, random_json
from tests.engine.helpers import lookup_frame, random_request, reference, server_process
from tests.ranker.test_replicas import Load

SECRET = "ucx-test-secret"
LINKS = {"tcp": "tcp", "shm": "tcp,sm,self"}
"""UCX_TLS of each link tested: UCX's TCP, and shared memory (TCP only to set the endpoints up)."""


@pytest.fixture(scope="module", params=list(LINKS), ids=[f"ucx-{k}" for k in LINKS])
def link(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every process of a test (the servers inherit it) runs UCX with this link's UCX_TLS."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UCX_TLS", LINKS[request.param])
        env.setenv("FLEXEMR_SECRET", SECRET)
        yield request.param


def ucx_spec(sharding: str = "row", servers: int = 2) -> ClusterSpec:
    source = ModelSource(preset="tiny")
    model = model_spec(source)
    plan = make_plan(sharding, model.table_rows, model.dim, servers)  # type: ignore[arg-type]
    endpoints = tuple(Endpoint() for _ in range(servers))
    return ClusterSpec(source, plan, endpoints, engine=EngineConfig(transport="ucx"))


@pytest.fixture(scope="module")
def cluster(link: str) -> Iterator[ClusterSpec]:
    with LocalCluster(ucx_spec()) as local:
        yield local.spec


def check_scores(spec: ClusterSpec, **engine: object) -> dict[str, object]:
    """Score 3 batches through a ranker on `spec` with `engine`, against the monolith; its stats."""
    spec = dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, **engine))  # type: ignore[arg-type]
    ranker = build_ranker(spec, connect_timeout_s=60)
    try:
        assert isinstance(ranker.transport, IoEngine)
        assert ranker.transport.dialer.transport == "ucx"
        model = build_monolithic(load_weights(spec.model))
        for seed in range(3):
            dense, indices, lengths = random_batch(ranker.spec, 32, seed)
            np.testing.assert_allclose(
                ranker.score(dense, indices, lengths),
                reference_scores(model, dense, indices, lengths),
                rtol=1e-4,
                atol=1e-5,
            )
        return ranker.stats()["transport"]  # type: ignore[no-any-return]
    finally:
        ranker.close()


@pytest.mark.parametrize(
    ("engine", "lookup"),
    [
        pytest.param({"mode": "mapped"}, "partial", id="flexemr"),
        pytest.param({"mode": "shared"}, "partial", id="no-mapped"),
        pytest.param({"mode": "single", "io_threads": 1}, "raw", id="naive"),
        pytest.param({"mode": "mapped", "credits": "off"}, "raw", id="no-credits"),
        pytest.param(
            {"mode": "mapped", "credits": "piggyback", "migration": False}, "partial", id="piggyback"
        ),
    ],
)
def test_every_engine_mode_scores_like_the_monolith_over_ucx(
    cluster: ClusterSpec, engine: dict[str, object], lookup: str
) -> None:
    spec = dataclasses.replace(cluster, ranker=dataclasses.replace(cluster.ranker, lookup=lookup))  # type: ignore[arg-type]
    stats = check_scores(spec, **engine)
    assert stats["engine"]["mode"] == engine["mode"]  # type: ignore[index]
    assert all(s["subrequests"] > 0 and s["failures"] == 0 for s in stats["servers"])  # type: ignore[index, attr-defined]


@pytest.mark.parametrize("sharding", ["table", "row"])
def test_table_and_row_sharding_over_three_ucx_servers_score_exactly(link: str, sharding: str) -> None:
    with LocalCluster(ucx_spec(sharding, servers=3)) as local:
        check_scores(local.spec, mode="mapped", io_threads=2)


def test_connections_migrate_between_io_threads_with_their_ucx_workers(cluster: ClusterSpec) -> None:
    """A connection's worker goes with it: lookups stay exact after every connection moved."""
    engine = make_engine(
        cluster.embedding_servers,
        identities(cluster),
        dataclasses.replace(cluster.engine, io_threads=2, migration=False),
        secret=SECRET.encode(),
        node_limits=NodeLimits(heartbeat_timeout_s=10.0),
    )
    engine.start(timeout=30)
    try:
        store = ShardStore(cluster.sharding, 0, load_weights(cluster.model), progress=False)
        rng = np.random.default_rng(0)
        for connection, owner in engine.owners().items():
            engine.migrate(connection, 1 - owner)
            requests = [random_request(rng, store.num_rows) for _ in range(8)]
            futures = [engine.submit(0, r) for r in requests]
            for request, future in zip(requests, futures, strict=True):
                np.testing.assert_allclose(future.result(30), reference(store, request), rtol=1e-5, atol=1e-6)
        assert engine.stats()["engine"]["migrations"] == len(engine.owners())
    finally:
        engine.close()


def test_a_wrong_secret_is_refused_over_ucx_before_any_row(cluster: ClusterSpec) -> None:
    engine = make_engine(
        cluster.embedding_servers, identities(cluster), cluster.engine, secret=b"not-the-secret"
    )
    with pytest.raises(ConfigMismatch, match="could not prove the shared secret"):
        engine.start(timeout=20)


def test_ucx_is_refused_without_a_secret_and_with_tls() -> None:
    spec = ucx_spec(servers=1)
    store = ShardStore(spec.sharding, 0, load_weights(spec.model), progress=False)
    with pytest.raises(ValueError, match="without a shared secret"):
        EmbeddingServer(store, Endpoint(), identities(spec)[0], secret=None, transport="ucx")
    with pytest.raises(ValueError, match="has no TLS"):
        dataclasses.replace(spec, security=SecurityConfig(tls_cert="c", tls_key="k", tls_ca="a"))


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
