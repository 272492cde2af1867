"""`flexemr bench --suite quick|full`: systems side by side, a report folder with table and plots."""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from flexemr.cli.options import add_zipf_skew_argument
from flexemr.model.presets import PRESET_NAMES
from flexemr.sharding.plan import STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flexemr.bench.suite import SUITES, BenchConfig

    defaults = BenchConfig()
    suites = ", ".join(f"{s.name}: {s.preset} x{s.row_scale}" for s in SUITES.values())
    parser.add_argument("--suite", choices=tuple(SUITES), default="quick")
    parser.add_argument("--preset", choices=PRESET_NAMES, help=f"default: the suite's ({suites})")
    parser.add_argument(
        "--row-scale", type=float, help=f"scale tables to fit this machine (default: the suite's, {suites})"
    )
    parser.add_argument("--embedding-servers", type=int, default=defaults.embedding_servers)
    parser.add_argument("--sharding", choices=STRATEGIES, default=defaults.sharding)
    add_zipf_skew_argument(parser)
    parser.add_argument(
        "--p99-ms", type=float, default=defaults.p99_target_ms, help="Server-scenario latency target"
    )
    parser.add_argument("--systems", help="comma-separated subset of the suite's systems")
    parser.add_argument(
        "--protocol", choices=("http", "grpc"), default="http", help="how the served systems are reached"
    )
    parser.add_argument("--out", help="report folder (default reports/bench-<suite>-<time>)")


def run(args: argparse.Namespace) -> int:
    from flexemr.bench import report
    from flexemr.bench.suite import SUITES, BenchConfig, run_suite

    logging.basicConfig(level=logging.WARNING)
    suite = SUITES[args.suite]
    if args.systems:
        chosen = tuple(s.strip() for s in args.systems.split(","))
        unknown = [s for s in chosen if s not in suite.systems and s not in SUITES["full"].systems]
        if unknown:
            print(
                f"flexemr bench: unknown systems {unknown}; choose from {', '.join(SUITES['full'].systems)}"
            )
            return 2
        suite = suite.__class__(**{**suite.__dict__, "systems": chosen})
    config = BenchConfig(args.preset or suite.preset, args.row_scale or suite.row_scale,
                         args.embedding_servers, args.sharding, args.zipf_skew,
                         p99_target_ms=args.p99_ms, protocol=args.protocol)  # fmt: skip
    out = Path(args.out or f"reports/bench-{suite.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    with tqdm(total=len(suite.systems), desc=f"bench {suite.name}", unit="system") as bar:

        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        results = run_suite(suite, config, step)
    path = report.write(results, suite, config, out)
    print(path.read_text())
    print(f"report: {path} (plots and results.json beside it)")
    return 0
