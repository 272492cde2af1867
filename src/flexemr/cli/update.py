"""`flexemr update FILE --spec CLUSTER.json`: apply a file of rows to a running cluster as one new
version, and print it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexemr.cli.options import add_secret_argument, with_secret_file
from flexemr.cli.update_stream import add_stream_arguments, run_stream
from flexemr.config.spec import ClusterSpec
from flexemr.updates import UpdateFailed, Updater, read_updates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        nargs="?",
        help="rows to write: .npz or torch .pt with arrays table, row [n], values [n, dim], or .parquet",
    )
    parser.add_argument("--spec", required=True, help="the cluster's spec file (`flexemr serve --spec-out`)")
    parser.add_argument(
        "--source", default="default", help="who sends these rows (with --sequence: applied once)"
    )
    parser.add_argument(
        "--sequence", type=int, help="this file's number from its source: a repeat is skipped"
    )
    add_secret_argument(parser)
    add_stream_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        spec = with_secret_file(ClusterSpec.load(args.spec), args)
        if args.redis is not None:
            return run_stream(args, spec)
        if args.file is None:
            raise ValueError("give a FILE of rows, or --redis to consume a stream")
        updates = read_updates(Path(args.file), args.source, args.sequence)
    except (ValueError, OSError) as exc:
        print(f"flexemr update: {exc}", file=sys.stderr)
        return 2
    updater = Updater(spec)
    try:
        version = updater.apply(updates)
    except ValueError as exc:
        print(f"flexemr update: {exc}", file=sys.stderr)
        return 2
    except UpdateFailed as exc:
        print(f"flexemr update: {exc}", file=sys.stderr)
        return 1
    finally:
        updater.close()
    print(f"version {version}: {updates.rows.size} rows applied")
    return 0
