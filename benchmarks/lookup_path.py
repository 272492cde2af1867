"""CPU per request of the ranker's lookup path alone (`Ranker.pool`: route, send, gather), by thread.

No HTTP and no dense model: the same batches pooled C=1 in this process by a ranker connected to
`--servers` embedding-server processes (`flexemr serve --embedding-servers N`'s plan), and by the
local tier (every table in this process). CPU from /proc: per thread of this process (the request
thread, the I/O threads, the supervisor...) and of the servers, in ms per request.

    .venv/bin/python benchmarks/lookup_path.py --requests 1000 --rounds 3

A/B against another checkout: PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/lookup_path.py
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.batch import SparseBatch
from flexemr.cli import serve
from flexemr.cli.options import cluster_spec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_dense
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan
from flexemr.transport.local import LocalTransport
from flexemr.workload.synthetic import SyntheticWorkload
from proc_cpu import thread_cpu_s, tree_cpu_s
from serving_overhead import add_request_arguments


def named_thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each named thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    cpu: dict[str, float] = defaultdict(float)
    for tid, seconds in thread_cpu_s(os.getpid()).items():
        cpu[names.get(tid, "other")] += seconds
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--requests", type=int, default=1000, help="per system and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-args", default="", help="extra `flexemr serve` flags for the cluster")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = argparse.ArgumentParser()
    serve.add_arguments(flags)
    spec = cluster_spec(flags.parse_args(["--preset", args.preset, "--row-scale", str(args.row_scale),
                                          "--embedding-servers", str(args.servers),
                                          *shlex.split(args.serve_args)]))  # fmt: skip
    os.environ.setdefault(spec.security.secret_env, secrets.token_hex(32))
    source = load_weights(spec.model)
    whole = make_plan("table", spec.sharding.table_rows, spec.sharding.dim, 1)
    local = Ranker(source.spec, whole, build_dense(source), LocalTransport(whole, source), spec.ranker)
    workload = SyntheticWorkload(model_spec(spec.model), seed=0)
    batches = [workload.generate(args.batch) for _ in range(32)]
    batches = [SparseBatch(b.dense, b.indices.astype(np.int32), b.lengths) for b in batches]
    with LocalCluster(spec) as cluster:
        flexemr = build_ranker(cluster.spec)
        try:
            rows: dict[str, list[dict[str, float]]] = defaultdict(list)
            for ranker in (local, flexemr):
                for batch in batches[:8]:
                    ranker.pool(batch)  # warm up
            for _ in range(args.rounds):
                for name, ranker in (("local tier", local), ("flexemr", flexemr)):
                    threads, servers = named_thread_cpu_s(), sum(tree_cpu_s(p) for p in cluster.pids)
                    for i in range(args.requests):
                        ranker.pool(batches[i % len(batches)])
                    after = named_thread_cpu_s()
                    row = {t: after[t] - threads.get(t, 0.0) for t in after}
                    row["servers"] = sum(tree_cpu_s(p) for p in cluster.pids) - servers
                    rows[name].append({k: v * 1000 / args.requests for k, v in row.items()})
        finally:
            flexemr.close()
            local.close()
    print(f"{args.preset} x{args.row_scale}, batch {args.batch}, {args.servers} servers, C=1, "
          f"{args.rounds} x {args.requests} requests, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| system | thread | CPU ms/request (median of rounds) |\n|---|---|---:|")
    for name, runs in rows.items():
        medians = {t: float(np.median([run.get(t, 0.0) for run in runs])) for t in runs[0]}
        for thread, median in sorted(medians.items(), key=lambda item: -item[1]):
            if median >= 0.005:
                print(f"| {name} | {thread} | {median:.2f} |")
        process = [sum(v for t, v in run.items() if t != "servers") for run in runs]
        print(f"| {name} | this process | {np.median(process):.2f} |")


if __name__ == "__main__":
    main()
