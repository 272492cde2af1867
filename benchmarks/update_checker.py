"""The long form of the row-update checker (`flexemr.bench.update_checker`): more writers, every
fault, each server killed and stopped, then the same again with small bounds; one table per run.

    .venv/bin/python benchmarks/update_checker.py --out benchmarks/results/update_checker.md

Minutes on 2 cores. Exits 1 when any run found a violation. The short form is
`tests/updates/test_checker.py` (the same checker, fewer faults).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from flexemr.bench.update_checker import CheckerConfig, check

ALL_FAULTS = (
    "kill-server-0", "kill-server-1", "kill-server-2", "kill-server-3",
    "stop-server-1", "stop-server-2", "stop-server-3",
    "kill-cli", "kill-consumer", "restart-ranker", "full-disk",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--http-writers", type=int, default=3)
    parser.add_argument("--cli-writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated, in order")
    parser.add_argument("--hold-s", type=float, default=3.0, help="how long a SIGSTOP or a full disk lasts")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument(
        "--no-small-bounds", action="store_true", help="skip the second run with small bounds"
    )
    parser.add_argument("--out", type=Path, help="write the tables (markdown) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = CheckerConfig(
        faults=tuple(args.faults.split(",")),
        http_writers=args.http_writers,
        cli_writers=args.cli_writers,
        readers=args.readers,
        redis=not args.no_redis,
        hold_s=args.hold_s,
        min_updates=20,
    )
    runs = [("default bounds", base)]
    if not args.no_small_bounds:
        small = dataclasses.replace(base, max_staged_bytes=4096, max_changelog_keys=16)
        runs.append(("small bounds (max_staged_bytes 4096, max_changelog_keys 16)", small))
    sections = [
        f"# Row-update checker, long form ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        "`benchmarks/update_checker.py`: `flexemr serve --sharding row --embedding-servers 2 "
        f"--replicas 2 --rankers 2` and one more ranker with a cache; {base.http_writers} HTTP writers, "
        f"{base.cli_writers} CLI writers, {'a Redis stream writer, ' if base.redis else ''}"
        f"{base.readers} readers.",
    ]
    violations = 0
    for title, config in runs:
        started = time.monotonic()
        report = check(config)
        violations += report.violations()
        sections += ["", f"## {title} ({time.monotonic() - started:.0f} s)", "", report.table()]
        if report.problems:
            sections += ["", "Violations:", *[f"- {p}" for p in report.problems[:50]]]
    text = "\n".join(sections) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
