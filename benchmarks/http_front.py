"""The ranker's HTTP front as users run it: keep-alive latency, and behaviour under overload.

Starts `flexemr serve` (default `--preset tiny`) unless `--url` points at a running one, then

    keepalive: sequential requests on one keep-alive connection (flexemr.client, binary tensors);
               prints p50/p99. Without TCP_NODELAY every response waited for a delayed ACK (~40 ms).
    overload:  measures the unloaded latency (one request at a time) and the capacity (a closed
               loop whose clients wait as a 429's Retry-After says), then offers `--factor` x that
               rate (open loop, fixed intervals) for `--seconds`, each request on its own
               connection (as many clients would); prints offered, admitted
               (200), refused (429), goodput against the capacity, p50/p99 of admitted and refused
               requests, liveness probes, the admission's requests limit and requests in flight
               (every 0.1 s), the ranker's RSS and how long it took to drain; the ranker's CPU per
               request at capacity and per admitted request under overload;
               the kernel's listen-queue overflows meanwhile (connections the ranker did not
               accept in time: their clients retry the SYN after 1 s, 3 s, ...); and the cores the
               served system (ranker and servers), the load generator and the whole host used in
               the closed loop and under overload (the generator shares a small box's cores).

    refusals:  the ranker's CPU per refusal, user and system: holds it full (requests whose headers
               came and whose bodies never do: in flight, at least the latency limit's first 8), then
               sends `--requests` requests, each on its own connection, `--refusal-clients` (32) at
               a time; every one is refused 429.

    .venv/bin/python benchmarks/http_front.py keepalive --requests 500
    .venv/bin/python benchmarks/http_front.py refusals --requests 5000
    .venv/bin/python benchmarks/http_front.py overload --seconds 60 --factor 3   # #22's overload
    .venv/bin/python benchmarks/http_front.py overload --serve-args="--max-in-flight 1024"
    .venv/bin/python benchmarks/http_front.py overload --peak 400   # the same offered rate for an A/B
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shlex
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import uvloop

from flexemr.batch import SparseBatch
from flexemr.client import Client, infer_inputs
from flexemr.client import binary_body as client_binary_body
from flexemr.config.model import ModelSource
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.model.source import model_spec
from flexemr.workload.synthetic import SyntheticWorkload
from proc_cpu import cpu_s, host_cpu_s, tree_cpu_s, user_system_s

URL_PATH = "/v2/models/dlrm/infer"


def start_serve(preset: str, extra: list[str]) -> AnnouncedProcess:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--preset", preset, "--port", "0"]
    command += ["--watch-stdin", *extra]
    return AnnouncedProcess(command, "flexemr ready:", 180, {**os.environ, "PYTHONUNBUFFERED": "1"})


def requests(preset: str, batch: int, count: int) -> list[SparseBatch]:
    workload = SyntheticWorkload(model_spec(ModelSource(preset=preset)), seed=0)
    return [workload.generate(batch) for _ in range(count)]


def binary_body(request: SparseBatch) -> tuple[bytes, dict[str, str]]:
    """A KServe binary-tensor body and its header as `flexemr.client` sends them, encoded once so
    the load costs no encoding."""
    body, header_length = client_binary_body(infer_inputs(request.dense, request.indices, request.lengths))
    return body, {"Inference-Header-Content-Length": str(header_length)}


def keepalive(url: str, args: argparse.Namespace) -> None:
    pool = requests(args.preset, args.batch, 16)
    latencies = []
    with Client(url) as client:
        for i in range(args.requests + 10):
            request = pool[i % len(pool)]
            start = time.perf_counter()
            client.infer(request.dense, request.indices, request.lengths)
            if i >= 10:  # the first ones warm up
                latencies.append(time.perf_counter() - start)
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    print(
        f"keep-alive, batch {args.batch}, {args.requests} sequential requests: "
        f"p50 {p50:.2f} ms  p99 {p99:.2f} ms"
    )


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class CoresUsed:
    """Cores the served system (ranker and servers), this benchmark's load and the whole host used
    over a phase: on a small box the load generator shares the cores with what it measures."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start = (time.perf_counter(), tree_cpu_s(pid), time.process_time(), *host_cpu_s())

    def report(self, generators_s: float = 0.0) -> str:
        """`generators_s`: CPU seconds of load processes other than this one."""
        wall, system, own, busy, total = self._start
        elapsed = time.perf_counter() - wall
        host_busy, host_total = host_cpu_s()
        load = time.process_time() - own + generators_s
        return (
            f"system {(tree_cpu_s(self.pid) - system) / elapsed:.2f}, load generator {load / elapsed:.2f}, "
            f"whole host {(host_busy - busy) / elapsed:.2f} of {(host_total - total) / elapsed:.2f}"
        )


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (whole host)."""
    names, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(values[names.index("ListenOverflows")])


Outcome = tuple[int | str, float]
"""HTTP status (or the client error's name) and latency in seconds."""


class Offered(NamedTuple):
    """What one load process offered and got back."""

    outcomes: list[Outcome]
    began: float
    """Wall-clock time it began offering."""
    offered: float
    """Wall-clock time it stopped offering."""
    done: float
    """Wall-clock time the last answer came."""
    cpu_s: float
    """CPU seconds the process used meanwhile."""


def raw_request(url: str, body: tuple[bytes, dict[str, str]]) -> bytes:
    """The whole HTTP/1.1 request, encoded once: the load costs no encoding."""
    host = url.removeprefix("http://")
    headers = {"Host": host, "Content-Length": str(len(body[0])), "Connection": "close", **body[1]}
    head = f"POST {URL_PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body[0]


async def post(url: str, request: bytes, timeout: float) -> Outcome:
    """One request on its own connection (opened, used once, closed), as a client per request."""
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        return int(head.split(b" ", 2)[1]), time.perf_counter() - start
    except TimeoutError:
        return "timeout", time.perf_counter() - start
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__, time.perf_counter() - start
    finally:
        if writer is not None:
            writer.close()


async def sequential(url: str, requests_: list[bytes], count: int, timeout: float) -> np.ndarray:
    """Latencies (ms) of `count` requests one after another: the unloaded latency."""
    latencies = []
    for i in range(count):
        status, seconds = await post(url, requests_[i % len(requests_)], timeout)
        if status == 200:
            latencies.append(seconds * 1000)
    return np.array(latencies)


RETRY_AFTER_S = 1.0
"""What the ranker's 429 says (`Retry-After: 1`)."""


async def capacity(url: str, requests_: list[bytes], args: argparse.Namespace) -> float:
    """Requests per second answered to `clients` clients each with a request always in flight
    (closed loop), each waiting as its 429 says before it tries again: a client that retried at
    once would measure how fast the ranker refuses (thousands a second), not its peak."""
    done = refused = 0
    stop = time.perf_counter() + args.capacity_seconds

    async def loop() -> None:
        nonlocal done, refused
        while time.perf_counter() < stop:
            status, _ = await post(url, requests_[done % len(requests_)], args.timeout)
            done += status == 200
            refused += status == 429
            if status == 429:
                await asyncio.sleep(min(RETRY_AFTER_S, stop - time.perf_counter()))

    await asyncio.gather(*(loop() for _ in range(args.clients)))
    print(f"capacity phase: {refused} of {done + refused} requests refused")
    return float(done / args.capacity_seconds)


def offer(url: str, rate: float, args: argparse.Namespace, seed: int) -> Offered:
    """One load process: requests at fixed intervals (open loop), each on its own connection."""
    requests_ = [raw_request(url, binary_body(r)) for r in requests(args.preset, args.batch, 32)]

    async def run() -> Offered:
        tasks, began, cpu = [], time.time(), time.process_time()
        start = time.perf_counter() + seed / rate / args.processes  # processes interleave
        for i in range(int(rate * args.seconds)):
            await asyncio.sleep(max(start + i / rate - time.perf_counter(), 0))
            tasks.append(asyncio.create_task(post(url, requests_[i % len(requests_)], args.timeout)))
        offered = time.time()
        outcomes = list(await asyncio.gather(*tasks))
        return Offered(outcomes, began, offered, time.time(), time.process_time() - cpu)

    return uvloop.run(run())


async def overload(url: str, pid: int | None, args: argparse.Namespace) -> None:
    requests_ = [raw_request(url, binary_body(r)) for r in requests(args.preset, args.batch, 32)]
    unloaded = await sequential(url, requests_, 1000, args.timeout)  # p99: the 10th slowest
    cpu_before, cores = cpu_s(pid), CoresUsed(pid)
    peak = args.peak or await capacity(url, requests_, args)
    cores_at_capacity = cores.report()
    cpu_per_request = math.nan if args.peak else (cpu_s(pid) - cpu_before) / (peak * args.capacity_seconds)
    rate = peak * args.factor
    unloaded_p99 = float(np.percentile(unloaded, 99))
    print(f"unloaded (one at a time): p50 {np.median(unloaded):.1f} ms  p99 {unloaded_p99:.1f} ms")
    measured = "given" if args.peak else f"closed loop of {args.clients}"
    print(f"capacity ({measured}): {peak:.1f} requests/s of {args.batch} samples; "
          f"offering {rate:.1f}/s from {args.processes} processes", flush=True)  # fmt: skip
    rss_before, rss_peak, probes, limits = rss_mb(pid), rss_mb(pid), [], []
    cpu_before, overflows_before, cores = cpu_s(pid), listen_overflows(), CoresUsed(pid)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        load = asyncio.gather(
            *(
                loop.run_in_executor(pool, offer, url, rate / args.processes, args, i)
                for i in range(args.processes)
            )
        )
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as prober:
            while not load.done():
                begin = time.perf_counter()
                try:
                    ok = (await prober.get("/v2/health/live")).status_code == 200
                except httpx.TransportError:
                    ok = False
                probes.append((ok, time.perf_counter() - begin))
                with contextlib.suppress(httpx.TransportError, KeyError):
                    admission = (await prober.get("/v2/stats")).json()["admission"]
                    limits.append((admission["requests_limit"], admission["requests_in_flight"]))
                rss_peak = max(rss_peak, rss_mb(pid))
                await asyncio.sleep(0.1)
        parts = await load
    cores_under_overload = cores.report(sum(part.cpu_s for part in parts))
    cpu_overload, overflows = cpu_s(pid) - cpu_before, listen_overflows() - overflows_before
    results = [outcome for part in parts for outcome in part.outcomes]
    offered_s = max(part.offered - part.began for part in parts)
    drain_s = max(part.done for part in parts) - max(part.offered for part in parts)

    outcomes = Counter(status for status, _ in results)
    admitted = np.array([t for status, t in results if status == 200]) * 1000
    refused_ms = np.array([t for status, t in results if status == 429]) * 1000
    p50, p99 = np.percentile(admitted, [50, 99]) if admitted.size else (float("nan"),) * 2
    probe_ms = np.array([t for _, t in probes]) * 1000
    goodput = outcomes[200] / (offered_s + drain_s)
    print(f"offered {len(results)} in {offered_s:.1f} s ({len(results) / offered_s:.1f}/s; slower than "
          "asked means the load generator ran out of CPU)")  # fmt: skip
    print(f"admitted {outcomes[200]}  refused 429: {outcomes[429]}  "
          f"other {dict((k, v) for k, v in outcomes.items() if k not in (200, 429))}")  # fmt: skip
    print(f"goodput {goodput:.1f} requests/s = {goodput / peak:.2f} x the closed-loop peak")
    print(f"admitted latency p50 {p50:.1f} ms  p99 {p99:.1f} ms = {p99 / unloaded_p99:.2f} x "
          f"the unloaded p99; all answered {drain_s:.2f} s after the offer ended")  # fmt: skip
    if refused_ms.size:
        print(
            f"refusals (429): p50 {np.median(refused_ms):.1f} ms  p99 {np.percentile(refused_ms, 99):.1f} ms"
        )
    print(f"liveness: {sum(ok for ok, _ in probes)}/{len(probes)} ok, p50 {np.median(probe_ms):.1f} ms, "
          f"max {probe_ms.max():.1f} ms")  # fmt: skip
    if limits:
        limit, in_flight = np.array(limits).T
        print(f"admission (every 0.1 s): requests limit p50 {np.median(limit):.0f} (range "
              f"{limit.min()}-{limit.max()}), requests in flight p50 {np.median(in_flight):.0f} "
              f"max {in_flight.max()}")  # fmt: skip
    print(f"ranker RSS: {rss_before:.0f} MB before, {rss_peak:.0f} MB peak, {rss_mb(pid):.0f} MB after")
    per_admitted = cpu_overload / max(outcomes[200], 1)
    print(f"ranker CPU: {cpu_per_request * 1000:.2f} ms per request at capacity; under overload "
          f"{cpu_overload:.1f} s = {per_admitted * 1000:.2f} ms per admitted request, refusals included "
          "(`refusals` measures a refusal alone)")  # fmt: skip
    print(f"listen-queue overflows (whole host) during the overload: {overflows}")
    print(f"cores used at capacity: {cores_at_capacity}")
    print(f"cores used under overload: {cores_under_overload}")


async def refusals(url: str, pid: int | None, args: argparse.Namespace) -> None:
    request = raw_request(url, binary_body(requests(args.preset, args.batch, 1)[0]))
    host, port = url.removeprefix("http://").split(":")
    held = []
    for _ in range(args.hold):  # headers only: each holds a place in flight until it closes
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(request[: request.index(b"\r\n\r\n") + 4])
        held.append(writer)
    await asyncio.sleep(0.5)
    outcomes: Counter[int | str] = Counter()
    latencies: list[float] = []
    left = args.requests

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status, seconds = await post(url, request, args.timeout)
            outcomes[status] += 1
            latencies.append(seconds * 1000)

    (user_before, system_before), begin = user_system_s(pid), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(args.refusal_clients)))
    user_after, system_after = user_system_s(pid)
    user, system, wall = user_after - user_before, system_after - system_before, time.perf_counter() - begin
    for writer in held:
        writer.close()
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"{args.requests} requests while {args.hold} are held in flight, in {wall:.1f} s: {dict(outcomes)}")
    print(f"refusal latency p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    print(f"ranker CPU {user + system:.2f} s = {(user + system) / args.requests * 1e6:.0f} us per refusal "
          f"(user {user / args.requests * 1e6:.0f}, system {system / args.requests * 1e6:.0f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("keepalive", "overload", "refusals"))
    parser.add_argument("--url", help="a running ranker (default: start `flexemr serve`)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--serve-args", default="", help="extra flags for `flexemr serve`")
    parser.add_argument("--batch", type=int, default=None, help="samples per request (keepalive 1, else 64)")
    parser.add_argument("--requests", type=int, default=500, help="keepalive, refusals: requests")
    parser.add_argument("--hold", type=int, default=8, help="refusals: requests held in flight")
    parser.add_argument("--refusal-clients", type=int, default=32, help="refusals: requests at once")
    parser.add_argument("--seconds", type=float, default=60.0, help="overload: how long to offer load")
    parser.add_argument("--capacity-seconds", type=float, default=5.0, help="overload: closed-loop phase")
    parser.add_argument("--clients", type=int, default=8, help="overload: closed-loop concurrency")
    parser.add_argument(
        "--peak", type=float, help="overload: take this capacity (requests/s) instead of measuring it"
    )
    parser.add_argument("--factor", type=float, default=3.0, help="overload: offered / capacity")
    parser.add_argument("--processes", type=int, default=2, help="overload: load-generating processes")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    args = parser.parse_args()
    args.batch = args.batch or (1 if args.mode == "keepalive" else 64)
    serve = None if args.url else start_serve(args.preset, shlex.split(args.serve_args))
    try:
        url = args.url or serve.url  # type: ignore[union-attr]
        pid = serve.pid if serve else None
        if args.mode == "keepalive":
            keepalive(url, args)
        elif args.mode == "refusals":
            uvloop.run(refusals(url, pid, args))
        else:
            uvloop.run(overload(url, pid, args))
    finally:
        if serve is not None:
            serve.close()


if __name__ == "__main__":
    main()
