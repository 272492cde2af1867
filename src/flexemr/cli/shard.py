"""`flexemr shard`: print (and optionally save) the sharding plan for a model."""

from __future__ import annotations

import argparse

from flexemr.cli.options import add_model_arguments, model_source
from flexemr.sharding.plan import STRATEGIES, make_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--embedding-servers", type=int, default=2)
    parser.add_argument("--sharding", choices=STRATEGIES, default="auto")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    spec = model_source(args).spec()
    plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.embedding_servers)
    print(plan.to_json() if args.json else plan.describe())
    return 0
