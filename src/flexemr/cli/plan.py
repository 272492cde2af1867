"""`flexemr plan`: the cheapest cluster that meets a latency target and an availability goal."""

from __future__ import annotations

import argparse
import sys

from flexemr.cli.options import add_zipf_skew_argument
from flexemr.config.model import ROW_FORMATS, ModelSource
from flexemr.model.presets import PRESET_NAMES
from flexemr.planner.inputs import Traffic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
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
    parser.add_argument("--p99-ms", type=float, required=True, help="p99 latency target in milliseconds")
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
