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
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.security import load_secret
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import exit_when_stdin_closes
from flexemr.entrypoints.local import ClusterStartError, LocalCluster
from flexemr.entrypoints.roles import RankerProcess, build_ranker, ranker_threads, torch_threads, version_spec
from flexemr.model.source import load_weights, model_spec
from flexemr.ranker.model_versions import Loader, ModelVersion
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupTransport


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


def _start_tier(
    spec: ClusterSpec, tier: str, stack: contextlib.ExitStack
) -> tuple[LookupTransport | None, ClusterSpec]:
    """Start the embedding tier (stopped by `stack`); return the ranker's transport to it (None: the
    spec's flexemr servers, through the I/O engine) and the spec with the ports bound."""
    beside = {"redis": 1, "local": 0}.get(tier, len(spec.embedding_servers))  # processes on this host
    torch_threads(ranker_threads(spec.ranker.torch_threads, beside))
    if tier == "redis":
        from flexemr.entrypoints.redis_server import RedisServer
        from flexemr.transport.redis_tier import RedisTransport

        redis_server = RedisServer()
        stack.callback(redis_server.stop)
        transport = RedisTransport(redis_server.url, spec.sharding)
        transport.load(spec.sharding, load_weights(spec.model))
        print(f"redis tier: {redis_server.url} pid={redis_server.pid}", flush=True)
        return transport, dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, lookup="raw"))
    if tier == "local":
        from flexemr.transport.local import LocalTransport

        # One store with every table whole: the model as one machine would hold it.
        plan = make_plan("table", spec.sharding.table_rows, spec.sharding.dim, 1)
        spec = dataclasses.replace(spec, sharding=plan, embedding_servers=(Endpoint(spec.ranker.host, 0),))
        return LocalTransport(plan, load_weights(spec.model), progress=True), spec
    if load_secret(spec.security) is None:  # the children inherit it through the environment
        os.environ[spec.security.secret_env] = secrets.token_hex(32)
        logging.getLogger(__name__).info(
            "no secret given: made one for this cluster only (other rankers need --secret-file)"
        )
    cluster = LocalCluster(spec, progress=True, supervise=True)
    stack.callback(cluster.stop)
    return None, cluster.start()


def _version_loader(spec: ClusterSpec, tier: str) -> Loader:
    """Starts a new model version's embedding tier and ranker beside the serving one."""

    def load(source: ModelSource) -> tuple[Ranker, Callable[[], None], ClusterSpec | None]:
        stack = contextlib.ExitStack()
        try:
            transport, started = _start_tier(version_spec(spec, source), tier, stack)
            ranker = build_ranker(started, transport=transport)
        except BaseException:
            stack.close()
            raise
        return ranker, stack.close, started if transport is None else None

    return load


def _spec_writer(path: str, ranker: RankerConfig) -> Callable[[ModelVersion], None]:
    """Rewrites `path` (atomically) with the embedding servers of a model version about to serve,
    so that `flexemr update --spec PATH` and its Redis consumer update the serving version."""

    def write(version: ModelVersion) -> None:
        if version.cluster is not None:  # redis and local tiers take no row updates
            dataclasses.replace(version.cluster, ranker=ranker).save(path)

    return write


def _start_more_rankers(spec: ClusterSpec, count: int, tier: str, stack: contextlib.ExitStack) -> None:
    """`count` more `flexemr ranker` processes on the same servers and HTTP port (no gRPC)."""
    if count <= 0:
        return
    if tier != "flexemr":
        raise ValueError(f"--rankers needs the flexemr embedding tier, not {tier}")
    from flexemr.entrypoints.deployment import start_ranker

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
    print(describe_plan(spec.sharding, model_spec(spec.model), spec.storage), flush=True)
    if args.ray is not None:
        from flexemr.entrypoints.ray_cluster import RayOptions, serve_on_ray

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
            transport, spec = _start_tier(spec, args.embedding_tier, first)
            process = RankerProcess.build(
                spec,
                transport=transport,
                loader=loader,
                stop=first.pop_all().close,
                reuse_port=args.rankers > 1,
            )
        except (ClusterStartError, FileNotFoundError, RuntimeError, OSError, ValueError) as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 1
        stack.callback(process.close)
        spec = dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, port=process.http.port))
        if args.spec_out:
            spec.save(args.spec_out)
            process.models.before_switch = _spec_writer(args.spec_out, spec.ranker)
        try:
            _start_more_rankers(spec, args.rankers - 1, args.embedding_tier, stack)
        except (ValueError, RuntimeError) as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 1

        def announce() -> None:
            process.http.wait_started()
            ranker = process.ranker
            print(
                f"flexemr ready: {process.url} model={spec.ranker.model_name} tier={args.embedding_tier} "
                f"embedding_servers={spec.sharding.num_servers} sharding={spec.sharding.strategy} "
                f"replicas={spec.sharding.replicas} rankers={args.rankers} "
                f"lookup={ranker.config.lookup} device={ranker.device}"
                + (f" grpc={process.grpc.address}" if process.grpc is not None else ""),
                flush=True,
            )

        threading.Thread(target=announce, daemon=True).start()
        process.run()  # returns on SIGINT / SIGTERM
    return 0
