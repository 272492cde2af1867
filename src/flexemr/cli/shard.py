"""`flexemr shard`: print (and optionally save) the sharding plan for a model."""

from __future__ import annotations

import argparse

from flexemr.cli.options import (
    add_model_arguments,
    add_sharding_arguments,
    describe_plan,
    model_source,
    sharding_plan,
)
from flexemr.model.source import model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sharding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    spec = model_spec(model_source(args))
    plan = sharding_plan(args, spec.table_rows, spec.dim)
    print(plan.to_json() if args.json else describe_plan(plan, spec))
    return 0
