"""What the serving path costs over the model it serves, side by side in one run.

Systems, on the same requests (`--batch` pairs, MLPerf-like synthetic bags, encoded as `flexemr.client`
sends them: INT32 indices when they fit; the in-process model gets them as int64, its fastest):
    in-process      the monolithic model called directly in this process (`--torch-threads` threads)
    monolithic      `flexemr serve --embedding-tier local` over HTTP (every table in the ranker)
    monolithic-h11  the same with `--http-parser h11` (pure-Python HTTP on asyncio's loop)
    flexemr-http    `flexemr serve --embedding-servers N --grpc-port 0` over HTTP
    flexemr-grpc    the same process over KServe v2 gRPC

For each: C=1 latency (p50, p99) and CPU per request (all the system's processes: the ranker and
its embedding servers, whose part is shown too; for in-process, this process), the capacity (a
closed loop of `--clients` requests in flight), then open-loop Poisson arrivals at 25%, 50% and 75%
of that capacity (p50, p99, measured from each request's scheduled arrival). Every server runs
`--torch-threads` threads.

The load generator is one asyncio loop (uvloop) with every request encoded once, raw HTTP/1.1 on
keep-alive connections (gRPC through grpc.aio), its garbage collector off while it measures: a
request costs it a write and a read. It reports how late it sent requests (generator lag, p99):
when that is small, the tail is the system's, not the generator's. In-process requests run in one
thread beside the generator's loop, one at a time, in order of arrival: the loop keeps sending on
time (run on the loop itself, each forward held libuv's clock back and sent the next arrival about
one forward late).

    .venv/bin/python benchmarks/serving_overhead.py --preset rmc1 --row-scale 0.01 --batch 270
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from flexemr.batch import SparseBatch
from flexemr.client import infer_inputs
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.workload.synthetic import SyntheticWorkload
from http_front import binary_body, start_serve
from proc_cpu import cpu_s, tree_cpu_s

INFER_PATH = "/v2/models/dlrm/infer"


class Load(Protocol):
    """One system as the load generator reaches it, on the generator's asyncio loop."""

    async def open(self) -> None: ...

    async def send(self, i: int) -> bool:
        """Sends request number i (of the pool) and waits for its answer: False if it was refused
        (overload: 429 or 503), an exception for any other failure."""
        ...

    async def close(self) -> None: ...


class HttpLoad:
    """Raw HTTP/1.1 on keep-alive connections, each request's bytes encoded once: a request costs
    the generator a write and a read, so the generator is not what is measured. A request takes an
    idle connection, or opens one (as many connections as requests in flight)."""

    def __init__(self, url: str, bodies: list[tuple[bytes, dict[str, str]]]) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.requests = [raw_request(url, body) for body in bodies]
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        pass

    async def send(self, i: int) -> bool:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        writer.write(self.requests[i % len(self.requests)])
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:"
        )
        await reader.readexactly(length)
        self.idle.append((reader, writer))
        if head[9:12] in (b"429", b"503"):
            return False
        if head[9:12] != b"200":
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        return True

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def raw_request(url: str, body: tuple[bytes, dict[str, str]]) -> bytes:
    """The whole keep-alive HTTP/1.1 request of a binary-tensor body."""
    headers = {"Host": url.removeprefix("http://"), "Content-Length": str(len(body[0])), **body[1]}
    head = f"POST {INFER_PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body[0]


class GrpcLoad:
    """KServe v2 gRPC through grpc.aio, every message built once."""

    def __init__(self, address: str, requests: list[SparseBatch]) -> None:
        from tritonclient.grpc import service_pb2

        tensor = service_pb2.ModelInferRequest.InferInputTensor

        def message(r: SparseBatch) -> Any:
            arrays = infer_inputs(r.dense, r.indices, r.lengths)
            return service_pb2.ModelInferRequest(
                model_name="dlrm",
                inputs=[tensor(name=n, datatype=d, shape=list(a.shape)) for n, d, a in arrays],
                raw_input_contents=[a.tobytes() for _, _, a in arrays],
            )

        self.address = address
        self.messages = [message(r) for r in requests]
        self.channel: Any = None
        self.stub: Any = None

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.aio.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 2**28), ("grpc.max_send_message_length", 2**28)])  # fmt: skip
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def send(self, i: int) -> bool:
        import grpc

        try:
            await self.stub.ModelInfer(self.messages[i % len(self.messages)], timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                return False
            raise
        return True

    async def close(self) -> None:
        await self.channel.close()


class InProcessLoad:
    """The monolithic model called directly, in one thread: one batch at a time (as a server's
    dense model runs), the requests that arrive meanwhile wait for it, in order."""

    def __init__(self, source: ModelSource, requests: list[SparseBatch]) -> None:
        self.model = build_monolithic(load_weights(source))
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="in-process")
        # The model's own int64 indices: INT32 ones beside its int64 bag offsets take torch's
        # slower embedding_bag path (mixed index types), which would flatter the served systems.
        self.inputs = [tuple(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths)) for r in requests]

    async def open(self) -> None:
        pass

    async def send(self, i: int) -> bool:
        await asyncio.get_running_loop().run_in_executor(self.thread, self._forward, i)
        return True

    def _forward(self, i: int) -> None:
        with torch.inference_mode():
            self.model.forward_sparse(*self.inputs[i % len(self.inputs)])

    async def close(self) -> None:
        pass


def percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def run_load(load: Load, body: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, float]:
    """`body` on a fresh uvloop with the load opened, and the generator's garbage collector off
    (its pauses would count as the system's latency)."""

    async def run() -> dict[str, float]:
        await load.open()
        try:
            return await body()
        finally:
            await load.close()

    gc.collect()
    gc.disable()
    try:
        return uvloop.run(run())
    finally:
        gc.enable()


SystemCpu = Callable[[], tuple[float, float]]
"""CPU seconds a system has used: in all, and in its embedding servers."""


def in_process_cpu_s() -> tuple[float, float]:
    """`SystemCpu` of the model in this process (no servers)."""
    return time.process_time(), 0.0


def served_cpu_s(pid: int) -> tuple[float, float]:
    """`SystemCpu` of a `flexemr serve` process: its own and its children's (the servers)."""
    total = tree_cpu_s(pid)
    return total, total - cpu_s(pid)


def sequential(load: Load, count: int, cpu: SystemCpu) -> dict[str, float]:
    """C=1: p50/p99 latency, CPU ms per request, and the embedding servers' part of it."""

    async def body() -> dict[str, float]:
        for i in range(10):  # warm-up
            await load.send(i)
        latencies = []
        cpu_start, servers_start = cpu()
        for i in range(count):
            start = time.perf_counter()
            if not await load.send(i):
                raise RuntimeError("a request was refused with nothing else in flight")
            latencies.append(time.perf_counter() - start)
        cpu_end, servers_end = cpu()
        p50, p99 = percentiles(latencies)
        return {
            "p50_ms": p50,
            "p99_ms": p99,
            "cpu_ms": (cpu_end - cpu_start) * 1000 / count,
            "servers_ms": (servers_end - servers_start) * 1000 / count,
        }

    return run_load(load, body)


def closed_loop(load: Load, clients: int, seconds: float) -> float:
    """Requests per second with `clients` requests always in flight."""

    async def body() -> dict[str, float]:
        done = 0
        stop = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                answered = await load.send(k)  # `done += await ...` would read `done` before the await
                done += answered

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return {"rate": done / (time.perf_counter() - start)}

    return run_load(load, body)["rate"]


def poisson(load: Load, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: arrivals at `rate`/s (exponential gaps), each request sent at its arrival whatever
    is in flight; latency from each scheduled arrival (of the requests answered; `refused`: how many
    got 429/503). `lag` is how late the generator sent them (p99, ms): when it is small, the latency
    is the system's."""
    arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / rate, int(rate * seconds) + 1))

    async def body() -> dict[str, float]:
        latencies, lags, refused = [], [], 0

        async def one(i: int, due: float) -> None:
            nonlocal refused
            lags.append(time.perf_counter() - due)
            if await load.send(i):
                latencies.append(time.perf_counter() - due)
            else:
                refused += 1

        start = time.perf_counter() + 0.2
        tasks = []
        for i, arrival in enumerate(arrivals):
            due = start + arrival
            await asyncio.sleep(max(due - time.perf_counter(), 0))
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        p50, p99 = percentiles(latencies)
        return {"p50": p50, "p99": p99, "lag": percentiles(lags)[1], "refused": refused}

    return run_load(load, body)


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


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the requests and the embedding servers every serving-path benchmark measures."""
    parser.add_argument("--preset", default="rmc1")
    parser.add_argument("--row-scale", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=270)
    parser.add_argument("--servers", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200, help="C=1 requests per system")
    parser.add_argument("--clients", type=int, default=4, help="closed loop for the capacity")
    parser.add_argument("--seconds", type=float, default=8.0, help="per capacity or Poisson run")
    parser.add_argument("--systems", default="in-process,monolithic,monolithic-h11,flexemr-http,flexemr-grpc")
    parser.add_argument("--loads", default="25,50,75", help="Poisson rates, %% of each system's capacity")
    parser.add_argument(
        "--rates", help="Poisson rates in requests/s, the same for every system (not --loads)"
    )
    parser.add_argument("--serve-args", default="", help="extra flags for every `flexemr serve`")
    parser.add_argument("--c1-load", metavar="URL", help="only send C=1 requests to URL for --seconds")
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    workload = SyntheticWorkload(model_spec(source), seed=0)
    requests = [workload.generate(args.batch) for _ in range(32)]
    bodies = [binary_body(r) for r in requests]
    if args.c1_load:  # the load of benchmarks/profile_serving.sh
        load = HttpLoad(args.c1_load, bodies)

        async def c1() -> dict[str, float]:
            sent, stop = 0, time.perf_counter() + args.seconds
            while time.perf_counter() < stop:
                sent += await load.send(sent)
            return {"sent": sent}

        print(f"{run_load(load, c1)['sent']:.0f} requests in {args.seconds:g} s")
        return
    systems = args.systems.split(",")
    loads = [float(k) for k in (args.rates or args.loads).split(",")]
    unit = " req/s" if args.rates else "%"
    results: dict[str, dict[str, float]] = {}

    def measure(name: str, load: Load, cpu: SystemCpu) -> None:
        row = sequential(load, args.requests, cpu)
        row["capacity"] = closed_loop(load, args.clients, args.seconds)
        row["lag"] = row["refused"] = 0.0
        for k in loads:
            run = poisson(load, k if args.rates else row["capacity"] * k / 100, args.seconds)
            row[f"p50_{k:g}"], row[f"p99_{k:g}"] = run["p50"], run["p99"]
            row["lag"] = max(row["lag"], run["lag"])
            row["refused"] += run["refused"]
        results[name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)

    if "in-process" in systems:
        torch.set_num_threads(args.torch_threads)
        measure("in-process", InProcessLoad(source, requests), in_process_cpu_s)
    for name, extra in (
        ("monolithic", ["--embedding-tier", "local"]),
        ("monolithic-h11", ["--embedding-tier", "local", "--http-parser", "h11"]),
    ):
        if name in systems:
            with served(args, extra) as (url, _, pid):
                measure(name, HttpLoad(url, bodies), functools.partial(served_cpu_s, pid))
    if {"flexemr-http", "flexemr-grpc"} & set(systems):
        with served(args, ["--embedding-servers", str(args.servers), "--grpc-port", "0"]) as (url, grpc, pid):
            if "flexemr-http" in systems:
                measure("flexemr-http", HttpLoad(url, bodies), functools.partial(served_cpu_s, pid))
            if "flexemr-grpc" in systems and grpc is not None:
                measure("flexemr-grpc", GrpcLoad(grpc, requests), functools.partial(served_cpu_s, pid))

    base = results.get("in-process")
    print(f"\n{args.preset} x{args.row_scale}, batch {args.batch}, {args.torch_threads} torch thread(s), "
          f"{os.cpu_count()} cores, serve flags {args.serve_args!r}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| system | C=1 p50 ms | C=1 p99 ms | CPU ms/request | of which servers | x in-process CPU "
          "| capacity req/s | "
          + " | ".join(f"p50/p99 ms at {k:g}{unit}" for k in loads) + " | generator lag p99 ms | refused |"
    )  # fmt: skip
    print("|---|" + "---:|" * (8 + len(loads)))
    for name, r in results.items():
        ratio = f"{r['cpu_ms'] / base['cpu_ms']:.2f}" if base else "-"
        cells = " | ".join(f"{r[f'p50_{k:g}']:.1f} / {r[f'p99_{k:g}']:.1f}" for k in loads)
        print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_ms']:.2f} | {r['servers_ms']:.2f} "
              f"| {ratio} | {r['capacity']:.1f} | {cells} | {r['lag']:.1f} "
              f"| {r['refused']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
