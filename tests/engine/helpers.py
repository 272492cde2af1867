"""Factories for engine tests: in-thread embedding servers, engines, and a reference lookup."""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint, EngineConfig, FrameLimits, NodeLimits
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine, make_engine
from flexemr.entrypoints.local import READY_PREFIX, LocalCluster
from flexemr.model.source import load_weights, model_spec
from flexemr.protocol.frames import Flags, MessageType, encode
from flexemr.protocol.handshake import Hello, client_handshake, new_nonce
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupRequest


@dataclass
class Servers:
    plan: ShardingPlan
    servers: list[EmbeddingServer]
    stores: list[ShardStore]

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(s.endpoint for s in self.servers)

    def engine(self, **config: object) -> IoEngine:
        """An engine with a lenient heartbeat: these servers answer pings from this process, under
        its GIL, so a burst on a busy machine delays them past the default 1 s and fails healthy
        servers. The heartbeat is tested with server processes (`test_server_limits`)."""
        engine = make_engine(
            self.endpoints,
            [s.identity for s in self.servers],
            EngineConfig(**config),  # type: ignore[arg-type]
            node_limits=NodeLimits(heartbeat_timeout_s=10.0),
        )
        engine.start(timeout=10)
        return engine


@contextmanager
def thread_servers(
    num_servers: int = 2, preset: str = "tiny", limits: NodeLimits | None = None
) -> Iterator[Servers]:
    source = ModelSource(preset=preset)
    weights = load_weights(source)
    model = weights.spec
    plan = make_plan("row", model.table_rows, model.dim, num_servers)
    stores = [ShardStore(plan, i, weights, progress=False) for i in range(num_servers)]
    spec = ClusterSpec(source, plan, tuple(Endpoint() for _ in range(num_servers)))
    servers = [
        EmbeddingServer(store, Endpoint(), ident, limits=limits)
        for store, ident in zip(stores, identities(spec), strict=True)
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield Servers(plan, servers, stores)
    finally:
        for s in servers:
            s.close()
        for t in threads:
            t.join(5)


def dial(endpoint: Endpoint, key: bytes = b"", session: str = "test") -> socket.socket:
    """A blocking socket to a server, past the handshake (a plain data connection, no credits)."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    try:
        client_handshake(sock, Hello("data", session, new_nonce()), key, FrameLimits())
    except BaseException:
        sock.close()
        raise
    return sock


def lookup_frame(request_id: int, request: LookupRequest) -> list[memoryview]:
    flags = Flags.RAW if request.raw else Flags.NONE
    buffers = [request.rows, request.offsets]
    if request.weights is not None:
        flags |= Flags.WEIGHTED
        buffers.append(request.weights)
    return encode(MessageType.LOOKUP, request_id, buffers, flags)


def random_request(
    rng: np.random.Generator, rows: int, raw: bool = False, max_bags: int = 16
) -> LookupRequest:
    bags = int(rng.integers(1, max_bags + 1))
    lengths = rng.integers(0, 6, size=bags)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    indices = rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64)
    return LookupRequest(indices, offsets, raw=raw)


def burst(
    engine: IoEngine, servers: Servers, n: int, seed: int, raw_every: int = 5
) -> list[tuple[int, LookupRequest]]:
    """Submit n subrequests at once (random servers; partial, and raw every `raw_every`th: 0 for
    none), check every answer; returns them with their servers."""
    rng = np.random.default_rng(seed)
    subs = []
    for i in range(n):
        server = int(rng.integers(0, servers.plan.num_servers))
        raw = raw_every > 0 and i % raw_every == 0
        request = random_request(rng, servers.plan.server_rows(server), raw=raw)
        subs.append((server, request, engine.submit(server, request)))
    for server, request, future in subs:
        np.testing.assert_allclose(
            future.result(30), reference(servers.stores[server], request), rtol=1e-5, atol=1e-5
        )
    return [(server, request) for server, request, _ in subs]


def reference(store: ShardStore, request: LookupRequest) -> np.ndarray:
    """What the server must answer, computed locally with numpy (not the server's kernel)."""
    table = store.raw(np.arange(store.num_rows))  # every row's stored value, as float32
    if request.raw:
        return table[request.rows]
    bounds = [*request.offsets.tolist(), request.rows.size]
    return np.stack(
        [table[request.rows[a:b]].sum(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ).astype(np.float32)


@contextmanager
def server_process(
    spec: ClusterSpec, tmp_path: Path, max_fds: int
) -> Iterator[tuple[ClusterSpec, list[str]]]:
    """Embedding server 0 of `spec` in a process limited to `max_fds` file descriptors; yields the
    spec with its port, and its output lines (kept as they come)."""
    with embedding_server_process(spec, tmp_path, max_fds) as server:
        yield server.spec, server.lines


@dataclass
class ServerProcess:
    spec: ClusterSpec
    """The spec, with the server's port."""
    lines: list[str]
    """Its output (stdout and stderr), kept as it comes."""
    pid: int


@contextmanager
def embedding_server_process(spec: ClusterSpec, tmp_path: Path, max_fds: int) -> Iterator[ServerProcess]:
    """`server_process`, with the process id."""
    path = tmp_path / "cluster.json"
    spec.save(path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

    command = [
        sys.executable,
        "-m",
        "flexemr.cli.main",
        "embedding-server",
        "--spec",
        str(path),
        "--index",
        "0",
    ]
    proc = subprocess.Popen(
        [*command, "--quiet", "--watch-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=limit,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(READY_PREFIX):
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(60) and proc.poll() is None, "".join(lines)
        port = int(next(x for x in lines if x.startswith(READY_PREFIX)).rsplit(":", 1)[1])
        endpoint = dataclasses.replace(spec.embedding_servers[0], port=port)
        yield ServerProcess(dataclasses.replace(spec, embedding_servers=(endpoint,)), lines, proc.pid)
        assert proc.poll() is None, "the server died:\n" + "".join(lines[-30:])
    finally:
        proc.terminate()
        proc.wait(20)
        reader.join(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def tiny_spec(servers: int = 2, seed: int = 0) -> ClusterSpec:
    source = ModelSource(preset="tiny", seed=seed)
    spec = model_spec(source)
    plan = make_plan("row", spec.table_rows, spec.dim, servers)
    return ClusterSpec(source, plan, tuple(Endpoint() for _ in range(servers)))


def started_cluster(secret: str | None = None) -> Iterator[tuple[LocalCluster, ClusterSpec]]:
    """A tiny local cluster of 2 servers for a fixture to yield from (with `secret`: its servers
    inherit it, the ranker reads it)."""
    with pytest.MonkeyPatch.context() as env:
        if secret is not None:
            env.setenv("FLEXEMR_SECRET", secret)
        local = LocalCluster(tiny_spec())
        spec = local.start(timeout=60)
        try:
            yield local, spec
        finally:
            local.stop()
