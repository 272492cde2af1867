"""`flexemr serve`: a whole cluster on this machine, one command.

Starts N embedding-server processes and the ranker, prints one line when ready, and on SIGINT or
SIGTERM stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec
from flexemr.cluster.local import ClusterStartError, LocalCluster
from flexemr.cluster.roles import HttpServer, build_ranker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument("--spec-out", help="also write the cluster spec (with real ports) to this file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = cluster_spec(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flexemr serve: {exc}", file=sys.stderr)
        return 2
    print(spec.sharding.describe(), flush=True)
    cluster = LocalCluster(spec, progress=True)
    try:
        spec = cluster.start()
        if args.spec_out:
            spec.save(args.spec_out)
        ranker = build_ranker(spec)
        http = HttpServer(ranker, spec.ranker.host, spec.ranker.port)

        def announce() -> None:
            http.wait_started()
            print(
                f"flexemr ready: {http.url} model={spec.ranker.model_name} "
                f"embedding_servers={spec.sharding.num_servers} sharding={spec.sharding.strategy} "
                f"lookup={spec.ranker.lookup} device={ranker.device}",
                flush=True,
            )

        threading.Thread(target=announce, daemon=True).start()
        http.run()  # returns on SIGINT / SIGTERM
        ranker.close()
        return 0
    except ClusterStartError as exc:
        print(f"flexemr serve: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
