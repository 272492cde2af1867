"""Replicated serving: read throughput with R=1 vs R=2 under Zipf skew, and what a kill costs.

The ranker runs in this process, its embedding servers as real processes on 127.0.0.1 (supervised:
a killed server is restarted on its address). Per replica count: the throughput and latency of a
steady closed loop, then the same loop while one embedding server is killed with SIGKILL part way
through, counting failed requests and wrong scores (every answer is checked against the
monolithic model) and the p99 over the run.

    .venv/bin/python benchmarks/replicas.py --preset rmc2 --row-scale 0.02 --batch 128 --requests 400
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload


def run_loop(
    ranker: Ranker,
    requests: list[SparseBatch],
    expected: list[np.ndarray],
    clients: int,
    kill: threading.Event,
) -> dict[str, float]:
    """Score every request from `clients` threads; `kill` is set when a third of them are done."""
    latencies: list[float] = []
    failed = wrong = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal failed, wrong
        r = requests[i]
        start = time.perf_counter()
        try:
            scores = ranker.score(r.dense, r.indices, r.lengths)
        except (ServerUnavailable, LookupFailed):
            with lock:
                failed += 1
            return
        finally:
            if i == len(requests) // 3:
                kill.set()
        with lock:
            latencies.append(time.perf_counter() - start)
            wrong += not np.allclose(scores, expected[i], atol=1e-5)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(requests))))
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(np.array(latencies or [0.0]) * 1000, [50, 99])
    samples = sum(r.batch_size for r in requests)
    return {
        "samples_per_s": samples / elapsed,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "failed_requests": failed,
        "wrong_scores": wrong,
    }


def kill_when(event: threading.Event, cluster: LocalCluster) -> None:
    event.wait()
    cluster.kill_server(0)  # SIGKILL; the cluster's supervisor restarts it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rmc2")
    parser.add_argument("--row-scale", type=float, default=0.02)
    parser.add_argument("--servers", type=int, default=2, help="servers per replica set")
    parser.add_argument("--sharding", choices=("table", "row"), default="row")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.2, help="Zipf exponent (skew) of the rows")
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare")
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    workload = SyntheticWorkload(spec, SyntheticConfig(alpha=args.alpha), seed=0)
    requests = [workload.generate(args.batch) for _ in range(args.requests)]
    monolithic = build_monolithic(load_weights(source))
    with torch.inference_mode():
        expected = [
            monolithic.forward_sparse(*(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths))).numpy()
            for r in requests
        ]
    results: dict[str, dict[str, object]] = {}
    for copies in (int(r) for r in args.replicas.split(",")):
        plan = replicated(make_plan(args.sharding, spec.table_rows, spec.dim, args.servers), copies)
        endpoints = tuple(Endpoint() for _ in range(plan.num_servers))
        cluster = LocalCluster(ClusterSpec(source, plan, endpoints), supervise=True)
        try:
            ranker = build_ranker(cluster.start())
            try:
                steady = run_loop(ranker, requests, expected, args.clients, threading.Event())
                kill = threading.Event()
                killer = threading.Thread(target=kill_when, args=(kill, cluster))
                killer.start()
                during = run_loop(ranker, requests, expected, args.clients, kill)
                killer.join()
                results[f"R={copies}"] = {
                    "steady": steady,
                    "kill -9 of server 0": {**during, "failovers": ranker.failovers},
                }
            finally:
                ranker.close()
        finally:
            cluster.stop()
        print(f"R={copies}: {json.dumps(results[f'R={copies}'])}", flush=True)
    print(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
