"""I/O engine benchmark: single vs shared vs mapped, threads, skew, migration, and credit latency.

Everything runs side by side in one process run against real embedding-server processes
(LocalCluster on 127.0.0.1) holding a scaled preset (rmc2 at row_scale 0.01 by default):

1. Lookup throughput (subrequests/s, rows/s) and latency (p50/p99 per subrequest) for the
   engine in `single`, `shared` and `mapped` modes at 1, 2, 4, 8 I/O threads,
   with 2 and 4 servers, under uniform traffic and skewed traffic (server 0 gets 60% of the
   subrequests), with migration off and on (`mapped`). Load: closed loop, client threads each
   submitting groups of pooled subrequests and waiting for the group.
2. Credit latency: time from the ranker granting a credit to the server seeing it (server clock,
   same host), while servers stream large raw responses, for credits on the priority control
   channel vs piggybacked on lookups.

Output (to --out, default reports/io_engine/): io_engine.md (tables), io_engine.png (throughput vs
threads per mode), io_engine.json (raw numbers).

    .venv/bin/python benchmarks/io_engine.py --quick
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexemr.config import Endpoint, EngineConfig
from flexemr.config.model import ModelSource
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.engine import IoEngine, make_engine
from flexemr.entrypoints.local import LocalCluster
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupRequest, LookupTransport


@dataclass(frozen=True)
class Case:
    mode: str
    threads: int
    servers: int
    traffic: str
    migration: bool


def make_transport(spec: ClusterSpec, case: Case, credits: str = "priority") -> LookupTransport:
    config = EngineConfig(mode=case.mode, io_threads=case.threads, credits=credits, migration=case.migration)  # type: ignore[arg-type]
    engine = make_engine(spec.embedding_servers, identities(spec), config)
    engine.start(timeout=30)
    return engine


def request_pool(
    spec: ClusterSpec, bags: int, pooling: int, raw: bool, seed: int
) -> list[list[LookupRequest]]:
    """A few pre-built subrequests per server (building them is not what we measure)."""
    rng = np.random.default_rng(seed)
    pools = []
    for server in range(spec.sharding.num_servers):
        rows = spec.sharding.server_rows(server)
        pool = []
        for _ in range(16):
            lengths = rng.integers(max(1, pooling // 2), pooling * 3 // 2 + 1, size=bags)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            indices = rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64)
            pool.append(LookupRequest(indices, offsets, raw=raw))
        pools.append(pool)
    return pools


def traffic_weights(servers: int, traffic: str) -> np.ndarray:
    if traffic == "uniform":
        return np.full(servers, 1.0 / servers)
    weights = np.full(servers, 0.4 / (servers - 1))
    weights[0] = 0.6
    return weights


def drive(
    transport: LookupTransport,
    pools: Sequence[Sequence[LookupRequest]],
    weights: np.ndarray,
    duration_s: float,
    clients: int,
    group: int,
) -> dict[str, float]:
    """Closed-loop load; returns throughput and per-subrequest latency percentiles."""
    latencies: list[float] = []
    counts = [0, 0]  # subrequests, rows
    lock = threading.Lock()
    stop = time.monotonic() + duration_s

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        done = rows = 0
        mine: list[float] = []
        while time.monotonic() < stop:
            servers = rng.choice(len(pools), size=group, p=weights)
            futures: list[Future[np.ndarray]] = []
            starts = []
            for server in servers:
                request = pools[server][int(rng.integers(0, len(pools[server])))]
                starts.append(time.perf_counter())
                future = transport.submit(int(server), request)
                future.add_done_callback(lambda f, t=starts[-1]: mine.append(time.perf_counter() - t))
                futures.append(future)
                rows += request.rows.size
            wait(futures, timeout=30)
            for future in futures:
                future.result()
            done += len(futures)
        with lock:
            counts[0] += done
            counts[1] += rows
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "subrequests_per_s": counts[0] / elapsed,
        "rows_per_s": counts[1] / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def cases(quick: bool, servers: int) -> list[Case]:
    threads = (1, 2, 4) if quick else (1, 2, 4, 8)
    out = []
    for traffic in ("uniform", "skewed"):
        out.append(Case("single", 1, servers, traffic, False))
        for n in threads:
            if n > 1:
                out.append(Case("shared", n, servers, traffic, False))
            out.append(Case("mapped", n, servers, traffic, False))
            if n > 1:
                out.append(Case("mapped", n, servers, traffic, True))
    return out


def start_cluster(preset: str, row_scale: float, servers: int) -> tuple[LocalCluster, ClusterSpec]:
    source = ModelSource(preset=preset, row_scale=row_scale)
    model = model_spec(source)
    plan = make_plan("row", model.table_rows, model.dim, servers)
    local = LocalCluster(ClusterSpec(source, plan, tuple(Endpoint() for _ in range(servers))))
    return local, local.start(timeout=120)


def throughput_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for servers in args.servers:
        local, spec = start_cluster(args.preset, args.row_scale, servers)
        try:
            pools = request_pool(spec, args.bags, args.pooling, raw=False, seed=servers)
            for case in cases(args.quick, servers):
                transport = make_transport(spec, case)
                try:
                    drive(
                        transport,
                        pools,
                        traffic_weights(servers, case.traffic),
                        0.2,
                        args.clients,
                        args.group,
                    )
                    measured = drive(
                        transport,
                        pools,
                        traffic_weights(servers, case.traffic),
                        args.duration,
                        args.clients,
                        args.group,
                    )
                    stats = transport.stats()
                finally:
                    transport.close()
                row = {**vars(case), **measured, "migrations": stats.get("engine", {}).get("migrations", 0)}
                results.append(row)
                print(
                    f"{case.mode:>6} threads={case.threads} servers={servers} {case.traffic:>7} "
                    f"migration={'on ' if case.migration else 'off'} "
                    f"{measured['subrequests_per_s']:8.0f} subreq/s "
                    f"p50={measured['p50_ms']:.2f} ms p99={measured['p99_ms']:.2f} ms",
                    flush=True,
                )
        finally:
            local.stop()
    return results


def credit_latency_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Servers stream large raw responses; where do credits spend their time?"""
    local, spec = start_cluster(args.preset, args.row_scale, 2)
    results = []
    try:
        pools = request_pool(spec, bags=1, pooling=args.large_rows, raw=True, seed=7)
        for credits in ("priority", "piggyback"):
            case = Case("mapped", 2, 2, "uniform", False)
            engine = make_transport(spec, case, credits=credits)
            assert isinstance(engine, IoEngine)
            try:
                measured = drive(
                    engine, pools, traffic_weights(2, "uniform"), args.duration, args.clients, args.group
                )
                seen = [engine.server_credit_stats(s)["credit_latency_ns"] for s in range(2)]
            finally:
                engine.close()
            lat = np.array([x for s in seen for x in s], dtype=np.float64) / 1e3
            results.append(
                {
                    "credits": credits,
                    "grants_seen": int(lat.size),
                    "credit_p50_us": float(np.percentile(lat, 50)) if lat.size else float("nan"),
                    "credit_p99_us": float(np.percentile(lat, 99)) if lat.size else float("nan"),
                    "response_mib_per_s": measured["rows_per_s"] * spec.sharding.dim * 4 / 2**20,
                    "p99_ms": measured["p99_ms"],
                }
            )
            r = results[-1]
            print(
                f"credits={credits:>9}: grant->server p50={r['credit_p50_us']:.0f} us "
                f"p99={r['credit_p99_us']:.0f} us ({r['grants_seen']} grants), "
                f"{r['response_mib_per_s']:.0f} MiB/s of responses",
                flush=True,
            )
    finally:
        local.stop()
    return results


def markdown(results: list[dict[str, Any]], credit: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# I/O engine benchmark",
        "",
        f"Preset {args.preset} at row_scale {args.row_scale}; subrequests of {args.bags} bags x "
        f"~{args.pooling} rows (partial pooling); {args.clients} client threads x groups of {args.group}; "
        f"{args.duration} s per case; embedding servers are LocalCluster processes on 127.0.0.1. "
        "Skewed: server 0 gets 60% of the subrequests.",
        "",
        "| mode | I/O threads | servers | traffic | migration | subreq/s | rows/s | p50 ms | p99 ms "
        "| moves |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['threads']} | {r['servers']} | {r['traffic']} | "
            f"{'on' if r['migration'] else 'off'} | {r['subrequests_per_s']:.0f} | {r['rows_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['migrations']} |"
        )
    lines += [
        "",
        "## Credit latency (grant on the ranker -> seen by the server)",
        "",
        f"Servers stream raw responses of {args.large_rows} rows each (mapped, 2 threads, 2 servers).",
        "",
        "| credits | grants seen | p50 us | p99 us | responses MiB/s | subrequest p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in credit:
        lines.append(
            f"| {c['credits']} | {c['grants_seen']} | {c['credit_p50_us']:.0f} | {c['credit_p99_us']:.0f} | "
            f"{c['response_mib_per_s']:.0f} | {c['p99_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["servers"], r["traffic"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (servers, traffic) in zip(axes[0], panels, strict=True):
        for mode, migration, style in (
            ("single", False, "o-"),
            ("shared", False, "s-"),
            ("mapped", False, "^--"),
            ("mapped", True, "^-"),
        ):
            rows = [
                r
                for r in results
                if (r["servers"], r["traffic"], r["mode"]) == (servers, traffic, mode)
                and (r["migration"] == migration or r["threads"] == 1)
            ]
            if mode == "mapped" and not migration:
                rows = [r for r in rows if not r["migration"]]
            if rows:
                label = mode + (" + migration" if migration else "")
                ax.plot(
                    [r["threads"] for r in rows], [r["subrequests_per_s"] for r in rows], style, label=label
                )
        ax.set_title(f"{servers} servers, {traffic}")
        ax.set_xlabel("I/O threads")
        ax.set_ylabel("subrequests/s")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/io_engine", help="output directory")
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter runs (< 2 minutes)")
    parser.add_argument("--preset", default="rmc2")
    parser.add_argument("--row-scale", type=float, default=0.01)
    parser.add_argument("--duration", type=float, default=None, help="seconds per case")
    parser.add_argument("--bags", type=int, default=64, help="bags per subrequest")
    parser.add_argument("--pooling", type=int, default=20, help="mean rows per bag")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--group", type=int, default=16, help="subrequests each client submits at once")
    parser.add_argument("--large-rows", type=int, default=4096, help="rows per raw response (credit test)")
    parser.add_argument("--servers", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 0.8 if args.quick else 3.0
    if args.servers is None:
        args.servers = [2] if args.quick else [2, 4]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = throughput_suite(args)
    credit = credit_latency_suite(args)
    (out / "io_engine.json").write_text(json.dumps({"throughput": results, "credits": credit}, indent=2))
    (out / "io_engine.md").write_text(markdown(results, credit, args))
    plot(results, out / "io_engine.png")
    print(f"wrote {out}/io_engine.md, io_engine.png, io_engine.json in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
