"""flexemr vs naive vs monolithic with the embedding servers on other "hosts" behind a rate-limited link.

Each embedding server runs in its own network namespace, linked to the ranker's namespace through a
bridge; every server's link is shaped with `tc tbf` to each rate in turn (both directions). The ranker
and the measuring clients run in this process inside the ranker's namespace, so every lookup crosses a
shaped link, as between real hosts: bytes saved by partial pooling (and the cache) show up as
throughput. Needs root and iproute2 (see flexemr.entrypoints.netns).

    sudo .venv/bin/python benchmarks/shaped_link.py --preset rmc2 --row-scale 0.02 --rates 10gbit,1gbit
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from flexemr.cli.spec import spread
from flexemr.config import CacheMode, EngineConfig, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.netns import NetnsBed
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan
from serving import (  # benchmarks/serving.py, beside this script
    add_deployment_arguments,
    add_load_arguments,
    measure,
    monolithic_scorer,
    synthetic_batches,
)

SYSTEMS: dict[str, tuple[RankerConfig, EngineConfig]] = {
    "naive (raw rows, 1 I/O thread)": (RankerConfig(lookup="raw"), EngineConfig(mode="single", io_threads=1)),
    "flexemr (partial pooling)": (RankerConfig(), EngineConfig()),
    "flexemr + cache (fixed 64 MiB)": (RankerConfig(cache=CacheMode.parse("fixed:64MiB")), EngineConfig()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deployment_arguments(parser)
    parser.add_argument("--rates", default="10gbit,1gbit", help="link rates to compare (tc units)")
    add_load_arguments(parser, clients=4)
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    requests = synthetic_batches(spec, args)
    samples = (args.batches + 2) * args.batch  # + the exactness check and the warm-up batch
    mono = monolithic_scorer(source)

    results = {("-", "monolithic (in-process)"): {**measure(mono, requests, args.clients), "bytes": 0.0}}
    hosts = [f"mem{i}" for i in range(args.servers)]
    with NetnsBed([*hosts, "rank"]) as bed, tempfile.TemporaryDirectory() as tmp:
        netem = "netem: available" if bed.delay_supported() else "no netem in this kernel: no added delay"
        print(f"links: tc tbf rate limits; {netem}", flush=True)
        plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.servers)
        endpoints = spread([bed.addresses[h] for h in hosts], 7000, plan)  # private namespaces
        cluster = ClusterSpec(source, plan, endpoints)
        spec_path = Path(tmp) / "cluster.json"
        cluster.save(spec_path)
        # Servers on other hosts bind non-loopback addresses: they and this process's ranker share a
        # secret, through the environment.
        os.environ.setdefault("FLEXEMR_SECRET", secrets.token_hex(32))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i, host in enumerate(hosts):
            command = [sys.executable, "-m", "flexemr.cli.main", "embedding-server", "--spec", str(spec_path),
                       "--index", str(i), "--quiet"]  # fmt: skip
            bed.popen(host, command, env=env, stdout=subprocess.DEVNULL)
        with bed.entered("rank"):  # threads started from here on (the engine's) live there too
            for rate in args.rates.split(","):
                for host in hosts:
                    bed.shape(host, rate)
                for name, (ranker_config, engine_config) in SYSTEMS.items():
                    ranker = build_ranker(
                        dataclasses.replace(cluster, ranker=ranker_config, engine=engine_config),
                        connect_timeout_s=300,
                    )
                    try:
                        first = requests[0]
                        np.testing.assert_allclose(  # the servers behind the link serve exact scores
                            ranker.score(first.dense, first.indices, first.lengths), mono(first), atol=1e-5
                        )
                        row = measure(
                            lambda r, rk=ranker: rk.score(r.dense, r.indices, r.lengths),
                            requests,
                            args.clients,
                        )
                        servers = ranker.stats()["transport"]["servers"]
                        row["bytes"] = sum(s["bytes_sent"] + s["bytes_received"] for s in servers) / samples
                    finally:
                        ranker.close()
                    results[(rate, name)] = row

    base = results[("-", "monolithic (in-process)")]["samples_per_s"]
    setup = f"batch {args.batch}, {args.batches} batches, {args.clients} clients, {args.servers} servers"
    print(f"\n{args.preset} x{args.row_scale}, {args.sharding}-wise, {setup}; {netem}")
    print("| link | system | samples/s | x monolithic | p50 ms | p99 ms | bytes/sample |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (rate, name), r in results.items():
        print(
            f"| {rate} | {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['bytes']:,.0f} |"
        )


if __name__ == "__main__":
    main()
