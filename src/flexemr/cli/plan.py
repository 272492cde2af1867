"""`flexemr plan`: the cheapest cluster that meets a latency target and an availability goal; or,
with `--from-stats`, a sharding plan for a given cluster from measured traffic (hot ranges get
more copies: `flexemr.planner.hot_ranges`)."""

from __future__ import annotations

import argparse
import sys

from flexemr.cli.options import add_zipf_skew_argument
from flexemr.config.model import ROW_FORMATS, ModelSource
from flexemr.model.presets import PRESET_NAMES
from flexemr.planner.inputs import Traffic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESET_NAMES, help="a named model")
    model.add_argument("--model", help="model JSON: a ModelSpec dict, or {'preset': ..., 'row_scale': ...}")
    model.add_argument("--checkpoint", help="state_dict of Meta's reference DLRM_Net (torch.save)")
    parser.add_argument(
        "--row-scale", type=float, default=ModelSource.row_scale, help="scale a preset's table rows (0, 1]"
    )
    parser.add_argument(
        "--row-dtype",
        choices=ROW_FORMATS,
        help="how rows are stored (default fp32, or the checkpoint's)",
    )
    parser.add_argument("--qps", type=float, help="peak queries per second (or give --traffic)")
    parser.add_argument("--traffic", help="traffic JSON: peak_qps, samples_per_query, samples_cv, zipf_skew")
    parser.add_argument("--samples-per-query", type=float, default=Traffic.samples_per_query)
    add_zipf_skew_argument(parser)
    parser.add_argument("--p99-ms", type=float, help="p99 latency target in milliseconds (required)")
    parser.add_argument(
        "--availability", type=int, default=0, metavar="K", help="embedding-server failures to survive"
    )
    parser.add_argument(
        "--ranker-spares", type=int, default=0, metavar="J", help="ranker failures to survive"
    )
    parser.add_argument(
        "--raw-rows", action="store_true", help="servers return raw rows (no partial pooling)"
    )
    parser.add_argument("--catalog", help="hardware catalogue JSON (default: AWS us-east-1 list prices)")
    parser.add_argument("--calibration", help="file from `flexemr calibrate`")
    parser.add_argument(
        "--uncalibrated", action="store_true", help="plan with built-in default constants (labelled as such)"
    )
    parser.add_argument("--out", help="save the plan (JSON, loadable by `flexemr serve --plan`)")
    measured = parser.add_argument_group("from measured traffic (instead of a model, --qps and --p99-ms)")
    measured.add_argument(
        "--from-stats",
        metavar="SOURCE",
        help="lookups per row range: a ranker's URL http://HOST:PORT/v2/stats/ranges or a saved copy (FILE); "
        "plans --embedding-servers servers with --availability + 1 copies of every row and more of "
        "the hot ranges, within --memory-budget",
    )
    measured.add_argument(
        "--embedding-servers", type=int, default=4, help="with --from-stats: the servers to plan for"
    )
    measured.add_argument(
        "--memory-budget",
        type=float,
        metavar="COPIES",
        help="with --from-stats: rows stored in all, in copies of the model (default: the copies "
        "--availability needs, plus 0.05 for hot ranges)",
    )


def _request(args: argparse.Namespace) -> object:
    from flexemr.model.weights import CheckpointWeights
    from flexemr.planner import Availability, ModelProfile, PlanRequest, Traffic
    from flexemr.planner.inputs import InputError, load_model, load_traffic, model_from_dict

    if args.model:
        model = load_model(args.model)
    elif args.checkpoint:
        spec = CheckpointWeights(args.checkpoint).spec
        if args.row_dtype:
            spec = spec.with_overrides(row_formats=(args.row_dtype,) * spec.num_tables)
        model = ModelProfile(spec)
    else:
        model = model_from_dict(
            {"preset": args.preset, "row_scale": args.row_scale, "row_dtype": args.row_dtype}
        )
    if args.traffic:
        traffic = load_traffic(args.traffic)
    elif args.qps is not None:
        traffic = Traffic(args.qps, args.samples_per_query, zipf_skew=args.zipf_skew)
    else:
        raise InputError("give the peak load with --qps N or --traffic FILE")
    return PlanRequest(
        model, traffic, args.p99_ms, Availability(args.availability, args.ranker_spares), not args.raw_rows
    )


def run_from_stats(args: argparse.Namespace) -> int:
    from flexemr.planner.hot_ranges import hot_range_plan, load_range_stats
    from flexemr.planner.inputs import InputError

    replicas = args.availability + 1
    budget = replicas + 0.05 if args.memory_budget is None else args.memory_budget
    try:
        result = hot_range_plan(load_range_stats(args.from_stats), args.embedding_servers, replicas, budget)
    except InputError as exc:
        print(f"flexemr plan: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    if args.out:
        with open(args.out, "w") as out:
            out.write(result.plan.to_json())
        print(f"\nsaved to {args.out} (run it with `flexemr serve --plan {args.out}`)")
    return 0


def run(args: argparse.Namespace) -> int:
    from flexemr.planner import (
        PlanningError,
        PlanRequest,
        default_calibration,
        load_calibration,
        load_catalog,
        plan,
    )
    from flexemr.planner.inputs import InputError

    if args.from_stats:
        return run_from_stats(args)
    missing = [
        flag
        for flag, given in (
            ("--preset, --model or --checkpoint", args.preset or args.model or args.checkpoint),
            ("--p99-ms", args.p99_ms is not None),
        )
        if not given
    ]
    if missing:
        print(f"flexemr plan: give {' and '.join(missing)} (or plan from measured traffic: --from-stats)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.calibration:
            calibration = load_calibration(args.calibration)
        elif args.uncalibrated:
            calibration = default_calibration()
        else:
            raise InputError(
                "the planner needs measurements: run `flexemr calibrate --out calibration.json` and pass "
                "--calibration calibration.json, or pass --uncalibrated to use labelled default constants"
            )
        request = _request(args)
        assert isinstance(request, PlanRequest)
        result = plan(request, load_catalog(args.catalog), calibration)
    except (InputError, FileNotFoundError) as exc:
        print(f"flexemr plan: {exc}", file=sys.stderr)
        return 2
    except PlanningError as exc:
        print(f"flexemr plan: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    if args.out:
        result.save(args.out)
        print(f"\nsaved to {args.out} (run it with `flexemr serve --plan {args.out}`)")
    return 0
