"""Bounded embedding servers and the heartbeat, over real processes on 127.0.0.1: out of file
descriptors, flooded with idle connections, or stopped with SIGSTOP, a server never takes the
ranker down with it, and serves good clients again as soon as it can."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import wait
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from flexemr.api.front_door import FrontDoor
from flexemr.api.http_server import HttpServer
from flexemr.config import EngineConfig, NodeLimits
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine, make_engine
from flexemr.engine.work import Lookup
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights
from flexemr.ranker.model_versions import ModelVersions
from flexemr.transport.base import ServerUnavailable
from tests.core.helpers import freeze
from tests.engine.helpers import dial, random_request, reference, server_process, thread_servers, tiny_spec
from tests.engine.test_node_security import wait_for


def engine_for(spec: ClusterSpec, **config: object) -> IoEngine:
    engine = make_engine(
        spec.embedding_servers,
        identities(spec),
        EngineConfig(**config),  # type: ignore[arg-type]
        node_limits=spec.limits,
    )
    engine.start(timeout=60)
    return engine


def check_lookups(engine: IoEngine, spec: ClusterSpec, server: int, seed: int, count: int = 50) -> None:
    """`count` lookups to `server`, each equal to the reference."""
    store = ShardStore(spec.sharding, server, load_weights(spec.model), progress=False)
    rng = np.random.default_rng(seed)
    requests = [random_request(rng, spec.sharding.server_rows(server)) for _ in range(count)]
    futures = [engine.submit(server, r) for r in requests]
    for request, future in zip(requests, futures, strict=True):
        np.testing.assert_allclose(future.result(30), reference(store, request), rtol=1e-5, atol=1e-5)


def test_out_of_file_descriptors_the_server_keeps_serving(tmp_path: Path) -> None:
    with server_process(tiny_spec(1), tmp_path, max_fds=96) as (spec, lines), ExitStack() as flood:
        engine = engine_for(spec)
        try:
            check_lookups(engine, spec, 0, seed=0)
            address = (spec.embedding_servers[0].host, spec.embedding_servers[0].port)
            for _ in range(250):  # far more than it has descriptors for; it must refuse, not die
                flood.enter_context(socket.create_connection(address, timeout=10))
            assert wait_for(lambda: any("out of file descriptors" in line for line in lines))
            check_lookups(engine, spec, 0, seed=1)  # the connections it holds live on
            flood.close()
            fresh = engine_for(spec)  # and once descriptors are free, new clients get in
            try:
                check_lookups(fresh, spec, 0, seed=2)
            finally:
                fresh.close()
        finally:
            engine.close()
        assert (
            sum("out of file descriptors" in line for line in lines) < 20
        )  # logged a few times, not per try


def test_idle_connections_beyond_the_limit_are_refused_and_good_clients_get_in() -> None:
    limits = NodeLimits(max_connections=8, handshake_timeout_s=1.0)
    with thread_servers(1, limits=limits) as servers:
        idle = [socket.create_connection((e.host, e.port), timeout=10) for e in servers.endpoints * 40]
        try:
            assert wait_for(lambda: servers.servers[0].refused["connection limit"] > 0)
            engine = servers.engine()  # the idle ones time out of their handshake; we get in
            try:
                assert engine.connected() == [True]
                store, rng = servers.stores[0], np.random.default_rng(0)
                for _ in range(20):
                    request = random_request(rng, store.num_rows)
                    np.testing.assert_allclose(
                        engine.submit(0, request).result(10), reference(store, request)
                    )
            finally:
                engine.close()
        finally:
            for sock in idle:
                sock.close()


def ready_status(http: HttpServer) -> int:
    try:
        with urllib.request.urlopen(f"{http.url}/v2/health/ready", timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_stopped_server_turns_not_ready_fails_fast_and_comes_back() -> None:
    with LocalCluster(tiny_spec()) as local:
        spec = local.spec
        ranker = build_ranker(spec, connect_timeout_s=60)
        assert isinstance(ranker.transport, IoEngine)
        engine = ranker.transport
        http = HttpServer(FrontDoor(ModelVersions(ranker), ranker.config), "127.0.0.1", 0)
        http.start_in_thread()
        pid = local.pids[0]
        try:
            assert ready_status(http) == 200
            check_lookups(engine, spec, 0, seed=0)
            assert all(
                c.sock is not None and c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for c in engine._connections
            )
            freeze(pid)
            try:
                rng = np.random.default_rng(1)
                stuck = [
                    engine.submit(0, random_request(rng, spec.sharding.server_rows(0))) for _ in range(50)
                ]
                assert wait_for(lambda: ready_status(http) == 503), engine.health[0].reason
                assert engine.connected() == [False, True]
                _, not_done = wait(stuck, timeout=30)  # no timeout of their own: only the heartbeat ends them
                assert not not_done
                errors = [f.exception() for f in stuck]
                assert all(isinstance(e, ServerUnavailable) for e in errors), errors
                assert engine.health[0].state == "stalled"
                check_lookups(engine, spec, 1, seed=2)  # the other server serves on
            finally:
                os.kill(pid, signal.SIGCONT)
            assert wait_for(lambda: ready_status(http) == 200)
            check_lookups(engine, spec, 0, seed=3)
        finally:
            http.stop()
            ranker.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_io_thread_fails_loudly_and_the_engine_is_not_ready() -> None:
    with thread_servers(1) as servers:
        engine = servers.engine(mode="single")
        try:
            conn = engine._by_server[0][0]
            engine._threads[0].post(Lookup(conn, None, None))  # type: ignore[arg-type]  # crashes the thread
            assert wait_for(lambda: engine.connected() == [False])
            request = random_request(np.random.default_rng(0), servers.stores[0].num_rows)
            with pytest.raises(ServerUnavailable, match="I/O thread 0 died"):
                engine.submit(0, request).result(10)
        finally:
            engine.close()


def test_idle_connections_are_closed_but_the_engine_keeps_its_own_alive() -> None:
    limits = NodeLimits(idle_timeout_s=1.5)  # the engine's keepalive goes out every 0.5 s
    with thread_servers(1, limits=limits) as servers:
        with dial(servers.endpoints[0]) as silent:  # says nothing after its handshake
            silent.settimeout(60)
            assert silent.recv(1) == b""  # closed by the server
        engine = IoEngine(servers.endpoints, [s.identity for s in servers.servers], node_limits=limits)
        engine.start(timeout=30)
        try:
            sockets = [c.sock for c in engine._connections]
            time.sleep(3 * limits.idle_timeout_s)  # idle for longer than the server allows
            assert [c.sock for c in engine._connections] == sockets  # never dropped, never reconnected
            request = random_request(np.random.default_rng(0), servers.stores[0].num_rows)
            np.testing.assert_allclose(
                engine.submit(0, request).result(10), reference(servers.stores[0], request)
            )
        finally:
            engine.close()
