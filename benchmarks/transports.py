"""Node-link transports side by side: tcp vs ucx over UCX's TCP vs ucx over shared memory.

One run, one machine, the same embedding-server processes' model (LocalCluster on 127.0.0.1, a
scaled preset), the same engine (`mapped`, credits on the priority channel), for each transport:

1. per subrequest: p50/p99 latency with one subrequest in flight (pooled lookups of `--bags` bags);
2. throughput: `--clients` threads each keeping `--depth` subrequests in flight for `--seconds`,
   and the CPU time per subrequest of the ranker process and of the servers (user + system);
3. per request: p50/p99 of whole ranker requests (`Ranker.score`, batch `--batch`: route, look up
   on every server, pool, dense model) and their CPU time per request.

The transports: `tcp` (Python sockets), `ucx-tcp` (UCX_TLS=tcp) and `ucx-shm` (UCX_TLS=tcp,sm,self:
UCX uses TCP to set an endpoint up, then shared memory). Every link proves the secret first.

With `--shaped RATE,...` the servers run on other "hosts" instead: network namespaces of the test
bed (`flexemr.entrypoints.netns`, root), each behind a link limited to RATE (`tc tbf`, both ways),
and the ranker measures from a namespace of its own, so every lookup crosses two shaped veths and a
bridge (shared memory cannot cross hosts: tcp and ucx-tcp only).

    .venv/bin/python benchmarks/transports.py --quick
    sudo .venv/bin/python benchmarks/transports.py --shaped 10gbit,1gbit --transports tcp,ucx-tcp
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import numpy as np

from flexemr.cli.spec import spread
from flexemr.config import Endpoint, EngineConfig, NodeLimits
from flexemr.config.model import ModelSource
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.engine import make_engine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.netns import NetnsBed
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupRequest
from proc_cpu import cpu_s

TRANSPORTS = {"tcp": ("tcp", None), "ucx-tcp": ("ucx", "tcp"), "ucx-shm": ("ucx", "tcp,sm,self")}
"""name -> (--transport, UCX_TLS)."""
SECRET = "transports-benchmark-secret"
START_TIMEOUT_S = 300
"""How long the ranker waits for servers to come up (slow to start on a loaded machine)."""


@contextlib.contextmanager
def environment(ucx_tls: str | None, device: str = "lo") -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_NET_DEVICES", "FLEXEMR_SECRET")}
    os.environ["FLEXEMR_SECRET"] = SECRET
    os.environ["UCX_NET_DEVICES"] = device  # UCX's TCP transport listens on every device it may use
    if ucx_tls is None:
        os.environ.pop("UCX_TLS", None)
    else:
        os.environ["UCX_TLS"] = ucx_tls
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the processes `pids` so far."""
    return sum(cpu_s(pid) for pid in pids)


def requests(spec: ClusterSpec, server: int, bags: int, count: int, seed: int) -> list[LookupRequest]:
    rng = np.random.default_rng(seed)
    rows = spec.sharding.server_rows(server)
    out = []
    for _ in range(count):
        lengths = rng.integers(1, 2 * 20, size=bags)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out.append(LookupRequest(rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64), offsets))
    return out


def percentiles(seconds: list[float]) -> tuple[float, float]:
    us = np.array(seconds) * 1e6
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def measure(name: str, spec: ClusterSpec, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    engine = make_engine(
        spec.embedding_servers,
        identities(spec),
        spec.engine,
        secret=SECRET.encode(),
        node_limits=NodeLimits(heartbeat_timeout_s=10.0),
    )
    engine.start(timeout=START_TIMEOUT_S)
    servers = len(spec.embedding_servers)
    pool = [requests(spec, s, args.bags, 64, seed=s) for s in range(servers)]
    result: dict[str, Any] = {"transport": name}
    try:
        for s in range(servers):  # warm up every connection
            wait([engine.submit(s, r) for r in pool[s][:16]])
        times = []
        for i in range(args.latency_samples):
            request = pool[i % servers][i % 64]
            start = time.perf_counter()
            engine.submit(i % servers, request).result(30)
            times.append(time.perf_counter() - start)
        result["subrequest_p50_us"], result["subrequest_p99_us"] = percentiles(times)

        done = [0] * args.clients
        stop = threading.Event()

        def client(index: int) -> None:
            i = index
            while not stop.is_set():
                group: list[Future[np.ndarray]] = []
                for _ in range(args.depth):
                    i += 1
                    group.append(engine.submit(i % servers, pool[i % servers][i % 64]))
                for future in group:
                    future.result(30)
                done[index] += len(group)

        cpu_ranker, cpu_servers = time.process_time(), server_cpu(pids)
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        total = sum(done)
        result["subrequests_per_s"] = total / elapsed
        result["ranker_cpu_us_per_subrequest"] = (time.process_time() - cpu_ranker) / total * 1e6
        result["servers_cpu_us_per_subrequest"] = (server_cpu(pids) - cpu_servers) / total * 1e6
    finally:
        engine.close()

    ranker = build_ranker(spec, connect_timeout_s=START_TIMEOUT_S)
    try:
        rng = np.random.default_rng(7)
        model = ranker.spec
        batches = []
        for _ in range(8):
            lengths = rng.integers(1, 2 * args.pooling, size=(model.num_tables, args.batch))
            per_table = lengths.sum(axis=1)
            indices = np.concatenate(
                [
                    rng.integers(0, rows, size=int(n))
                    for rows, n in zip(model.table_rows, per_table, strict=True)
                ]
            ).astype(np.int64)
            lengths = lengths.reshape(-1).astype(np.int32)
            dense = rng.standard_normal((args.batch, model.num_dense)).astype(np.float32)
            batches.append((dense, indices, lengths))
        for batch in batches:
            ranker.score(*batch)
        times = []
        cpu_ranker, cpu_servers = time.process_time(), server_cpu(pids)
        for i in range(args.request_samples):
            start = time.perf_counter()
            ranker.score(*batches[i % len(batches)])
            times.append(time.perf_counter() - start)
        result["request_p50_us"], result["request_p99_us"] = percentiles(times)
        result["requests_per_s_one_at_a_time"] = len(times) / sum(times)
        result["ranker_cpu_us_per_request"] = (time.process_time() - cpu_ranker) / len(times) * 1e6
        result["servers_cpu_us_per_request"] = (server_cpu(pids) - cpu_servers) / len(times) * 1e6
    finally:
        ranker.close()
    return result


@contextlib.contextmanager
def shaped_cluster(spec: ClusterSpec, rate: str) -> Iterator[tuple[ClusterSpec, list[int], NetnsBed]]:
    """`spec`'s servers each in a namespace of a fresh test bed behind a link shaped to `rate`, and a
    `rank` namespace to measure from (enter it with `bed.entered("rank")`); yields the spec with the
    servers' addresses, their pids and the bed."""
    hosts = [f"mem{i}" for i in range(len(spec.embedding_servers))]
    with NetnsBed([*hosts, "rank"]) as bed, tempfile.TemporaryDirectory() as tmp:
        endpoints = spread([bed.addresses[h] for h in hosts], 7000, spec.sharding)
        spec = dataclasses.replace(spec, embedding_servers=endpoints)
        path = Path(tmp) / "cluster.json"
        spec.save(path)
        for i, host in enumerate(hosts):
            command = [sys.executable, "-m", "flexemr.cli.main", "embedding-server", "--spec", str(path),
                       "--index", str(i), "--quiet"]  # fmt: skip
            bed.popen(host, command, env=dict(os.environ), stdout=subprocess.DEVNULL)
            bed.shape(host, rate)
        yield spec, [pid for host in hosts for pid in bed.pids(host)], bed


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    columns = [
        ("link", "link", "{}"),
        ("transport", "transport", "{}"),
        ("subrequests_per_s", "subrequests/s", "{:,.0f}"),
        ("subrequest_p50_us", "subreq p50 µs", "{:,.0f}"),
        ("subrequest_p99_us", "subreq p99 µs", "{:,.0f}"),
        ("ranker_cpu_us_per_subrequest", "ranker CPU µs/subreq", "{:,.0f}"),
        ("servers_cpu_us_per_subrequest", "servers CPU µs/subreq", "{:,.0f}"),
        ("request_p50_us", "request p50 µs", "{:,.0f}"),
        ("request_p99_us", "request p99 µs", "{:,.0f}"),
        ("ranker_cpu_us_per_request", "ranker CPU µs/req", "{:,.0f}"),
        ("servers_cpu_us_per_request", "servers CPU µs/req", "{:,.0f}"),
    ]
    lines = [
        f"preset {args.preset} (row scale {args.row_scale}), {args.servers} servers, {args.bags} bags per "
        f"subrequest, {args.clients} clients x {args.depth} in flight for {args.seconds} s; requests of "
        f"batch {args.batch}, one at a time",
        "",
        "| " + " | ".join(c[1] for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="rmc2")
    parser.add_argument("--row-scale", type=float, default=0.01)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--io-threads", type=int, default=2)
    parser.add_argument("--bags", type=int, default=64, help="bags per subrequest")
    parser.add_argument("--pooling", type=int, default=20, help="mean rows per bag of a request")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--request-samples", type=int, default=300)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument(
        "--shaped",
        default="",
        help="link rates (tc units, e.g. 10gbit,1gbit): servers "
        "in network namespaces behind links shaped to each (root); default: loopback",
    )
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("reports/transports"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.latency_samples, args.request_samples = 3.0, 500, 100
    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    model = model_spec(source)
    plan = make_plan("row", model.table_rows, model.dim, args.servers)
    results = []
    for link in args.shaped.split(",") if args.shaped else ["loopback"]:
        for name in args.transports.split(","):
            transport, ucx_tls = TRANSPORTS[name]
            engine = EngineConfig(transport=transport, io_threads=args.io_threads)  # type: ignore[arg-type]
            spec = ClusterSpec(source, plan, tuple(Endpoint() for _ in range(args.servers)), engine=engine)
            if link == "loopback":
                with environment(ucx_tls), LocalCluster(spec) as local:
                    results.append({"link": link, **measure(name, local.spec, local.pids, args)})
            else:
                # the engine's threads, started in the rank namespace, live there too
                with (
                    environment(ucx_tls, device="eth0"),
                    shaped_cluster(spec, link) as (shaped, pids, bed),
                    bed.entered("rank"),
                ):
                    results.append({"link": link, **measure(name, shaped, pids, args)})
            results[-1]["load_average"] = os.getloadavg()[0]
            print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, args)
    (args.out / "transports.md").write_text(table)
    (args.out / "transports.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
