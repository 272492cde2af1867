"""`flexemr serve`: a whole cluster on this machine, one command.

Starts N embedding-server processes and the ranker, prints one line when ready, and on SIGINT or
SIGTERM stops everything it started. `--embedding-tier redis` serves the same rows from a Redis
instead (the HugeCTR-style baseline the benchmarks compare against).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import threading

from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec
from flexemr.cluster.child import exit_when_stdin_closes
from flexemr.cluster.local import ClusterStartError, LocalCluster
from flexemr.cluster.roles import HttpServer, build_ranker
from flexemr.config import ClusterSpec
from flexemr.ranker.ranker import Ranker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument(
        "--embedding-tier",
        choices=("flexemr", "redis"),
        default="flexemr",
        help="flexemr embedding servers, or a Redis holding the rows (baseline; needs redis-server)",
    )
    parser.add_argument("--spec-out", help="also write the cluster spec (with real ports) to this file")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (parent died)")
    parser.add_argument(
        "--ray", nargs="?", const="auto", metavar="ADDRESS",
        help="servers and rankers as actors on a Ray cluster: auto (this node's), HOST:PORT, or local",
    )  # fmt: skip
    parser.add_argument("--ray-rankers", type=int, default=1, help="with --ray: ranker actors")


def _start_ranker(spec: ClusterSpec, tier: str, stack: contextlib.ExitStack) -> tuple[Ranker, ClusterSpec]:
    """Start the embedding tier and the ranker; return it and the spec with the ports bound."""
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
    cluster = LocalCluster(spec, progress=True)
    stack.callback(cluster.stop)
    spec = cluster.start()
    return build_ranker(spec), spec


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.watch_stdin:
        exit_when_stdin_closes()
    try:
        spec = cluster_spec(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flexemr serve: {exc}", file=sys.stderr)
        return 2
    print(spec.sharding.describe(), flush=True)
    if args.ray is not None:
        from flexemr.cluster.ray_cluster import RayOptions, serve_on_ray

        try:
            options = RayOptions(address=args.ray, rankers=args.ray_rankers)
        except ValueError as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 2
        return serve_on_ray(spec, options)
    with contextlib.ExitStack() as stack:
        try:
            ranker, spec = _start_ranker(spec, args.embedding_tier, stack)
        except (ClusterStartError, FileNotFoundError, RuntimeError) as exc:
            print(f"flexemr serve: {exc}", file=sys.stderr)
            return 1
        stack.callback(ranker.close)
        if args.spec_out:
            spec.save(args.spec_out)
        http = HttpServer(ranker, spec.ranker.host, spec.ranker.port)

        def announce() -> None:
            http.wait_started()
            print(
                f"flexemr ready: {http.url} model={spec.ranker.model_name} tier={args.embedding_tier} "
                f"embedding_servers={spec.sharding.num_servers} sharding={spec.sharding.strategy} "
                f"lookup={ranker.config.lookup} device={ranker.device}",
                flush=True,
            )

        threading.Thread(target=announce, daemon=True).start()
        http.run()  # returns on SIGINT / SIGTERM
    return 0
