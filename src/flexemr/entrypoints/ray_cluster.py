"""flexemr on a Ray cluster: Ray places, restarts and finds the processes; rows never go through Ray.

    driver (`flexemr serve --ray`)           Ray nodes
      per replica group of the plan:
        placement group, STRICT_SPREAD  ───> EmbeddingServerActor  (asks for the memory its shards
        (one bundle per replica)                                    need) -> flexemr TCP server, host:port
      rankers (a GPU where the model   ───> RankerActor: the ranker on flexemr's I/O engine, HTTP -> url;
        wants one, spread over nodes)         watches the server actors and follows a restarted one

A dead actor is restarted by Ray (`max_restarts`), on the same node or, if that node died, wherever
its placement group's bundle is placed again. A restarted server binds a new port (maybe on a new
host), so the address is not reused: each ranker polls its servers' actors for their endpoints and
points the engine's connections at the new one, which then reconnect (`IoEngine.set_endpoint`).

Every actor gets the whole `ClusterSpec` (so config added to it reaches them) and `env`, set in its
process through Ray's runtime environment (for a shared secret, say).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.engine import IoEngine
from flexemr.entrypoints.ray_resources import replica_groups, server_memory
from flexemr.entrypoints.roles import EmbeddingServerProcess, RankerProcess, build_ranker, version_spec
from flexemr.extras import needs_extra
from flexemr.ranker.ranker import Ranker

with needs_extra("ray"):
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """How flexemr asks Ray for its processes."""

    address: str | None = None
    """Ray cluster to join (`auto`, `HOST:PORT`, `ray://HOST:PORT`); None or `local`: start a
    private Ray on this machine."""
    rankers: int = 1
    """Ranker actors (each serves HTTP; spread over nodes)."""
    server_cpus: float = 1.0
    """CPUs each embedding server asks for (it pools rows on them)."""
    ranker_cpus: float = 1.0
    """CPUs each ranker asks for."""
    max_restarts: int = 5
    """Times Ray restarts a dead actor before giving up (-1: always)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment variables set in every actor's process (e.g. a shared secret)."""
    poll_s: float = 1.0
    """How often a ranker asks its servers' actors where they listen."""

    def __post_init__(self) -> None:
        if self.rankers < 1 or self.server_cpus < 0 or self.ranker_cpus < 0:
            raise ValueError(
                f"need rankers >= 1 and CPUs >= 0, got rankers={self.rankers}, "
                f"server_cpus={self.server_cpus}, ranker_cpus={self.ranker_cpus}"
            )


def fit_cpus(options: RayOptions, servers: int, cpus: float) -> RayOptions:
    """The CPU requests scaled down, if need be, so that `servers` servers and the rankers all fit
    on a private Ray of `cpus` CPUs (its CPUs are this machine's cores, which they share as the
    processes of `flexemr serve` without Ray do); on a 2-core machine, 2 servers and a ranker ask
    for 0.66 CPU each instead of 1 that would leave the ranker unplaced."""
    wanted = options.server_cpus * servers + options.ranker_cpus * options.rankers
    if wanted <= cpus:
        return options
    scale = cpus / wanted
    return dataclasses.replace(
        options,
        server_cpus=math.floor(options.server_cpus * scale * 1e4) / 1e4,  # Ray's resolution: 1e-4
        ranker_cpus=math.floor(options.ranker_cpus * scale * 1e4) / 1e4,
    )


def wants_gpu(device: str) -> bool:
    """Whether a ranker with this `--device` asks Ray for a GPU (`auto`: if the cluster has one)."""
    if device == "auto":
        return bool(ray.cluster_resources().get("GPU", 0))
    return device.startswith("cuda")


class EmbeddingServerActor:
    """Embedding server `index` of the spec, serving flexemr's TCP protocol on this node's address."""

    def __init__(self, spec: ClusterSpec, index: int) -> None:
        host = ray.util.get_node_ip_address()
        servers = list(spec.embedding_servers)
        servers[index] = Endpoint(host, 0)
        self.server = EmbeddingServerProcess.build(
            dataclasses.replace(spec, embedding_servers=tuple(servers)), index, progress=False
        )
        self.node: str = ray.get_runtime_context().get_node_id()
        self.server.start_in_thread()

    def endpoint(self) -> tuple[str, int]:
        return self.server.endpoint.host, self.server.endpoint.port

    def node_id(self) -> str:
        return self.node


class RankerActor:
    """A ranker connected to the server actors, serving on this node's address: the same
    `RankerProcess` as `flexemr serve`'s (HTTP, gRPC when the spec names a port, model versions and
    the admin API behind the cluster secret's token). When it is the only ranker, it loads a new
    model version on server actors of its own (placed as the first ones were), as `flexemr serve`
    does on processes of its own."""

    def __init__(self, spec: ClusterSpec, servers: list[Any], options: RayOptions) -> None:
        endpoints = tuple(Endpoint(*ray.get(s.endpoint.remote())) for s in servers)
        host = ray.util.get_node_ip_address()
        self.spec = dataclasses.replace(
            spec, embedding_servers=endpoints, ranker=dataclasses.replace(spec.ranker, host=host)
        )
        self.options = options
        self._lock = threading.Lock()
        self._followed: list[tuple[list[Any], IoEngine]] = []
        """The server actors of each loaded version and the engine that reaches them."""
        loader = self._load if options.rankers == 1 else None  # one ranker's versions, not several's
        self.process = RankerProcess.build(self.spec, loader=loader)
        self._follow_servers(servers, self.process.ranker)
        self.process.start_in_thread()
        self._stop = threading.Event()
        threading.Thread(
            target=self._follow, args=(options.poll_s,), daemon=True, name="follow-servers"
        ).start()

    def _follow_servers(self, servers: list[Any], ranker: Ranker) -> IoEngine:
        engine = ranker.transport
        assert isinstance(engine, IoEngine)  # no transport given: the spec's servers, through the engine
        with self._lock:
            self._followed.append((servers, engine))
        return engine

    def _load(self, source: ModelSource) -> tuple[Ranker, Callable[[], None], ClusterSpec]:
        """A new version's server actors and its ranker (the admin API's load)."""
        deployment = RayDeployment(version_spec(self.spec, source), self.options)
        try:
            endpoints = deployment.start_servers()
            spec = dataclasses.replace(deployment.spec, embedding_servers=endpoints)
            ranker = build_ranker(spec)
        except BaseException:
            deployment.stop()
            raise
        engine = self._follow_servers(deployment.servers, ranker)

        def stop() -> None:
            with self._lock:
                self._followed = [f for f in self._followed if f[1] is not engine]
            deployment.stop()

        return ranker, stop, spec

    def _follow(self, poll_s: float) -> None:
        """Point each engine at servers that came back elsewhere (Ray queues calls to a restarting
        actor, so a call returns once it runs again, with its new address)."""
        while not self._stop.wait(poll_s):
            with self._lock:
                followed = list(self._followed)
            for servers, engine in followed:
                for index, server in enumerate(servers):
                    try:
                        endpoint = Endpoint(*ray.get(server.endpoint.remote(), timeout=poll_s * 5))
                    except (ray.exceptions.RayError, TimeoutError):
                        continue
                    if endpoint != engine.endpoints[index]:
                        log.info("embedding server %d moved to %s", index, endpoint)
                        engine.set_endpoint(index, endpoint)

    def url(self) -> str:
        return self.process.url

    def describe(self) -> str:
        """Where it serves: `http://HOST:PORT model=NAME[ grpc=HOST:PORT]`."""
        return self.process.describe()


class RayDeployment:
    """The spec's servers and rankers as Ray actors; `start()` returns the rankers' URLs."""

    def __init__(self, spec: ClusterSpec, options: RayOptions) -> None:
        self.spec = spec
        self.options = options
        self.groups: list[PlacementGroup] = []
        self.servers: list[Any] = []
        self.rankers: list[Any] = []

    def _actor_options(self) -> dict[str, Any]:
        return {
            "max_restarts": self.options.max_restarts,
            "runtime_env": {"env_vars": dict(self.options.env)} if self.options.env else None,
        }

    def start(self, timeout_s: float = 300.0) -> list[str]:
        if not ray.is_initialized():
            if self.options.address in (None, "local"):  # a private Ray on this machine, sized to fit
                # "local": a new Ray even where one runs already (None would join that one)
                ray.init(address="local", namespace="flexemr", log_to_driver=False, include_dashboard=False)
                cpus = ray.cluster_resources().get("CPU", 0.0)
                self.options = fit_cpus(self.options, self.spec.sharding.num_servers, cpus)
            else:
                ray.init(address=self.options.address, namespace="flexemr", log_to_driver=False)
        try:
            self.start_servers(timeout_s)
            return self._start_rankers(timeout_s)
        except BaseException:
            self.stop()
            raise

    def start_servers(self, timeout_s: float = 300.0) -> tuple[Endpoint, ...]:
        """The embedding server actors, placed by memory, replicas on distinct nodes; where they listen."""
        memory = server_memory(self.spec.sharding)
        server_cls = ray.remote(EmbeddingServerActor)
        slots: dict[int, tuple[PlacementGroup, int]] = {}
        for group in replica_groups(self.spec.sharding):
            bundles = [{"CPU": self.options.server_cpus, "memory": memory[s]} for s in group]
            pg = placement_group(bundles, strategy="STRICT_SPREAD")
            self.groups.append(pg)
            slots.update({server: (pg, i) for i, server in enumerate(group)})
        for pg in self.groups:
            if not pg.wait(timeout_s):
                raise RuntimeError(
                    f"Ray could not place the embedding servers within {timeout_s:.0f} s: they need "
                    f"{max(memory) / 2**30:.2f} GiB of memory each (the largest), replicas on distinct "
                    f"nodes; cluster: {ray.cluster_resources()}"
                )
        for server in range(self.spec.sharding.num_servers):
            pg, bundle = slots[server]
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
            self.servers.append(
                server_cls.options(
                    num_cpus=self.options.server_cpus,
                    memory=memory[server],
                    scheduling_strategy=strategy,
                    **self._actor_options(),
                ).remote(self.spec, server)
            )
        endpoints = ray.get([s.endpoint.remote() for s in self.servers], timeout=timeout_s)
        return tuple(Endpoint(*e) for e in endpoints)

    def _start_rankers(self, timeout_s: float) -> list[str]:
        ranker_cls = ray.remote(RankerActor)
        gpus = 1 if wants_gpu(self.spec.ranker.device) else 0
        self.rankers = [
            ranker_cls.options(
                num_cpus=self.options.ranker_cpus,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",
                **self._actor_options(),
            ).remote(self.spec, self.servers, self.options)
            for _ in range(self.options.rankers)
        ]
        urls: list[str] = ray.get([r.url.remote() for r in self.rankers], timeout=timeout_s)
        return urls

    def server_nodes(self) -> list[str]:
        """The Ray node of each embedding server."""
        nodes: list[str] = ray.get([s.node_id.remote() for s in self.servers])
        return nodes

    def stop(self) -> None:
        for actor in (*self.rankers, *self.servers):
            ray.kill(actor, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)
        self.rankers, self.servers, self.groups = [], [], []


def serve_on_ray(spec: ClusterSpec, options: RayOptions) -> int:
    """`flexemr serve --ray`: deploy, print each ranker's URL, stop everything on SIGINT/SIGTERM.
    The actors belong to this driver's Ray job: if it dies outright, Ray ends them too."""
    deployment = RayDeployment(spec, options)
    try:
        deployment.start()
    except (RuntimeError, ValueError, ConnectionError, ray.exceptions.RayError) as exc:
        print(f"flexemr serve --ray: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for ranker in ray.get([r.describe.remote() for r in deployment.rankers]):
            print(
                f"flexemr ready: {ranker} tier=ray embedding_servers={spec.sharding.num_servers} "
                f"sharding={spec.sharding.strategy}",
                flush=True,
            )
        stop.wait()
    finally:
        deployment.stop()
        ray.shutdown()  # a private Ray (`local`) stops with it
    return 0
