"""`flexemr calibrate`: measure this machine's lookups, dense model and sockets for the planner."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="calibration.json", help="where to write the calibration")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller measurements (~15 s)")


def run(args: argparse.Namespace) -> int:
    from flexemr.calibrate.microbench import BenchSettings, run_calibration

    start = time.perf_counter()
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    calibration = run_calibration(settings)
    calibration.save(args.out)
    lookup, dense, net = calibration.lookup, calibration.dense, calibration.network
    rows_per_s = 1 / lookup.seconds_per_bag(64, 1000, 0.0) * 1000
    print(f"lookups: {rows_per_s / 1e6:.1f} M rows/s/core (dim 64), skew gain {lookup.skew_gain:.2f}")
    print(f"dense:   {dense.flops_per_s / 1e9:.1f} GFLOP/s per core, {dense.call_s * 1e6:.0f} us per call")
    print(f"network: {net.rtt_s * 1e6:.0f} us round trip, {net.stream_bytes_per_s / 1e9:.2f} GB/s per stream")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
