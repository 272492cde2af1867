"""CPU per request of `flexemr serve --embedding-servers N`, split into the ranker and its embedding
servers, under C=1 load over HTTP: what the lookup path costs on each side.

    .venv/bin/python benchmarks/server_share.py --requests 300 --rounds 3

Each round starts one `flexemr serve` (`--preset rmc1 --row-scale 0.01 --batch 270`, 1 torch
thread), warms it up, sends `--requests` requests one at a time and reads every process's CPU time
(user + system) from /proc. With `--src DIR` the processes import flexemr from DIR/src (for A/B
runs against another checkout); rounds of several `--src` alternate. Prints the medians.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.config.model import ModelSource
from flexemr.model.source import model_spec
from flexemr.workload.synthetic import SyntheticWorkload
from http_front import binary_body, start_serve
from serving_overhead import TICKS, HttpLoad, add_request_arguments, run_load


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def one_round(
    args: argparse.Namespace, src: str | None, bodies: list[tuple[bytes, dict[str, str]]]
) -> dict[str, float]:
    if src is not None:
        os.environ["PYTHONPATH"] = str(Path(src).resolve() / "src")
    flags = ["--row-scale", str(args.row_scale), "--torch-threads", "1"]
    flags += ["--embedding-servers", str(args.servers)]
    process = start_serve(args.preset, [*flags, *shlex.split(args.serve_args)])
    try:
        servers = children(process.pid)
        load = HttpLoad(process.url, bodies)

        async def measure() -> dict[str, float]:
            for i in range(20):
                await load.send(i)
            before = {p: process_cpu_s(p) for p in [process.pid, *servers]}
            for i in range(args.requests):
                await load.send(i)
            return {str(p): process_cpu_s(p) - before[p] for p in before}

        spent = run_load(load, measure)
    finally:
        process.close()
        os.environ.pop("PYTHONPATH", None)
    per = {int(p): seconds * 1000 / args.requests for p, seconds in spent.items()}
    server_ms = sum(per[p] for p in servers)
    return {"total": per[process.pid] + server_ms, "ranker": per[process.pid], "servers": server_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--src", action="append", help="checkout to import flexemr from (repeatable)")
    parser.add_argument("--serve-args", default="", help="extra flags for `flexemr serve`")
    args = parser.parse_args()
    workload = SyntheticWorkload(
        model_spec(ModelSource(preset=args.preset, row_scale=args.row_scale)), seed=0
    )
    bodies = [binary_body(workload.generate(args.batch)) for _ in range(32)]
    sources: list[str | None] = args.src or [None]
    results: dict[str | None, list[dict[str, float]]] = {s: [] for s in sources}
    for r in range(args.rounds):
        for src in sources:
            row = one_round(args, src, bodies)
            results[src].append(row)
            print(f"round {r} {src or 'this checkout'}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
                  + f" ms/request; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    load = os.getloadavg()[0]
    print(f"\n{args.preset} x{args.row_scale}, batch {args.batch}, {args.servers} embedding servers, C=1, "
          f"{args.requests} requests x {args.rounds} rounds, load average {load:.1f}")  # fmt: skip
    print("| flexemr from | CPU ms/request (all) | ranker | embedding servers |")
    print("|---|---:|---:|---:|")
    for src, rows in results.items():
        medians = [statistics.median(row[k] for row in rows) for k in ("total", "ranker", "servers")]
        print(f"| {src or 'this checkout'} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
