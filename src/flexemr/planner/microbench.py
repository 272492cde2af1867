"""Microbenchmarks behind `flexemr calibrate`: this system's kernels and sockets on this machine.

Three measurements, each fitted to the linear cost model of `flexemr.planner.calibration`:

* lookups: `embedding_bag` (offsets form, sum) on one thread over a table bigger than the caches,
  for a grid of dims x pooling factors x Zipf skews -> `LookupCost` (non-negative least squares);
* dense: `DenseArch` forward on one thread for several batch sizes and two model shapes ->
  `DenseCost` (seconds per call = call_s + B * flops / flops_per_s);
* network: ping-pong of small messages and one bulk stream over loopback TCP -> `NetworkCost`.
"""

from __future__ import annotations

import datetime
import platform
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from flexemr.model.dlrm import DenseArch
from flexemr.model.spec import ModelSpec
from flexemr.planner.calibration import Calibration, DenseCost, LookupCost, NetworkCost
from flexemr.planner.inputs import ModelProfile


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure. `quick()` keeps a whole calibration under ~10 s."""

    table_mib: int = 128
    """Size of the table the lookups read (bigger than the last-level cache)."""
    dims: tuple[int, ...] = (16, 64, 128)
    pooling_factors: tuple[int, ...] = (1, 8, 32, 96)
    skews: tuple[float, ...] = (0.0, 1.05)
    lookups_per_run: int = 200_000
    """Rows read per timed embedding_bag call."""
    batches: tuple[int, ...] = (1, 8, 32, 128, 512)
    repeats: int = 5
    """Timed repetitions per point (the fastest counts: it is the least disturbed)."""
    pings: int = 2000
    stream_mib: int = 64

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            table_mib=32,
            dims=(16, 128),
            pooling_factors=(1, 32),
            lookups_per_run=50_000,
            batches=(1, 32, 256),
            repeats=3,
            pings=300,
            stream_mib=16,
        )


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def zipf_indices(rng: np.random.Generator, rows: int, count: int, skew: float) -> np.ndarray:
    """`count` row ids with Zipf(`skew`) popularity over `rows` rows, hot rows scattered (hashed ids)."""
    if skew == 0:
        return rng.integers(0, rows, count, dtype=np.int64)
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -skew
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(count) * cdf[-1])
    ids: np.ndarray = rng.permutation(rows)[np.minimum(ranks, rows - 1)].astype(np.int64)
    return ids


def _pool(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding_bag(indices, weight, offsets, mode="sum")


def measure_lookups(settings: BenchSettings) -> tuple[LookupCost, list[dict[str, float]]]:
    rng = np.random.default_rng(0)
    storage = torch.rand(settings.table_mib * 2**20 // 4)
    points: list[dict[str, float]] = []
    for dim in settings.dims:
        rows = storage.numel() // dim
        weight = storage[: rows * dim].view(rows, dim)
        for skew in settings.skews:
            pool = torch.from_numpy(zipf_indices(rng, rows, settings.lookups_per_run, skew))
            for pooling in settings.pooling_factors:
                bags = settings.lookups_per_run // pooling
                indices = pool[: bags * pooling]
                offsets = torch.arange(0, bags * pooling, pooling, dtype=torch.int64)
                seconds = _best_time(partial(_pool, weight, indices, offsets), settings.repeats)
                points.append(
                    {"dim": dim, "pooling": pooling, "skew": skew, "seconds_per_bag": seconds / bags}
                )
    uniform = [p for p in points if p["skew"] == 0]
    # Relative errors: divide each row by its measurement so cheap and costly points weigh alike.
    measured = np.array([p["seconds_per_bag"] for p in uniform])
    design = np.array([[1.0, p["pooling"], p["pooling"] * p["dim"]] for p in uniform])
    (bag_s, row_s, element_s), _ = nnls(design / measured[:, None], np.ones(len(uniform)))
    fit = LookupCost(bag_s=float(bag_s), row_s=float(row_s), element_s=float(element_s), skew_gain=0.0)
    gains = [
        (fit.seconds_per_bag(int(p["dim"]), p["pooling"], 0.0) / p["seconds_per_bag"] - 1.0)
        / min(p["skew"], 1.5)
        for p in points
        if p["skew"] > 0
    ]
    skew_gain = min(2.0, max(0.0, float(np.median(gains)))) if gains else 0.0
    return LookupCost(float(bag_s), float(row_s), float(element_s), skew_gain), points


_DENSE_SHAPES = (
    ModelSpec((1000,) * 8, 32, (128, 64, 32), (256, 64, 1), interaction="cat"),
    ModelSpec((1000,) * 26, 64, (13, 512, 256, 64), (512, 512, 256, 1), interaction="dot"),
)


def measure_dense(settings: BenchSettings) -> tuple[DenseCost, list[dict[str, float]]]:
    torch.manual_seed(0)
    points: list[dict[str, float]] = []
    for spec in _DENSE_SHAPES:
        model = DenseArch(spec).eval()
        flops = ModelProfile(spec).dense_flops_per_sample
        for batch in settings.batches:
            dense = torch.rand(batch, spec.num_dense)
            pooled = torch.rand(batch, spec.num_tables, spec.dim)
            with torch.inference_mode():
                seconds = _best_time(partial(model, dense, pooled), settings.repeats)
            points.append({"batch": batch, "flops_per_sample": flops, "seconds_per_call": seconds})
    design = np.array([[1.0, p["batch"] * p["flops_per_sample"]] for p in points])
    # Weight by 1/time so small calls (the fixed cost) count as much as big ones (the FLOP rate).
    times = np.array([p["seconds_per_call"] for p in points])
    (call_s, seconds_per_flop), _ = nnls(design / times[:, None], np.ones(len(points)))
    flops_per_s = 1.0 / seconds_per_flop if seconds_per_flop > 0 else DenseCost.flops_per_s
    return DenseCost(call_s=float(call_s), flops_per_s=float(flops_per_s)), points


def _recv_exactly(sock: socket.socket, buffer: memoryview) -> None:
    got = 0
    while got < len(buffer):
        n = sock.recv_into(buffer[got:])
        if n == 0:
            raise ConnectionError("peer closed during the network benchmark")
        got += n


def _echo_server(listener: socket.socket, pings: int, stream_bytes: int) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = memoryview(bytearray(64))
        for _ in range(pings):
            _recv_exactly(conn, message)
            conn.sendall(message)
        sink = memoryview(bytearray(stream_bytes))
        _recv_exactly(conn, sink)
        conn.sendall(b"k")


def measure_network(settings: BenchSettings) -> tuple[NetworkCost, dict[str, float]]:
    stream_bytes = settings.stream_mib * 2**20
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(
            target=_echo_server, args=(listener, settings.pings, stream_bytes), daemon=True
        )
        server.start()
        with socket.create_connection(listener.getsockname()) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = memoryview(bytearray(64))
            rtts = []
            for _ in range(settings.pings):
                start = time.perf_counter()
                sock.sendall(message)
                _recv_exactly(sock, message)
                rtts.append(time.perf_counter() - start)
            payload = bytes(stream_bytes)
            start = time.perf_counter()
            sock.sendall(payload)
            _recv_exactly(sock, memoryview(bytearray(1)))
            stream_s = time.perf_counter() - start
        server.join(30)
    rtt = float(np.median(rtts))
    raw = {"rtt_median_s": rtt, "rtt_p99_s": float(np.quantile(rtts, 0.99)), "stream_s": stream_s}
    return NetworkCost(rtt_s=rtt, stream_bytes_per_s=stream_bytes / stream_s), raw


def run_calibration(settings: BenchSettings, log: Callable[[str], None] = print) -> Calibration:
    """Run every microbenchmark on one thread and return the fitted calibration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log("lookups: embedding_bag rows/s per core vs dim, pooling factor, skew ...")
        lookup, lookup_points = measure_lookups(settings)
        log("dense: DenseArch throughput vs batch size ...")
        dense, dense_points = measure_dense(settings)
        log("network: loopback TCP round trip and bandwidth ...")
        network, network_raw = measure_network(settings)
    finally:
        torch.set_num_threads(threads)
    measurements: dict[str, Any] = {
        "lookups": lookup_points,
        "dense": dense_points,
        "network": network_raw,
        "settings": {k: v for k, v in vars(settings).items()},
    }
    return Calibration(
        lookup=lookup,
        dense=dense,
        network=network,
        calibrated=True,
        host=f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        measurements=measurements,
    )
