"""A/B of the served monolithic's C=1 cost: two source trees served side by side, measured in turns.

    .venv/bin/python benchmarks/serving_ab.py --base /tmp/base-checkout [--rounds 8 --requests 300]

Starts `flexemr serve --embedding-tier local` from this checkout (B) and from `--base`'s `src` (A)
at once, then alternates blocks of `--requests` C=1 requests: in-process, A, B, in-process, B, A,
... so both see the same load on a shared machine. Prints, per round and as medians, CPU ms per
request (the server's process tree, from /proc) and C=1 p50, with the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.config.model import ModelSource
from flexemr.model.source import model_spec
from flexemr.workload.synthetic import SyntheticWorkload
from http_front import binary_body, start_serve
from serving_overhead import (
    HttpLoad,
    InProcessLoad,
    Load,
    SystemCpu,
    in_process_cpu_s,
    sequential,
    served_cpu_s,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a checkout whose src/ is system A")
    parser.add_argument("--preset", default="rmc1")
    parser.add_argument("--row-scale", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=270)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    workload = SyntheticWorkload(model_spec(source), seed=0)
    requests = [workload.generate(args.batch) for _ in range(32)]
    bodies = [binary_body(r) for r in requests]
    flags = ["--row-scale", str(args.row_scale), "--torch-threads", "1", "--embedding-tier", "local"]
    os.environ["PYTHONPATH"] = str(Path(args.base).resolve() / "src")
    base = start_serve(args.preset, flags)
    del os.environ["PYTHONPATH"]
    branch = start_serve(args.preset, flags)
    torch.set_num_threads(1)
    systems: dict[str, tuple[Load, SystemCpu]] = {
        "in-process": (InProcessLoad(source, requests), in_process_cpu_s),
        "A (base)": (HttpLoad(base.url, bodies), functools.partial(served_cpu_s, base.pid)),
        "B (this)": (HttpLoad(branch.url, bodies), functools.partial(served_cpu_s, branch.pid)),
    }
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    try:
        for r in range(args.rounds):
            order = (
                ["in-process", "A (base)", "B (this)"]
                if r % 2 == 0
                else ["in-process", "B (this)", "A (base)"]
            )
            for name in order:
                load, cpu_s = systems[name]
                rows[name].append(sequential(load, args.requests, cpu_s))
            print(f"round {r}: load {os.getloadavg()[0]:.1f} " + "  ".join(
                f"{n}: cpu {rows[n][-1]['cpu_ms']:.2f} p50 {rows[n][-1]['p50_ms']:.2f}" for n in systems
            ), flush=True)  # fmt: skip
    finally:
        base.close()
        branch.close()
    print(f"\n{args.preset} x{args.row_scale}, batch {args.batch}, 1 torch thread, {args.rounds} rounds "
          f"of {args.requests} C=1 requests, load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print("| system | CPU ms/request (median) | x in-process | C=1 p50 ms (median) |")
    print("|---|---:|---:|---:|")
    inproc = statistics.median(row["cpu_ms"] for row in rows["in-process"])
    for name, runs in rows.items():
        cpu = statistics.median(row["cpu_ms"] for row in runs)
        p50 = statistics.median(row["p50_ms"] for row in runs)
        print(f"| {name} | {cpu:.2f} | {cpu / inproc:.2f} | {p50:.2f} |")


if __name__ == "__main__":
    main()
