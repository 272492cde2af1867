"""The two roles a process can play, built from a cluster spec: one builder each, which every
launcher (`flexemr serve`, `flexemr ranker`, `flexemr embedding-server`, the Ray actors) uses."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flexemr.api.front_door import FrontDoor
from flexemr.api.http_server import HttpServer
from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.config.security import admin_token, check_bind, client_tls, identities, load_secret, server_tls
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.resync import Resync
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.storage import DramStorage, FileStorage, Storage
from flexemr.embedding_server.store import ShardStore, store_layout
from flexemr.embedding_server.versions import RowVersions
from flexemr.memory import SERVING_ADVICE, check_memory
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_dense
from flexemr.ranker.model_versions import Loader, ModelVersions
from flexemr.ranker.ranker import Ranker
from flexemr.ranker.row_versions import SYNC_TIMEOUT_S
from flexemr.sharding.plan import Strategy, make_plan, replicated
from flexemr.transport.base import LookupTransport

if TYPE_CHECKING:
    from flexemr.api.grpc import GrpcServer

log = logging.getLogger(__name__)


class EmbeddingServerProcess:
    """Embedding server `index` of a spec: its shard store, row versions and listener. `flexemr
    embedding-server` (and so `flexemr serve`'s local servers) and the Ray actors all build it here."""

    def __init__(self, server: EmbeddingServer, resync: Resync | None = None) -> None:
        """`resync`: what rejoins it from a replica when it cannot prove it holds a version."""
        self.server = server
        self._resync = resync

    @classmethod
    def build(cls, spec: ClusterSpec, index: int, progress: bool = True) -> EmbeddingServerProcess:
        if not 0 <= index < len(spec.embedding_servers):
            raise ValueError(
                f"--index {index} is not a server of this spec (0..{len(spec.embedding_servers) - 1})"
            )
        torch_threads(1)
        secret = load_secret(spec.security)
        # before the minutes of loading:
        check_bind(spec.embedding_servers[index].host, secret, spec.engine.transport)
        source = load_weights(spec.model)
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
            updates.max_applied_sequences,
            fingerprint=identity.fingerprint,
            max_log_bytes=updates.max_log_bytes,
            max_decided_versions=updates.max_decided_versions,
        )
        server = EmbeddingServer(
            store,
            spec.embedding_servers[index],
            identity,
            secret,
            spec.limits,
            frame_limits=spec.frames,
            tls=server_tls(spec.security),
            versions=versions,
            transport=spec.engine.transport,
        )
        return cls(server, None if log_path is None else resync(spec, index, versions))

    @property
    def endpoint(self) -> Endpoint:
        """Where it listens (the real port, when the spec said 0)."""
        return self.server.endpoint

    def serve_forever(self) -> None:
        if self._resync is not None:
            self._resync.start()
        freeze_start_up_objects()
        self.server.serve_forever()

    def start_in_thread(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True, name="embedding-server").start()

    def close(self) -> None:
        if self._resync is not None:
            self._resync.close()
        self.server.close()


def resync(spec: ClusterSpec, index: int, versions: RowVersions) -> Resync | None:
    """Server `index`'s resync from the replicas of its shards (None for server 0, which decides
    versions, and for a server that does not know server 0's address yet: port 0 in its spec)."""
    from flexemr.engine.link import links

    endpoints = spec.embedding_servers
    if index == 0 or endpoints[0].port == 0:
        return None
    plan = spec.sharding
    mine = _layout(plan, index)
    peers = links(spec)
    replicas = [
        peers[s]
        for s in range(plan.num_servers)
        if s != index and endpoints[s].port and _layout(plan, s) == mine
    ]
    return Resync(versions, peers[0], replicas)


def _layout(plan: ShardingPlan, server: int) -> list[Shard]:
    """What `server` holds, where: replicas of one another have equal layouts."""
    return sorted(
        (dataclasses.replace(s, server=0) for s in plan.shards_of(server)), key=lambda s: s.local_start
    )


def local_servers_need(spec: ClusterSpec) -> int:
    """Memory all the spec's embedding servers need together (when they share one host)."""
    formats = model_spec(spec.model).formats
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
    # A whole-width shard without its columns, as before column-wise sharding (row files still match).
    shards = [
        {
            k: v
            for k, v in dataclasses.asdict(s).items()
            if not (k.startswith("col_") and (s.col_start, s.col_end) == (0, None))
        }
        for s in spec.sharding.shards_of(index)
    ]
    fingerprint = json.dumps({"model": model, "dim": spec.sharding.dim, "shards": shards}, sort_keys=True)
    return FileStorage(Path(spec.storage.directory) / f"server-{index}.rows", fingerprint)


def build_ranker(
    spec: ClusterSpec, connect_timeout_s: float = 60.0, transport: LookupTransport | None = None
) -> Ranker:
    """The ranker of `spec`, connected to its embedding servers (or to the given transport)."""
    source = load_weights(spec.model)
    plan = spec.sharding
    dense = build_dense(source)
    cache = spec.ranker.cache
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


def version_spec(spec: ClusterSpec, source: ModelSource) -> ClusterSpec:
    """`spec` serving `source` on servers of its own (new ports, and update logs in a folder of
    their own under the spec's); the same plan while the tables keep their shapes, else the same
    strategy over the new shapes."""
    model = model_spec(source)
    plan = spec.sharding
    if (model.table_rows, model.dim) != (plan.table_rows, plan.dim):
        strategies: dict[str, Strategy] = {  # a planner's plan is not remade
            "table": "table",
            "row": "row",
            "column": "column",
            "column-row": "column-row",
        }
        strategy = strategies.get(plan.strategy)
        if strategy is None:
            raise ValueError(
                f"parameters: the new model's tables differ from the served one's and its {plan.strategy} "
                "plan cannot be remade here; serve it with a plan of its own"
            )
        blocks = len({s.col_start for s in plan.shards if s.table == 0})  # column shards per table
        base = make_plan(strategy, model.table_rows, model.dim, plan.num_servers // plan.replicas, blocks)
        plan = replicated(base, plan.replicas)
    servers = tuple(Endpoint(spec.embedding_servers[0].host, 0) for _ in range(plan.num_servers))
    updates = spec.updates
    if updates.log_dir is not None:  # its servers' logs beside, not over, the serving version's
        updates = dataclasses.replace(
            updates, log_dir=str(Path(updates.log_dir) / f"model-{secrets.token_hex(4)}")
        )
    return dataclasses.replace(spec, model=source, sharding=plan, embedding_servers=servers, updates=updates)


class RankerProcess:
    """A ranker serving its model versions: KServe v2 over HTTP, and over gRPC when its config names
    a gRPC port; the admin API (model versions, row updates) behind the token derived from the
    cluster secret. Both fronts enter through its one `FrontDoor` (admission, turns, deadlines).
    `flexemr serve`, `flexemr ranker` and the Ray actors all build it here."""

    def __init__(self, door: FrontDoor, http: HttpServer, grpc: GrpcServer | None) -> None:
        self.door = door
        self.models = door.models
        self.http = http
        self.grpc = grpc

    @classmethod
    def build(
        cls,
        spec: ClusterSpec,
        *,
        transport: LookupTransport | None = None,
        connect_timeout_s: float = 60.0,
        loader: Loader | None = None,
        stop: Callable[[], None] = lambda: None,
        reuse_port: bool = False,
    ) -> RankerProcess:
        """The ranker of `spec` (on its embedding servers, or on `transport`) as version 1, stopped
        with `stop` (also when this fails); further versions started by `loader` (None: this process
        loads none); its fronts bound to the ranker section's host and ports (`reuse_port`: share
        the HTTP port)."""
        try:
            ranker = build_ranker(spec, connect_timeout_s, transport)
        except BaseException:
            stop()
            raise
        secret = load_secret(spec.security)
        token = admin_token(secret) if secret is not None else None
        cluster = spec if transport is None else None  # row updates go to flexemr servers only
        models = ModelVersions(ranker, spec.model, loader, stop, cluster, admin_token=token)
        door = FrontDoor(models, spec.ranker)  # one per process: HTTP and gRPC both enter here
        grpc = None
        try:
            grpc = _grpc_server(door)
            http = HttpServer(door, spec.ranker.host, spec.ranker.port, reuse_port)
        except BaseException:
            if grpc is not None:
                grpc.stop()
            models.close()
            raise
        return cls(door, http, grpc)

    @property
    def ranker(self) -> Ranker:
        """The serving version's ranker."""
        return self.models.ranker

    @property
    def url(self) -> str:
        return self.http.url

    def describe(self) -> str:
        """Where it serves, for the ready line: `http://HOST:PORT model=NAME[ grpc=HOST:PORT]`."""
        grpc = f" grpc={self.grpc.address}" if self.grpc is not None else ""
        return f"{self.url} model={self.ranker.config.model_name}{grpc}"

    def run(self) -> None:
        """Serve HTTP in this thread until SIGINT/SIGTERM (then `close()`)."""
        freeze_start_up_objects()
        self.http.run()

    def start_in_thread(self) -> None:
        self.http.start_in_thread()

    def close(self) -> None:
        """Stop the fronts, then every loaded version (its ranker, and what its `stop` stops)."""
        self.http.stop()
        if self.grpc is not None:
            self.grpc.stop()
        self.models.close()


def _grpc_server(door: FrontDoor) -> GrpcServer | None:
    """The ranker's KServe v2 gRPC front, serving, if its config names a gRPC port."""
    config = door.config
    if config.grpc_port is None:
        return None
    from flexemr.api.grpc import GrpcServer  # MissingExtra without the grpc extra

    return GrpcServer(door, config.host, config.grpc_port)


def freeze_start_up_objects() -> None:
    """Move every object made so far (modules, the model, tables' metadata) out of the garbage
    collector's sight. A full collection walks every tracked object: ~200k in a ranker after start-up,
    36-330 ms measured on 2 shared cores, a pause that every request in flight waits for;
    frozen, it walks only what serving made since."""
    gc.collect()
    gc.freeze()


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def ranker_threads(asked: int, beside: int) -> int:
    """Intra-op threads for a ranker sharing its host with `beside` other busy processes: `asked`,
    or for 0 (auto) the cores divided among them (all of them when alone)."""
    if asked > 0:
        return asked
    return max(1, (os.cpu_count() or 1) // (1 + beside))
