"""CPU per request of a served system, split into the ranker and its embedding servers and into
their threads, under C=1 load over HTTP: what the lookup path costs on each side, and where.

    .venv/bin/python benchmarks/server_share.py --requests 300 --rounds 3
    .venv/bin/python benchmarks/server_share.py --serve-args "--embedding-tier local"   (the monolithic)

Each round starts one `flexemr serve` (`--preset rmc1 --row-scale 0.01 --batch 270`, 1 torch
thread, `--servers` embedding servers), warms it up, sends `--requests` requests one at a time and
reads every thread's CPU time (user + system) from /proc; thread names come from `py-spy dump`
(Python does not name OS threads). With `--src DIR` the processes import flexemr from DIR/src (for
A/B runs against another checkout); rounds of several `--src` alternate. Prints the medians.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.config.model import ModelSource
from flexemr.model.source import model_spec
from flexemr.workload.synthetic import SyntheticWorkload
from http_front import binary_body, start_serve
from proc_cpu import children, thread_cpu_s
from serving_overhead import HttpLoad, add_request_arguments, run_load

PY_SPY = Path(sys.executable).parent / "py-spy"
DUMPED_THREAD = re.compile(r'^Thread (\d+) .*"(.*)"')


def processes(pid: int) -> dict[int, str]:
    """`pid` ("ranker") and its children ("embedding server N", from their command lines)."""
    found = {pid: "ranker"}
    for child in children(pid):
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        index = command[command.index(b"--index") + 1].decode() if b"--index" in command else "?"
        found[child] = f"embedding server {index}"
    return found


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from `py-spy dump`."""
    dump = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True, text=True)
    return {int(m[1]): m[2] for line in dump.stdout.splitlines() if (m := DUMPED_THREAD.match(line))}


def threads_cpu_s(pids: dict[int, str]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of `pids`, by (process, thread id)."""
    return {(pid, tid): seconds for pid in pids for tid, seconds in thread_cpu_s(pid).items()}


def one_round(
    args: argparse.Namespace, src: str | None, bodies: list[tuple[bytes, dict[str, str]]]
) -> dict[tuple[str, str], float]:
    """CPU ms per request by (process, thread name)."""
    if src is not None:
        os.environ["PYTHONPATH"] = str(Path(src).resolve() / "src")
    flags = ["--row-scale", str(args.row_scale), "--torch-threads", "1"]
    flags += ["--embedding-servers", str(args.servers)]
    process = start_serve(args.preset, [*flags, *shlex.split(args.serve_args)])
    try:
        pids = processes(process.pid)
        load = HttpLoad(process.url, bodies)

        async def measure() -> dict[tuple[int, int], float]:
            for i in range(20):
                await load.send(i)
            before = threads_cpu_s(pids)
            for i in range(args.requests):
                await load.send(i)
            after = threads_cpu_s(pids)
            return {thread: end - before.get(thread, 0.0) for thread, end in after.items()}

        spent = run_load(load, measure)
        names = {(pid, tid): name for pid in pids for tid, name in thread_names(pid).items()}
    finally:
        process.close()
        os.environ.pop("PYTHONPATH", None)
    per: dict[tuple[str, str], float] = defaultdict(float)
    for (pid, tid), seconds in spent.items():
        per[pids[pid], names.get((pid, tid), "other")] += seconds * 1000 / args.requests
    return per


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
    results: dict[str | None, list[dict[tuple[str, str], float]]] = {s: [] for s in sources}
    for r in range(args.rounds):
        for src in sources:
            row = one_round(args, src, bodies)
            results[src].append(row)
            ranker = sum(ms for (process, _), ms in row.items() if process == "ranker")
            print(f"round {r} {src or 'this checkout'}: all {sum(row.values()):.2f}, ranker {ranker:.2f} "
                  f"ms/request; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    print(f"\n{args.preset} x{args.row_scale}, batch {args.batch}, `flexemr serve --embedding-servers "
          f"{args.servers} {args.serve_args}`, C=1, {args.requests} requests x {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}; CPU ms/request, medians of the rounds")  # fmt: skip
    print("| flexemr from | process | thread | CPU ms/request |\n|---|---|---|---:|")
    for src, rows in results.items():
        threads = sorted({thread for row in rows for thread in row})
        median = {t: statistics.median(row.get(t, 0.0) for row in rows) for t in threads}
        for process, thread in sorted(threads, key=lambda t: (t[0], -median[t])):
            if median[process, thread] >= 0.005:
                print(f"| {src or 'this checkout'} | {process} | {thread} | {median[process, thread]:.3f} |")
        for process in sorted({process for process, _ in threads}):
            total = statistics.median(sum(ms for (p, _), ms in row.items() if p == process) for row in rows)
            print(f"| {src or 'this checkout'} | {process} | all | {total:.2f} |")
        total = statistics.median(sum(row.values()) for row in rows)
        print(f"| {src or 'this checkout'} | all | all | {total:.2f} |")


if __name__ == "__main__":
    main()
