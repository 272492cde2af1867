"""Microbenchmarks behind `flexemr calibrate`: this system's kernels and sockets on this machine.

Four measurements, each fitted to the linear cost model of `flexemr.planner.calibration`:

* lookups: `embedding_bag` (offsets form, sum) on one thread, in subrequest-sized calls on fresh
  rows, for a grid of dims x pooling factors x Zipf skews, on a table bigger than the caches and on
  one that fits in them -> `LookupCost` (non-negative least squares; cost ~ size^e between);
* dense: `DenseArch` forward on one thread for several batch sizes and two model shapes ->
  `DenseCost` (seconds per call = call_s + B * flops / flops_per_s);
* network: ping-pong of small messages and one bulk stream over loopback TCP -> `NetworkCost`;
* serving: a local cluster (2 embedding servers, 1 ranker process, this process as the client;
  a table-wise and a row-wise plan) answers distinct requests of several shapes (samples, pooling,
  servers and tables reached) one at a time; the CPU time each process spends per request, less
  the kernels above, is fitted per role -> `ServingCost`.
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

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.deployment import LocalDeployment, RoundRobinBackend, cpu_seconds
from flexemr.model.dlrm import DenseArch
from flexemr.model.source import model_spec
from flexemr.model.spec import ModelSpec
from flexemr.planner.calibration import Calibration, DenseCost, LookupCost, NetworkCost, ServingCost
from flexemr.planner.inputs import ModelProfile
from flexemr.planner.perf_model import INDEX_BYTES
from flexemr.planner.placement import Strategy, place
from flexemr.sharding.router import RangeRouter


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure: about 90 s in all; `quick()` about 20 s."""

    table_mib: int = 512
    """Size of the table the lookups read (bigger than the caches: rows come from DRAM)."""
    small_table_mib: int = 4
    """A table mostly in the caches: the grid runs on it too, for how cost grows with size."""
    dims: tuple[int, ...] = (16, 64, 128)
    pooling_factors: tuple[int, ...] = (1, 8, 32, 96)
    skews: tuple[float, ...] = (0.0, 1.05)
    lookups_per_run: int = 200_000
    """Rows read per point, over calls of `lookups_per_call`, each on fresh indices."""
    lookups_per_call: int = 8192
    """Rows per `embedding_bag` call: about one subrequest's. Timing one big call again and again
    would find its rows in the caches and the call's fixed cost spread thin."""
    batches: tuple[int, ...] = (1, 8, 32, 128, 512)
    repeats: int = 5
    """Timed repetitions per dense point (the fastest counts: it is the least disturbed)."""
    pings: int = 2000
    stream_mib: int = 64
    serving_points: tuple[tuple[int, int, int, int], ...] = (
        (1, 1, 1, 8), (1, 1, 2, 8), (1, 1, 2, 2), (256, 1, 1, 8), (256, 1, 2, 8),
        (32, 32, 1, 8), (32, 32, 2, 8), (64, 128, 2, 8), (256, 8, 2, 8),
    )  # fmt: skip
    """(samples, indices per bag, servers reached, tables with indices) of the requests the serving
    fit uses on a row-wise plan (the model has 8 tables: 2 to 65,536 indices per request)."""
    table_serving_points: tuple[tuple[int, int, int, int], ...] = (
        (1, 1, 1, 4), (1, 1, 2, 8), (1, 1, 1, 1), (32, 32, 2, 8), (64, 8, 2, 2), (256, 1, 1, 4),
    )  # fmt: skip
    """The same on a table-wise plan (4 tables per server), where the router sends tables whole."""
    serving_s: float = 1.5
    """Seconds of requests per serving point (CPU time is read in 10 ms ticks)."""
    serving_repeats: int = 3
    """Measurements per serving point; the least CPU per role counts (the least disturbed)."""
    serving_requests: int = 8
    """Distinct requests of each point's shape, sent in turn (one request over and over would
    find its rows and buffers in the caches)."""
    contention_point: tuple[int, int, int, int] = (64, 8, 2, 8)
    """The request measured again with several in flight, for the ranker's contention."""
    contention_in_flight: int = 4

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            table_mib=128,
            dims=(16, 128),
            pooling_factors=(1, 32),
            lookups_per_run=50_000,
            batches=(1, 32, 256),
            repeats=3,
            pings=300,
            stream_mib=16,
            serving_points=((1, 1, 1, 8), (1, 1, 2, 8), (256, 1, 2, 8), (32, 32, 1, 8), (64, 128, 2, 8)),
            table_serving_points=((1, 1, 1, 4), (1, 1, 2, 8), (32, 32, 2, 8), (64, 8, 1, 1)),
            serving_s=0.6,
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


def _lookup_grid(settings: BenchSettings, table_mib: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """Seconds per bag over the grid of dims x skews x pooling factors on a table of `table_mib`."""
    storage = torch.rand(table_mib * 2**20 // 4)
    points: list[dict[str, float]] = []
    for dim in settings.dims:
        rows = storage.numel() // dim
        weight = storage[: rows * dim].view(rows, dim)
        for skew in settings.skews:
            for pooling in settings.pooling_factors:
                bags = max(1, settings.lookups_per_call // pooling)
                calls = max(1, settings.lookups_per_run // (bags * pooling))
                pool = torch.from_numpy(zipf_indices(rng, rows, (calls + 1) * bags * pooling, skew))
                offsets = torch.arange(0, bags * pooling, pooling, dtype=torch.int64)
                runs = [partial(_pool, weight, chunk, offsets) for chunk in torch.split(pool, bags * pooling)]
                runs[-1]()  # warm up (the hot rows of a skewed draw stay warm, as on a server)
                start = time.perf_counter()
                for run in runs[:-1]:
                    run()
                seconds = (time.perf_counter() - start) / (calls * bags)
                points.append(
                    {
                        "table_mib": table_mib,
                        "dim": dim,
                        "pooling": pooling,
                        "skew": skew,
                        "seconds_per_bag": seconds,
                    }
                )
    return points


def measure_lookups(settings: BenchSettings) -> tuple[LookupCost, list[dict[str, float]]]:
    rng = np.random.default_rng(0)
    points = _lookup_grid(settings, settings.table_mib, rng)
    small = _lookup_grid(settings, settings.small_table_mib, rng)
    return fit_lookups(points, small), points + small


def fit_lookups(points: list[dict[str, float]], small: list[dict[str, float]]) -> LookupCost:
    """The lookup cost model fitted to the grid on the big table (`points`) and the same grid, point
    for point, on the small one (`small`)."""
    table_mib, small_table_mib = points[0]["table_mib"], small[0]["table_mib"]
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
    # The same grid on both tables, point for point: cost ~ size^exponent between them.
    ratios = [
        big["seconds_per_bag"] / little["seconds_per_bag"] for big, little in zip(points, small, strict=True)
    ]
    exponent = float(np.median(np.log(ratios))) / np.log(table_mib / small_table_mib)
    return LookupCost(
        float(bag_s), float(row_s), float(element_s), skew_gain,
        table_bytes=int(table_mib * 2**20),
        small_table_bytes=int(small_table_mib * 2**20),
        size_exponent=max(0.0, exponent),
    )  # fmt: skip


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


_SERVING_MODEL = ModelSource(preset="rmc1", row_scale=0.005)
"""8 tables of 20,000 rows x 32: a cluster that starts in seconds."""


def _serving_request(
    rng: np.random.Generator,
    plan: ShardingPlan,
    num_dense: int,
    batch: int,
    pooling: int,
    reach: int,
    tables: int,
) -> SparseBatch:
    """`batch` samples whose bags of `pooling` uniform rows fall on servers 0..reach-1 only, in the
    first `tables` tables with rows there (the others' bags are empty)."""
    held = sorted({s.table for s in plan.shards if s.server < reach})[:tables]
    if len(held) < tables:
        raise ValueError(f"servers 0..{reach - 1} hold {len(held)} tables, fewer than {tables}")
    indices = []
    for table in held:
        ranges = [(s.row_start, s.row_end) for s in plan.shards if s.table == table and s.server < reach]
        sizes = np.array([end - start for start, end in ranges])
        offset = rng.integers(0, sizes.sum(), batch * pooling)
        which = np.searchsorted(np.cumsum(sizes), offset, side="right")
        starts = np.array([start for start, _ in ranges])
        indices.append(starts[which] + offset - (np.cumsum(sizes) - sizes)[which])
    lengths = np.zeros((len(plan.table_rows), batch), dtype=np.int32)
    lengths[held] = pooling
    dense = rng.standard_normal((batch, num_dense), dtype=np.float32)
    return SparseBatch(dense, np.concatenate(indices).astype(np.int64), lengths.reshape(-1))


def _fit(design: list[list[float]], target: list[float], measured: list[float]) -> np.ndarray:
    """Non-negative least squares in relative terms (each row divided by its measurement)."""
    scale = np.maximum(np.asarray(measured), 1e-9)[:, None]
    coef: np.ndarray = nnls(np.asarray(design) / scale, np.asarray(target) / scale[:, 0])[0]
    return coef


def _cpu_per_request(
    backend: RoundRobinBackend,
    pids: dict[str, int],
    requests: list[SparseBatch],
    settings: BenchSettings,
    in_flight: int,
) -> dict[str, float]:
    """CPU seconds per request of each process (and of this one, the client), and wall seconds
    per request, while `in_flight` threads send `requests` in turn, back to back: the least of
    `serving_repeats` runs."""
    for request in requests:
        backend.infer(request)  # warm up
    runs = [
        _cpu_run(backend, pids, requests, settings.serving_s, in_flight)
        for _ in range(settings.serving_repeats)
    ]
    return {role: min(run[role] for run in runs) for role in runs[0]}


def _cpu_run(
    backend: RoundRobinBackend,
    pids: dict[str, int],
    requests: list[SparseBatch],
    seconds: float,
    in_flight: int,
) -> dict[str, float]:
    counts = [0] * in_flight
    stop = time.perf_counter() + seconds

    def send(i: int) -> None:
        while time.perf_counter() < stop:
            backend.infer(requests[(counts[i] * in_flight + i) % len(requests)])
            counts[i] += 1

    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    client_before, start = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(counts)
    cpu = {role: (cpu_seconds(pid) - before[role]) / total for role, pid in pids.items()}
    return cpu | {
        "client": (time.process_time() - client_before) / total,
        "wall": (time.perf_counter() - start) / total,
    }


def _serving_points(
    deployment: LocalDeployment,
    plan: ShardingPlan,
    shapes: tuple[tuple[int, int, int, int], ...],
    settings: BenchSettings,
    lookup: LookupCost,
    byte_s: float,
    dense_s: Callable[[int], float],
    rng: np.random.Generator,
) -> list[dict[str, float]]:
    """CPU seconds per request of each process of `deployment` for requests of each shape, and
    what the fit takes as known: the bytes through the sockets (`byte_s` each end), the lookup
    kernels and the dense model (`dense_s` of the batch size)."""
    spec = model_spec(_SERVING_MODEL)
    router = RangeRouter(plan)
    backend, pids = deployment.backend(), deployment.pids()
    points = []
    for batch, pooling, reach, tables in shapes:
        requests = [
            _serving_request(rng, plan, spec.num_dense, batch, pooling, reach, tables)
            for _ in range(settings.serving_requests)
        ]
        cpu = _cpu_per_request(backend, pids, requests, settings, 1)
        request = requests[0]  # all of one shape
        keys = router.keys(request.indices, request.rows_per_table)
        subrequests = {sub.server: sub for sub in router.route(keys, request.lengths)}
        sent = (request.indices.size * INDEX_BYTES + (request.lengths.size + request.dense.size) * 4) * byte_s
        point = {
            "batch": batch,
            "pooling": pooling,
            "servers": len(subrequests),
            "tables": tables,
            "split": float(plan.strategy == "row"),
            "bags": float(request.lengths.size),
            "lookups": float(request.indices.size),
            "client_s": cpu["client"],
            "client_wire_s": sent,
            "ranker_s": cpu["ranker-0"],
            "ranker_wire_s": sent,
            "dense_s": dense_s(batch),
        }
        for server, sub in subrequests.items():
            wire = (
                (sub.rows.size + sub.offsets.size) * INDEX_BYTES + sub.offsets.size * spec.dim * 4
            ) * byte_s
            point["ranker_wire_s"] += wire
            point[f"server{server}_s"] = cpu[f"server-{server}"]
            point[f"server{server}_lookups"] = float(sub.rows.size)
            kernel = lookup.seconds_per_bag(spec.dim, sub.rows.size / sub.offsets.size, 0.0)
            kernel *= lookup.size_factor(plan.server_bytes()[server])
            point[f"server{server}_known_s"] = wire + sub.offsets.size * kernel
        points.append(point)
    backend.close()
    return points


def measure_serving(
    settings: BenchSettings, lookup: LookupCost, dense: DenseCost, network: NetworkCost
) -> tuple[ServingCost, dict[str, Any]]:
    """Per role, the CPU time left after the kernels, the dense model and the socket bytes (each
    end of a connection at the loopback stream's rate) are taken away, fitted to the request's
    shape, on a row-wise and a table-wise cluster (the router works differently on each); plus
    the ranker's contention from one point repeated with several requests in flight."""
    spec = model_spec(_SERVING_MODEL)
    profile = ModelProfile(spec)
    flops = profile.dense_flops_per_sample

    def dense_s(batch: int) -> float:
        return dense.call_s + batch * flops / dense.flops_per_s

    rng = np.random.default_rng(0)
    byte_s = 1 / network.stream_bytes_per_s
    points: list[dict[str, float]] = []
    plans: tuple[tuple[Strategy, tuple[tuple[int, int, int, int], ...]], ...] = (
        ("table", settings.table_serving_points),
        ("row", settings.serving_points),
    )
    for strategy, shapes in plans:
        # The planner's own placement: what is calibrated is what it predicts.
        plan = place(profile, 2, 1, strategy).to_sharding_plan(profile)
        cluster = ClusterSpec(_SERVING_MODEL, plan, (Endpoint(), Endpoint()), RankerConfig(port=0))
        with LocalDeployment(cluster, rankers=1) as deployment:
            points += _serving_points(deployment, plan, shapes, settings, lookup, byte_s, dense_s, rng)
            if strategy == "row":  # the contention point, on the cluster still up
                requests = [
                    _serving_request(rng, plan, spec.num_dense, *settings.contention_point)
                    for _ in range(settings.serving_requests)
                ]
                backend, pids = deployment.backend(), deployment.pids()
                in_flight = settings.contention_in_flight
                alone = _cpu_per_request(backend, pids, requests, settings, 1)["ranker-0"]
                crowd = _cpu_per_request(backend, pids, requests, settings, in_flight)
                backend.close()
    # Contention stretches the request path, not the dense model; with this many in flight the
    # ranker is the bottleneck, so its request path's CPU per wall second is all it can use.
    contention_dense = dense_s(settings.contention_point[0])
    crowded = crowd["ranker-0"]
    ranker = _fit(
        [
            [
                1.0,
                p["servers"],
                p["tables"] * (1 - p["split"]),
                p["lookups"] * p["split"],
                p["bags"],
                p["lookups"],
            ]
            for p in points
        ],
        [p["ranker_s"] - p["dense_s"] - p["ranker_wire_s"] for p in points],
        [p["ranker_s"] for p in points],
    )
    client = _fit([[1.0, p["lookups"]] for p in points], [p["client_s"] - p["client_wire_s"] for p in points],
                  [p["client_s"] for p in points])  # fmt: skip
    servers = [(p[f"server{s}_s"], p[f"server{s}_lookups"], p[f"server{s}_known_s"])
               for p in points for s in range(2) if f"server{s}_s" in p]  # fmt: skip
    per_server = _fit(
        [[1.0, n] for _, n, _ in servers], [c - k for c, _, k in servers], [c for c, _, _ in servers]
    )
    cost = ServingCost(
        ranker_request_s=float(ranker[0]),
        ranker_subrequest_s=float(ranker[1]),
        ranker_table_s=float(ranker[2]),
        ranker_routed_key_s=float(ranker[3]),
        ranker_bag_s=float(ranker[4]),
        ranker_lookup_s=float(ranker[5]),
        ranker_contention=max(
            0.0, (crowded - alone) / max(alone - contention_dense, 1e-9) / (1 - 1 / in_flight)
        ),
        ranker_cores=min(1.0, max(crowded - contention_dense, 0.0) / crowd["wall"]),
        server_subrequest_s=float(per_server[0]),
        server_lookup_s=float(per_server[1]),
        client_request_s=float(client[0]),
        client_lookup_s=float(client[1]),
    )
    return cost, {
        "points": points,
        "contention": {
            "alone_s": alone,
            "crowded_s": crowded,
            "wall_s": crowd["wall"],
            "in_flight": in_flight,
        },
    }


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
    log("serving: CPU time per request of each process of a local cluster ...")
    serving, serving_raw = measure_serving(settings, lookup, dense, network)
    measurements: dict[str, Any] = {
        "lookups": lookup_points,
        "dense": dense_points,
        "network": network_raw,
        "serving": serving_raw,
        "settings": {k: v for k, v in vars(settings).items()},
    }
    return Calibration(
        lookup=lookup,
        dense=dense,
        network=network,
        serving=serving,
        calibrated=True,
        host=f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        measurements=measurements,
    )
