"""`flexemr ranker`: run the ranker of a cluster spec file, its servers started elsewhere."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from flexemr.cli.options import add_engine_arguments, engine_config
from flexemr.cluster.child import exit_when_stdin_closes
from flexemr.cluster.memory import NotEnoughMemory
from flexemr.cluster.roles import HttpServer, build_ranker
from flexemr.config import ClusterSpec
from flexemr.transport.base import ServerUnavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="cluster spec file (JSON)")
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="wait this long for servers")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (parent died)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ranker %(levelname)s: %(message)s")
    if args.watch_stdin:
        exit_when_stdin_closes()
    try:
        spec = ClusterSpec.load(args.spec)
        spec = dataclasses.replace(spec, engine=engine_config(args, spec.engine))
        ranker = build_ranker(spec, connect_timeout_s=args.connect_timeout)
    except (ValueError, FileNotFoundError, ServerUnavailable, NotEnoughMemory) as exc:
        print(f"flexemr ranker: {exc}", file=sys.stderr)
        return 2
    http = HttpServer(ranker, spec.ranker.host, spec.ranker.port)
    print(f"flexemr ranker ready: {http.url} model={spec.ranker.model_name}", flush=True)
    http.run()
    ranker.close()
    return 0
