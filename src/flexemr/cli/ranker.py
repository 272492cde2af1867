"""`flexemr ranker`: run the ranker of a cluster spec file, its servers started elsewhere."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from flexemr.cli.flags import add_flags, over
from flexemr.config import EngineConfig, RankerConfig, SecurityConfig
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import exit_when_stdin_closes
from flexemr.entrypoints.roles import RankerProcess, ranker_threads, torch_threads
from flexemr.memory import NotEnoughMemory
from flexemr.transport.base import ConfigMismatch, ServerUnavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="cluster spec file (JSON)")
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="wait this long for servers")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (parent died)")
    parser.add_argument(
        "--reuse-port", action="store_true", help="share the HTTP port with other rankers (SO_REUSEPORT)"
    )
    for family in (RankerConfig, EngineConfig, SecurityConfig):
        add_flags(parser, family, note=", or a spec file's")


def load_spec(args: argparse.Namespace) -> ClusterSpec:
    """The spec file, with the flags given on the command line in place of its values."""
    spec = ClusterSpec.load(args.spec)
    return dataclasses.replace(
        spec,
        ranker=over(spec.ranker, args),
        engine=over(spec.engine, args),
        security=over(spec.security, args),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ranker %(levelname)s: %(message)s")
    if args.watch_stdin:
        exit_when_stdin_closes()
    try:
        spec = load_spec(args)
        torch_threads(ranker_threads(spec.ranker.torch_threads, beside=0))  # servers run elsewhere
        # servers started elsewhere: it loads no other model version
        process = RankerProcess.build(
            spec, connect_timeout_s=args.connect_timeout, reuse_port=args.reuse_port
        )
    except (ValueError, OSError, RuntimeError, ServerUnavailable, ConfigMismatch, NotEnoughMemory) as exc:
        print(f"flexemr ranker: {exc}", file=sys.stderr)
        return 2
    print(f"flexemr ranker ready: {process.describe()}", flush=True)
    try:
        process.run()
    finally:
        process.close()
    return 0
