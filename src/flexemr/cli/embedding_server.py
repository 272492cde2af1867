"""`flexemr embedding-server`: run server `--index` of a cluster spec file."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from flexemr.cli.options import add_secret_argument, with_secret_file
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import exit_when_stdin_closes
from flexemr.entrypoints.local import READY_PREFIX
from flexemr.entrypoints.roles import EmbeddingServerProcess
from flexemr.memory import NotEnoughMemory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="cluster spec file (JSON)")
    parser.add_argument("--index", type=int, required=True, help="which embedding server of the spec")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (parent died)")
    parser.add_argument("--quiet", action="store_true", help="no loading progress bar")
    add_secret_argument(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s server {args.index} %(levelname)s: %(message)s"
    )
    if args.watch_stdin:
        exit_when_stdin_closes()
    try:
        spec = with_secret_file(ClusterSpec.load(args.spec), args)
        server = EmbeddingServerProcess.build(spec, args.index, progress=not args.quiet)
    except (ValueError, OSError, NotEnoughMemory) as exc:
        print(f"flexemr embedding-server: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    print(f"{READY_PREFIX}{server.endpoint}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()
    return 0
