"""`flexemr shard`: print (and optionally save) the sharding plan for a model."""

from __future__ import annotations

import argparse

from flexemr.cli.options import add_model_arguments, add_sharding_arguments, model_source
from flexemr.sharding.plan import make_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sharding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    spec = model_source(args).spec()
    plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.embedding_servers)
    print(plan.to_json() if args.json else plan.describe())
    return 0
