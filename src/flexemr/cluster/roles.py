"""The two roles a process can play, built from a cluster spec."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from flexemr.api.http import RateLimitedWarnings, create_app
from flexemr.cluster.security import admin_token, check_bind, client_tls, identities, load_secret, server_tls
from flexemr.cluster.spec import ClusterSpec
from flexemr.config import CacheMode
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.storage import DramStorage, FileStorage, Storage
from flexemr.embedding_server.store import ShardStore, store_layout
from flexemr.embedding_server.versions import RowVersions
from flexemr.memory import SERVING_ADVICE, check_memory
from flexemr.model.weights import build_dense
from flexemr.ranker.model_versions import Loader, ModelVersions
from flexemr.ranker.ranker import Ranker
from flexemr.ranker.versions import SYNC_TIMEOUT_S
from flexemr.transport.base import LookupTransport

if TYPE_CHECKING:
    from flexemr.api.grpc import GrpcServer

log = logging.getLogger(__name__)


def build_embedding_server(spec: ClusterSpec, index: int, progress: bool = True) -> EmbeddingServer:
    if not 0 <= index < len(spec.embedding_servers):
        raise ValueError(
            f"--index {index} is not a server of this spec (0..{len(spec.embedding_servers) - 1})"
        )
    torch_threads(1)
    secret = load_secret(spec.security)
    check_bind(spec.embedding_servers[index].host, secret)  # before the minutes of loading
    source = spec.model.load()
    storage = server_storage(spec, index)
    need = storage.resident_bytes(store_layout(spec.sharding, index, source.spec.formats))
    check_memory(need, f"embedding server {index}", SERVING_ADVICE)
    store = ShardStore(spec.sharding, index, source, progress, storage)
    updates = spec.updates
    log_path = None if updates.log_dir is None else Path(updates.log_dir) / f"server-{index}.updates"
    identity = identities(spec)[index]
    versions = RowVersions(
        store,
        log_path,
        updates.max_staged_bytes,
        updates.max_changelog_keys,
        updates.max_history_bytes,
        fingerprint=identity.fingerprint,
    )
    return EmbeddingServer(
        store,
        spec.embedding_servers[index],
        identity,
        secret,
        spec.limits,
        frame_limits=spec.frames,
        tls=server_tls(spec.security),
        versions=versions,
    )


def local_servers_need(spec: ClusterSpec) -> int:
    """Memory all the spec's embedding servers need together (when they share one host)."""
    formats = spec.model.spec().formats
    return sum(
        server_storage(spec, i).resident_bytes(store_layout(spec.sharding, i, formats))
        for i in range(spec.sharding.num_servers)
    )


def server_storage(spec: ClusterSpec, index: int) -> Storage:
    """Server `index`'s storage: memory, or its row file, fingerprinted by all that decides its bytes."""
    if spec.storage.kind == "dram":
        return DramStorage()
    assert spec.storage.directory is not None
    model = dataclasses.asdict(spec.model)
    if spec.model.checkpoint is not None:
        stat = Path(spec.model.checkpoint).stat()
        model["checkpoint_file"] = [stat.st_size, stat.st_mtime_ns]
    shards = [dataclasses.asdict(s) for s in spec.sharding.shards_of(index)]
    fingerprint = json.dumps({"model": model, "dim": spec.sharding.dim, "shards": shards}, sort_keys=True)
    return FileStorage(Path(spec.storage.directory) / f"server-{index}.rows", fingerprint)


def build_ranker(
    spec: ClusterSpec, connect_timeout_s: float = 60.0, transport: LookupTransport | None = None
) -> Ranker:
    """The ranker of `spec`, connected to its embedding servers (or to the given transport)."""
    source = spec.model.load()
    plan = spec.sharding
    dense = build_dense(source)
    cache = CacheMode.parse(spec.ranker.cache)
    if spec.ranker.device in ("auto", "cpu"):  # a GPU's memory is the cache's memory model's business
        params = sum(p.numel() * p.element_size() for p in dense.parameters())
        check_memory(
            params + cache.fixed_bytes, "the ranker (dense model and --cache)", "lower --cache fixed:BYTES"
        )
    if transport is None:
        from flexemr.engine import make_engine
        from flexemr.engine.link import links

        engine = make_engine(
            spec.embedding_servers,
            identities(spec),
            spec.engine,
            limits=spec.frames,
            secret=load_secret(spec.security),
            node_limits=spec.limits,
            tls=client_tls(spec.security),
        )
        engine.start(timeout=connect_timeout_s)
        return Ranker(source.spec, plan, dense, engine, spec.ranker, links(spec, SYNC_TIMEOUT_S), spec.cache)
    return Ranker(source.spec, plan, dense, transport, spec.ranker, cache=spec.cache)


def served_versions(
    spec: ClusterSpec,
    ranker: Ranker,
    loader: Loader | None = None,
    stop: Callable[[], None] = lambda: None,
    cluster: ClusterSpec | None = None,
) -> ModelVersions:
    """`ranker` as version 1 of `spec`'s model (stopped by `stop`; its rows on `cluster`'s servers),
    further versions started by `loader` (None: this ranker cannot load any); the admin API's token
    is the cluster secret's."""
    secret = load_secret(spec.security)
    token = admin_token(secret) if secret is not None else None
    return ModelVersions(ranker, spec.model, loader, stop, cluster, admin_token=token)


def start_grpc(models: ModelVersions) -> GrpcServer | None:
    """The ranker's KServe v2 gRPC front, serving, if its config names a gRPC port."""
    ranker = models.ranker
    if ranker.config.grpc_port is None:
        return None
    from flexemr.api.grpc import GrpcServer  # MissingExtra without the grpc extra

    return GrpcServer(models, ranker.config.host, ranker.config.grpc_port)


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def ranker_threads(asked: int, beside: int) -> int:
    """Intra-op threads for a ranker sharing its host with `beside` other busy processes: `asked`,
    or for 0 (auto) the cores divided among them (all of them when alone)."""
    if asked > 0:
        return asked
    return max(1, (os.cpu_count() or 1) // (1 + beside))


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def http_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The HTTP listening socket, with TCP_NODELAY. Without it Nagle holds each response body back
    until the client's delayed ACK of the headers (+40 ms per keep-alive request). asyncio sets it
    only on sockets whose protocol number is IPPROTO_TCP (create_server's is 0); accepted sockets
    inherit it from the listener. With `reuse_port`, several rankers listen on one address and the
    kernel spreads new connections over them (SO_REUSEPORT)."""
    listener = socket.create_server((host, port), backlog=1024, reuse_port=reuse_port)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the real port is known at once."""

    def __init__(
        self, ranker: Ranker | ModelVersions, host: str, port: int, reuse_port: bool = False
    ) -> None:
        self.socket = http_listener(host, port, reuse_port)
        self.host = host
        self.port = self.socket.getsockname()[1]
        models = ranker if isinstance(ranker, ModelVersions) else ModelVersions(ranker)
        app = create_app(models, models.ranker.config.model_name)
        logging.getLogger("uvicorn.error").addFilter(RateLimitedWarnings())  # clients' bad HTTP
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (main thread) or `stop()`.

        uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM then turns into
        SystemExit here, so the caller's cleanup (stopping child processes) still runs."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.server.run(sockets=[self.socket])
        except (KeyboardInterrupt, SystemExit):
            pass

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="http")
        self._thread.start()
        self.wait_started()

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()
