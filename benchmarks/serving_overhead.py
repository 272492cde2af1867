"""What the serving path costs over the model it serves, side by side in one run.

Systems, on the same requests (`--batch` pairs, MLPerf-like synthetic bags):
    in-process      the monolithic model called directly in this process (`--torch-threads` threads)
    monolithic      `flexemr serve --embedding-tier local` over HTTP (every table in the ranker)
    monolithic-h11  the same with `--http-parser h11` (pure-Python HTTP on asyncio's loop)
    flexemr-http    `flexemr serve --embedding-servers N --grpc-port 0` over HTTP
    flexemr-grpc    the same process over KServe v2 gRPC

For each: C=1 latency (p50, p99) and CPU per request (all the system's processes: the ranker and
its embedding servers; for in-process, this process), the capacity (a closed loop of `--clients`
requests in flight), then open-loop Poisson arrivals at 25%, 50% and 75% of that capacity (p50,
p99, measured from each request's scheduled arrival). Every server runs `--torch-threads` threads.

    .venv/bin/python benchmarks/serving_overhead.py --preset rmc1 --row-scale 0.01 --batch 270
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.batch import SparseBatch
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.workload.synthetic import SyntheticWorkload
from http_front import binary_body, start_serve

INFER_PATH = "/v2/models/dlrm/infer"
TICKS = os.sysconf("SC_CLK_TCK")

Send = Callable[[int], None]
"""Sends request number i (of the pool) and waits for its answer."""


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every process below it."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += [child for child, parent in parents.items() if parent == current]
    return total


def http_sender(url: str, bodies: list[tuple[bytes, dict[str, str]]]) -> Callable[[], Send]:
    """A factory of senders, each with its own keep-alive connection (one per client thread)."""
    host, port = url.removeprefix("http://").split(":")

    def make() -> Send:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)

        def send(i: int) -> None:
            body, headers = bodies[i % len(bodies)]
            connection.request("POST", INFER_PATH, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

        return send

    return make


def grpc_sender(address: str, requests: list[SparseBatch]) -> Callable[[], Send]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def message(r: SparseBatch) -> Any:
        tensor = service_pb2.ModelInferRequest.InferInputTensor
        arrays = [("dense_features", "FP32", r.dense.astype("<f4")),
                  ("sparse_indices", "INT64", r.indices.astype("<i8")),
                  ("sparse_lengths", "INT32", r.lengths.astype("<i4"))]  # fmt: skip
        return service_pb2.ModelInferRequest(
            model_name="dlrm",
            inputs=[tensor(name=n, datatype=d, shape=list(a.shape)) for n, d, a in arrays],
            raw_input_contents=[a.tobytes() for _, _, a in arrays],
        )

    messages = [message(r) for r in requests]
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 2**28),
                                                      ("grpc.max_send_message_length", 2**28)])  # fmt: skip
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def make() -> Send:
        def send(i: int) -> None:
            stub.ModelInfer(messages[i % len(messages)], timeout=60)

        return send

    return make


def in_process_sender(source: ModelSource, requests: list[SparseBatch]) -> Callable[[], Send]:
    model = build_monolithic(load_weights(source))
    lock = threading.Lock()  # one model, one batch at a time: a server's dense model does the same

    def make() -> Send:
        def send(i: int) -> None:
            r = requests[i % len(requests)]
            with lock, torch.inference_mode():
                model.forward_sparse(*(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths)))

        return send

    return make


def percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def sequential(make: Callable[[], Send], count: int, cpu: Callable[[], float]) -> dict[str, float]:
    """C=1: p50/p99 latency and CPU ms per request."""
    send = make()
    for i in range(10):  # warm-up
        send(i)
    latencies = []
    cpu_start = cpu()
    for i in range(count):
        start = time.perf_counter()
        send(i)
        latencies.append(time.perf_counter() - start)
    cpu_ms = (cpu() - cpu_start) * 1000 / count
    p50, p99 = percentiles(latencies)
    return {"p50_ms": p50, "p99_ms": p99, "cpu_ms": cpu_ms}


def closed_loop(make: Callable[[], Send], clients: int, seconds: float) -> float:
    """Requests per second with `clients` requests always in flight."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        send = make()
        while time.perf_counter() < stop:
            send(k)
            done[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def poisson(make: Callable[[], Send], rate: float, seconds: float, threads: int) -> tuple[float, float]:
    """Open loop: arrivals at `rate`/s (exponential gaps); latency from each scheduled arrival."""
    rng = np.random.default_rng(1)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds) + 1))
    latencies: list[float] = []
    next_index = [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def run() -> None:
        send = make()
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= arrivals.size:
                return
            due = start + arrivals[i]
            time.sleep(max(due - time.perf_counter(), 0))
            send(i)
            with lock:
                latencies.append(time.perf_counter() - due)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return percentiles(latencies)


@contextmanager
def served(args: argparse.Namespace, extra: list[str]) -> Iterator[tuple[str, str | None, int]]:
    """(HTTP url, gRPC address or None, pid) of a `flexemr serve` started for this run."""
    common = ["--row-scale", str(args.row_scale), "--torch-threads", str(args.torch_threads)]
    common += shlex.split(args.serve_args)
    process = start_serve(args.preset, [*common, *extra])
    try:
        line = next(line for line in process.output if "flexemr ready:" in line)
        grpc = next((w.split("=", 1)[1] for w in line.split() if w.startswith("grpc=")), None)
        yield process.url, grpc, process.pid
    finally:
        process.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rmc1")
    parser.add_argument("--row-scale", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=270)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200, help="C=1 requests per system")
    parser.add_argument("--clients", type=int, default=4, help="closed loop for the capacity")
    parser.add_argument("--seconds", type=float, default=8.0, help="per capacity or Poisson run")
    parser.add_argument("--systems", default="in-process,monolithic,monolithic-h11,flexemr-http,flexemr-grpc")
    parser.add_argument("--serve-args", default="", help="extra flags for every `flexemr serve`")
    parser.add_argument("--c1-load", metavar="URL", help="only send C=1 requests to URL for --seconds")
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    workload = SyntheticWorkload(model_spec(source), seed=0)
    requests = [workload.generate(args.batch) for _ in range(32)]
    bodies = [binary_body(r) for r in requests]
    if args.c1_load:  # the load of benchmarks/profile_serving.sh
        send, stop, sent = http_sender(args.c1_load, bodies)(), time.perf_counter() + args.seconds, 0
        while time.perf_counter() < stop:
            send(sent)
            sent += 1
        print(f"{sent} requests in {args.seconds:g} s")
        return
    systems = args.systems.split(",")
    results: dict[str, dict[str, float]] = {}

    def measure(name: str, make: Callable[[], Send], cpu: Callable[[], float]) -> None:
        row = sequential(make, args.requests, cpu)
        row["capacity"] = closed_loop(make, args.clients, args.seconds)
        for load in (25, 50, 75):
            rate = row["capacity"] * load / 100
            row[f"p50_{load}"], row[f"p99_{load}"] = poisson(make, rate, args.seconds, 2 * args.clients)
        results[name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)

    if "in-process" in systems:
        torch.set_num_threads(args.torch_threads)
        measure("in-process", in_process_sender(source, requests), time.process_time)
    for name, extra in (
        ("monolithic", ["--embedding-tier", "local"]),
        ("monolithic-h11", ["--embedding-tier", "local", "--http-parser", "h11"]),
    ):
        if name in systems:
            with served(args, extra) as (url, _, pid):
                measure(name, http_sender(url, bodies), lambda pid=pid: tree_cpu_s(pid))
    if {"flexemr-http", "flexemr-grpc"} & set(systems):
        with served(args, ["--embedding-servers", str(args.servers), "--grpc-port", "0"]) as (url, grpc, pid):
            if "flexemr-http" in systems:
                measure("flexemr-http", http_sender(url, bodies), lambda: tree_cpu_s(pid))
            if "flexemr-grpc" in systems and grpc is not None:
                measure("flexemr-grpc", grpc_sender(grpc, requests), lambda: tree_cpu_s(pid))

    base = results.get("in-process")
    print(f"\n{args.preset} x{args.row_scale}, batch {args.batch}, {args.torch_threads} torch thread(s), "
          f"{os.cpu_count()} cores, serve flags {args.serve_args!r}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| system | C=1 p50 ms | C=1 p99 ms | CPU ms/request | x in-process CPU | capacity req/s "
          "| p50/p99 ms at 25% | at 50% | at 75% |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = f"{r['cpu_ms'] / base['cpu_ms']:.2f}" if base else "-"
        loads = " | ".join(f"{r[f'p50_{k}']:.1f} / {r[f'p99_{k}']:.1f}" for k in (25, 50, 75))
        print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_ms']:.2f} | {ratio} "
              f"| {r['capacity']:.1f} | {loads} |")  # fmt: skip


if __name__ == "__main__":
    main()
