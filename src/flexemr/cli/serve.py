"""`flexemr serve`: a whole cluster on this machine, one command.

Starts N embedding-server processes and the ranker, prints one line when ready, and on SIGINT or
SIGTERM stops everything it started. `--embedding-tier redis` serves the same rows from a Redis
instead (the HugeCTR-style baseline the benchmarks compare against); `--embedding-tier local` keeps
every table in the ranker's own process (the served monolithic deployment, for models that fit one
machine). Without a secret given, it makes a random one for its cluster and hands it to the servers
through their environment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec, describe_plan
from flexemr.cluster.child import exit_when_stdin_closes
from flexemr.cluster.local import ClusterStartError, LocalCluster
from flexemr.cluster.roles import (
    HttpServer,
    build_ranker,
    ranker_threads,
    served_versions,
    start_grpc,
    torch_threads,
)
from flexemr.cluster.security import load_secret
from flexemr.cluster.spec import ClusterSpec
from flexemr.config import Endpoint
from flexemr.model.source import ModelSource
from flexemr.ranker.model_versions import Loader
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import Strategy, make_plan, replicated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument(
        "--embedding-tier",
        choices=("flexemr", "redis", "local"),
        default="flexemr",
        help="flexemr embedding servers, a Redis holding the rows (baseline; needs redis-server), or "
        "local: every table in the ranker's process (served monolithic)",
    )
    parser.add_argument("--spec-out", help="also write the cluster spec (with real ports) to this file")
    parser.add_argument(
        "--rankers", type=int, default=1,
        help="ranker processes behind one HTTP address (SO_REUSEPORT): one dying costs only its requests",
    )  # fmt: skip
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (parent died)")
    parser.add_argument(
        "--ray", nargs="?", const="auto", metavar="ADDRESS",
        help="servers and rankers as actors on a Ray cluster: auto (this node's), HOST:PORT, or local",
    )  # fmt: skip
    parser.add_argument("--ray-rankers", type=int, default=1, help="with --ray: ranker actors")


def _start_ranker(spec: ClusterSpec, tier: str, stack: contextlib.ExitStack) -> tuple[Ranker, ClusterSpec]:
    """Start the embedding tier and the ranker; return it and the spec with the ports bound."""
    beside = {"redis": 1, "local": 0}.get(tier, len(spec.embedding_servers))  # processes on this host
    torch_threads(ranker_threads(spec.ranker.torch_threads, beside))
    if tier == "redis":
        from flexemr.cluster.redis_server import RedisServer
        from flexemr.transport.redis_tier import RedisTransport

        redis_server = RedisServer()
        stack.callback(redis_server.stop)
        transport = RedisTransport(redis_server.url, spec.sharding)
        transport.load(spec.sharding, spec.model.load())
        print(f"redis tier: {redis_server.url} pid={redis_server.pid}", flush=True)
        spec = dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, lookup="raw"))
        return build_ranker(spec, transport=transport), spec
    if tier == "local":
        from flexemr.transport.local import LocalTransport

        # One store with every table whole: the model as one machine would hold it.
        plan = make_plan("table", spec.sharding.table_rows, spec.sharding.dim, 1)
        spec = dataclasses.replace(spec, sharding=plan, embedding_servers=(Endpoint(spec.ranker.host, 0),))
        local = LocalTransport(plan, spec.model.load(), progress=True)
        return build_ranker(spec, transport=local), spec
    if load_secret(spec.security) is None:  # the children inherit it through the environment
        os.environ[spec.security.secret_env] = secrets.token_hex(32)
        logging.getLogger(__name__).info(
            "no secret given: made one for this cluster only (other rankers need --secret-file)"
        )
    cluster = LocalCluster(spec, progress=True, supervise=True)
    stack.callback(cluster.stop)
    spec = cluster.start()
    return build_ranker(spec), spec


def version_spec(spec: ClusterSpec, source: ModelSource) -> ClusterSpec:
    """`spec` serving `source` on servers of its own (new ports); the same plan while the tables
    keep their shapes, else the same strategy over the new shapes."""
    model = source.spec()
    plan = spec.sharding
    if (model.table_rows, model.dim) != (plan.table_rows, plan.dim):
        strategies: dict[str, Strategy] = {"table": "table", "row": "row"}  # a planner's plan is not remade
        strategy = strategies.get(plan.strategy)
        if strategy is None:
            raise ValueError(
                f"parameters: the new model's tables differ from the served one's and its {plan.strategy} "
                "plan cannot be remade here; serve it with a plan of its own"
            )
        base = make_plan(strategy, model.table_rows, model.dim, plan.num_servers // plan.replicas)
        plan = replicated(base, plan.replicas)
    servers = tuple(Endpoint(spec.embedding_servers[0].host, 0) for _ in range(plan.num_servers))
    return dataclasses.replace(spec, model=source, sharding=plan, embedding_servers=servers)


def _version_loader(spec: ClusterSpec, tier: str) -> Loader:
    """Starts a new model version's embedding tier and ranker beside the serving one."""

    def load(source: ModelSource) -> tuple[Ranker, Callable[[], None], ClusterSpec | None]:
        stack = contextlib.ExitStack()
        try:
            ranker, started = _start_ranker(version_spec(spec, source), tier, stack)
        except BaseException:
            stack.close()
            raise
        return ranker, stack.close, started if tier == "flexemr" else None

    return load


def _start_more_rankers(spec: ClusterSpec, count: int, tier: str, stack: contextlib.ExitStack) -> None:
    """`count` more `flexemr ranker` processes on the same servers and HTTP port (no gRPC)."""
    if count <= 0:
        return
    if tier != "flexemr":
        raise ValueError(f"--rankers needs the flexemr embedding tier, not {tier}")
    from flexemr.cluster.deployment import start_ranker

    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="flexemr-serve-"))
    path = Path(folder) / "cluster.json"
    dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, grpc_port=None)).save(path)
    for _ in range(count):
        stack.enter_context(start_ranker(path, reuse_port=True))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.watch_stdin:
        exit_when_stdin_closes()
    try:
        spec = cluster_spec(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flexemr serve: {exc}", file=sys.stderr)
        return 2
    print(describe_plan(spec.sharding, spec.model.spec(), spec.storage), flush=True)
    if args.ray is not None:
        from flexemr.cluster.ray_cluster import RayOptions, serve_on_ray

        # Actors on other nodes bind their node's address, which needs a secret: the one given here
        # (its file or variable exists on this host only), else one made for this cluster, goes to
        # every actor through its environment.
        secret = load_secret(spec.security)
        env = {spec.security.secret_env: secret.decode() if secret else secrets.token_hex(32)}
        spec = dataclasses.replace(spec, security=dataclasses.replace(spec.security, secret_file=None))
        try:
            options = RayOptions(address=args.ray, rankers=args.ray_rankers, env=env)
        except ValueError as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 2
        return serve_on_ray(spec, options)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())  # version 1's tier: stopped when it is unloaded
        # Loading more versions needs servers of their own; extra ranker processes use version 1's.
        loader = _version_loader(spec, args.embedding_tier) if args.rankers == 1 else None
        try:
            ranker, spec = _start_ranker(spec, args.embedding_tier, first)
            cluster = spec if args.embedding_tier == "flexemr" else None
            models = served_versions(spec, ranker, loader, first.pop_all().close, cluster)
            stack.callback(models.close)
            grpc = start_grpc(models)
        except (ClusterStartError, FileNotFoundError, RuntimeError, OSError, ValueError) as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 1
        if grpc is not None:
            stack.callback(grpc.stop)
        http = HttpServer(models, spec.ranker.host, spec.ranker.port, reuse_port=args.rankers > 1)
        spec = dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, port=http.port))
        if args.spec_out:
            spec.save(args.spec_out)
        try:
            _start_more_rankers(spec, args.rankers - 1, args.embedding_tier, stack)
        except (ValueError, RuntimeError) as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 1

        def announce() -> None:
            http.wait_started()
            print(
                f"flexemr ready: {http.url} model={spec.ranker.model_name} tier={args.embedding_tier} "
                f"embedding_servers={spec.sharding.num_servers} sharding={spec.sharding.strategy} "
                f"replicas={spec.sharding.replicas} rankers={args.rankers} "
                f"lookup={ranker.config.lookup} device={ranker.device}"
                + (f" grpc={grpc.address}" if grpc is not None else ""),
                flush=True,
            )

        threading.Thread(target=announce, daemon=True).start()
        http.run()  # returns on SIGINT / SIGTERM
    return 0
