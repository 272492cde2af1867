"""`flexemr spec`: write the cluster spec of a deployment across hosts, without starting anything.

Embedding server i goes on the i-th of `--server-hosts` (round robin when there are more servers than
hosts); servers sharing a host listen on consecutive ports from `--server-port`. The ranker listens
on `--host:--port`. Copy the file to every host, then run `flexemr embedding-server --spec FILE
--index i` on each memory node and `flexemr ranker --spec FILE` on the compute node.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec
from flexemr.config import Endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument(
        "--server-hosts", required=True, help="comma-separated host names or addresses of the memory nodes"
    )
    parser.add_argument("--server-port", type=int, default=7000, help="first embedding-server port per host")
    parser.add_argument("--out", help="write the spec here (default: standard output)")


def spread(hosts: list[str], first_port: int, count: int) -> tuple[Endpoint, ...]:
    """`count` endpoints over `hosts` round robin; the k-th server on a host gets `first_port + k`."""
    return tuple(Endpoint(hosts[i % len(hosts)], first_port + i // len(hosts)) for i in range(count))


def run(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.server_hosts.split(",") if h.strip()]
    try:
        if not hosts:
            raise ValueError("--server-hosts names no host")
        if not 0 < args.server_port < 65536:
            raise ValueError(f"--server-port must be in 1..65535, got {args.server_port}")
        spec = cluster_spec(args)
        servers = spread(hosts, args.server_port, spec.sharding.num_servers)
        spec = dataclasses.replace(spec, embedding_servers=servers)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flexemr spec: {exc}", file=sys.stderr)
        return 2
    if args.out:
        spec.save(args.out)
        print(spec.sharding.describe(), file=sys.stderr)
    else:
        print(spec.to_json())
    return 0
