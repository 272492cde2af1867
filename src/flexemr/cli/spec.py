"""`flexemr spec`: write the cluster spec of a deployment across hosts, without starting anything.

Embedding servers go on `--server-hosts` round robin, replicas of one shard on distinct hosts (so a
host's death leaves a copy); servers sharing a host listen on consecutive ports from `--server-port`.
The ranker listens on `--host:--port`. Copy the file to every host, then run `flexemr
embedding-server --spec FILE --index i` on each memory node and `flexemr ranker --spec FILE` on the
compute node.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec, describe_plan
from flexemr.config import Endpoint
from flexemr.config.plan import ShardingPlan
from flexemr.entrypoints.ray_resources import replica_groups
from flexemr.model.source import model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument(
        "--server-hosts", required=True, help="comma-separated host names or addresses of the memory nodes"
    )
    parser.add_argument("--server-port", type=int, default=7000, help="first embedding-server port per host")
    parser.add_argument("--out", help="write the spec here (default: standard output)")


def spread(hosts: list[str], first_port: int, plan: ShardingPlan) -> tuple[Endpoint, ...]:
    """One endpoint per server of `plan` over `hosts` round robin, taken replica group by replica
    group so that the copies of a shard sit on consecutive (distinct) hosts; the k-th server on a
    host gets `first_port + k`."""
    if plan.replicas > len(hosts):
        raise ValueError(
            f"--replicas {plan.replicas} needs at least {plan.replicas} server hosts (one per copy), "
            f"got {len(hosts)}"
        )
    order = [server for group in replica_groups(plan) for server in group]
    on_host = [hosts[i % len(hosts)] for i in range(len(order))]
    ports = [first_port + on_host[:i].count(host) for i, host in enumerate(on_host)]
    placed = dict(zip(order, (Endpoint(h, p) for h, p in zip(on_host, ports, strict=True)), strict=True))
    return tuple(placed[server] for server in range(plan.num_servers))


def run(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.server_hosts.split(",") if h.strip()]
    try:
        if not hosts:
            raise ValueError("--server-hosts names no host")
        if not 0 < args.server_port < 65536:
            raise ValueError(f"--server-port must be in 1..65535, got {args.server_port}")
        spec = cluster_spec(args)
        servers = spread(hosts, args.server_port, spec.sharding)
        spec = dataclasses.replace(spec, embedding_servers=servers)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flexemr spec: {exc}", file=sys.stderr)
        return 2
    if args.out:
        spec.save(args.out)
        print(describe_plan(spec.sharding, model_spec(spec.model), spec.storage), file=sys.stderr)
    else:
        print(spec.to_json())
    return 0
