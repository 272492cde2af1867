"""`flexemr update FILE --spec CLUSTER.json`: apply a file of rows to a running cluster as one new
version, and print it. The rows go to the servers the spec file names when they are committed: with
`flexemr serve --spec-out`'s file, the serving model version's (`ServingUpdater`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexemr.cli.options import add_secret_argument, with_secret_file
from flexemr.cli.update_stream import add_stream_arguments, run_stream
from flexemr.updates import UpdateFailed, read_updates
from flexemr.updates.serving_updater import ServingUpdater


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

    def serving() -> ServingUpdater:
        return ServingUpdater(args.spec, lambda spec: with_secret_file(spec, args))

    try:
        if args.redis is not None:
            return run_stream(args, serving)
        if args.file is None:
            raise ValueError("give a FILE of rows, or --redis to consume a stream")
        updates = read_updates(Path(args.file), args.source, args.sequence)
        updater = serving()
    except (ValueError, OSError) as exc:
        print(f"flexemr update: {exc}", file=sys.stderr)
        return 2
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
