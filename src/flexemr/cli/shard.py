"""`flexemr shard`: print (and optionally save) the sharding plan for a model, or check and print
a plan file made for it (`flexemr plan --out`, `plan --from-stats --out`)."""

from __future__ import annotations

import argparse
import sys

from flexemr.cli.options import (
    add_model_arguments,
    add_sharding_arguments,
    check_plan_model,
    describe_plan,
    model_source,
    sharding_plan,
)
from flexemr.model.source import model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sharding_arguments(parser)
    parser.add_argument(
        "--plan", help="a plan file to check against the model and print, instead of --sharding"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    spec = model_spec(model_source(args))
    if args.plan:
        from flexemr.planner import load_sharding

        try:
            plan = load_sharding(args.plan)
            check_plan_model(plan, spec.table_rows, spec.dim, args.plan)
        except (ValueError, OSError) as exc:
            print(f"flexemr shard: {exc}", file=sys.stderr)
            return 2
    else:
        plan = sharding_plan(args, spec.table_rows, spec.dim)
    print(plan.to_json() if args.json else describe_plan(plan, spec))
    return 0
