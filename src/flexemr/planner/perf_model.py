"""Throughput and p99 latency of a deployment, from the calibrated cost model and queueing theory.

A query of S samples (one ranker batch) takes this path; its p99 is bounded by the sum of the
stages' p99s (a conservative sum; the stages are not independent enough to convolve):

    client --hop--> ranker --hop--> embedding servers (fan-out to m) --> ranker dense --> client
                    |               each server: M/G/c, c = usable vCPUs, one core per subrequest
                    |               the slowest of m: each at the 0.99^(1/m) quantile, + transfer
                    +--------------------------------------------> M/G/c over cores (or GPUs)

M/G/c waits use Erlang C with the Allen-Cunneen correction: P(W > t) = C(c, a) exp(-(c mu - lam) t
2 / (1 + cs^2)); the service quantile is mean (1 + z_p cs). cs^2 (the service-time variability)
comes from the spread of samples per query. Capacity is the load at which a resource (cores,
GPUs, NICs) reaches utilisation 1.

Every process also spends CPU around the kernels (`ServingCost`): the ranker per request, per
server reached, per bag and per index; a server per subrequest and per index. On a CPU ranker that
shares its cores with the dense model; on a GPU ranker it runs on the vCPUs. A server that keeps
its rows on SSD (`Deployment.storage` "mmap") also waits, on the core, for one SSD read per lookup
that misses its page cache (`flexemr.planner.page_cache`).

How processes share nodes is the deployment's `hosting`; one pipeline serves every kind: the
query's work (`QueryWork`), each server's share of it (`ServerDemand`), the server tier
(`server_stage`), the ranker tier (`ranker_stage`), then the path (`predict`).

    dedicated   each ranker and each embedding server on a node of its own (disaggregated; the
                search's plans): tiers are M/G/c queues over their nodes' vCPUs, NICs between
    colocated   every node ranks and serves (monolithic scale-out; scale-up without a placement):
                each node's vCPUs split between lookups and the dense model by their work
    one-host    every process, the load generator included, on one node's cores (the validation
                benchmark's runs on one machine; no failures, no monolithic modes)

One-host capacity is the least of: the cores over the whole CPU demand of a query, busy
`ServingCost.ranker_cores` of the time when saturated (hand-offs between processes leave gaps, as
on the ranker's path); each ranker process's request path, which computes one request at a time
(its turn, `flexemr.ranker.turns`; at most `ranker_cores` of a core, stretched by contention when
requests overlap; the dense model runs outside it); and the load generator and each server as one
core each. The p99 is that of the tighter queue: the whole query on the cores (M/G/c), or its
ranker's request path (M/G/1) plus the rest of the path; infinite at capacity.

Availability: the degraded case takes the `server_failures` servers whose loss loads a survivor
most (their chunks' traffic moves to the other copies) and `ranker_failures` rankers away; a plan
must meet its target in both the healthy and the degraded case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from flexemr.planner.calibration import Calibration, LookupCost, ServingCost
from flexemr.planner.catalog import NodeType
from flexemr.planner.inputs import ModelProfile, Traffic
from flexemr.planner.page_cache import hit_ratio
from flexemr.planner.placement import Placement

QUANTILE = 0.99
RESERVED_VCPUS = 1
"""vCPUs per node left to the OS and the I/O threads."""
RESERVED_MEMORY_FRACTION = 0.1
RESERVED_MEMORY_BYTES = 2 * 2**30
"""Memory per node left to the OS, the runtime and buffers: 10% plus 2 GiB."""
USABLE_SSD_FRACTION = 0.9
"""Share of a node's local SSD the row files may fill (file system, headroom)."""
INDEX_BYTES = 4
"""Bytes per index and per bag offset in requests (client -> ranker -> servers): int32, which the
client and the router send wherever the rows fit (int64 only past 2^31 rows)."""
PROCESS_CORES = 1.0
"""Cores one Python process's request path can use: its interpreter lock serialises it."""
SHARED_WAIT_SCV = 1.0
"""On shared cores, requests overlap (every process's threads share the cores), so their queue
behaves like processor sharing: waits fluctuate like M/M/c's, however regular the service times.
A ranker's request path is first come, first served (its requests take turns): plain M/G/1."""


def usable_memory(node: NodeType) -> float:
    return node.memory_bytes * (1 - RESERVED_MEMORY_FRACTION) - RESERVED_MEMORY_BYTES


def row_capacity(node: NodeType, storage: Storage) -> float:
    """Bytes of rows one embedding server on `node` may hold: its usable DRAM, or with `mmap` its
    local SSD (the DRAM then is page cache)."""
    if storage == "mmap":
        return node.ssd_gib * 2**30 * USABLE_SSD_FRACTION
    return usable_memory(node)


def usable_vcpus(node: NodeType) -> int:
    return max(1, node.vcpus - RESERVED_VCPUS)


def erlang_c(servers: int, offered: float) -> float:
    """Probability an arrival waits in M/M/c with `servers` servers and `offered` = lam / mu < c."""
    blocking = 1.0
    for i in range(1, servers + 1):
        blocking = offered * blocking / (i + offered * blocking)
    rho = offered / servers
    return blocking / (1 - rho + rho * blocking)


def mgc_quantile(
    arrival_rate: float, service_s: float, servers: int, scv: float, q: float, wait_scv: float | None = None
) -> float:
    """The q-quantile of response time (wait + service) in M/G/c; infinite when overloaded.
    `wait_scv` (default `scv`) sets how fast the wait's tail decays."""
    if service_s <= 0 or arrival_rate <= 0:
        return max(service_s, 0.0)
    offered = arrival_rate * service_s
    if offered >= servers:
        return math.inf
    wait_prob = erlang_c(servers, offered)
    decay = (servers / service_s - arrival_rate) * 2 / (1 + (scv if wait_scv is None else wait_scv))
    wait = math.log(wait_prob / (1 - q)) / decay if wait_prob > 1 - q else 0.0
    service = service_s * max(1.0, 1 + NormalDist().inv_cdf(q) * math.sqrt(scv))
    return wait + service


Hosting = Literal["dedicated", "colocated", "one-host"]
"""How the processes of a deployment share nodes (see the module docstring)."""
Storage = Literal["dram", "mmap"]
"""Where embedding servers keep their rows (`serve --storage`)."""


@dataclass(frozen=True)
class Deployment:
    """Node counts and types, the placement, how processes share nodes, and which failures to survive.

    dedicated (disaggregated): `rankers` x `ranker_type` and `placement.num_servers` x `server_type`.
    colocated, monolithic scale-out: the same nodes are rankers and servers, so `server_type` ==
    `ranker_type`, `rankers` == `placement.num_servers`, and the vCPUs are split between lookups
    and the dense model by their work. colocated without a placement, monolithic scale-up: every
    node holds every table and looks rows up locally. one-host: `rankers` ranker processes, the
    embedding servers and the load generator all on one node of `ranker_type` (== `server_type`).
    """

    ranker_type: NodeType
    rankers: int
    server_type: NodeType
    placement: Placement | None
    ranker_failures: int = 0
    server_failures: int = 0
    partial_pooling: bool = True
    hosting: Hosting = "dedicated"
    in_flight: int = 0
    """One-host: a closed loop keeping this many requests in flight (LoadGen Offline's workers);
    0: open Poisson arrivals at the traffic's rate (LoadGen Server)."""
    storage: Storage = "dram"
    """"dram": servers hold their rows in memory. "mmap": in a file on `server_type`'s local SSD
    that they memory-map (`serve --storage mmap`); the page cache keeps the hot rows, and a lookup
    that misses it waits for an SSD read (`flexemr.planner.page_cache`)."""

    def __post_init__(self) -> None:
        if self.hosting == "one-host" and (
            self.placement is None or self.ranker_failures or self.server_failures
        ):
            raise ValueError("one-host hosting needs a placement and no failures to survive")
        if self.storage == "mmap" and (
            self.hosting != "dedicated" or self.placement is None or self.server_type.ssd_gib <= 0
        ):
            raise ValueError(
                f"mmap storage needs dedicated embedding servers on a node type with local SSD "
                f"(ssd_gib > 0), got {self.hosting} hosting on {self.server_type.name}"
            )

    @property
    def servers(self) -> int:
        if self.placement is None:
            return self.rankers
        return self.placement.num_servers

    @property
    def cost_per_hour(self) -> float:
        if self.hosting != "dedicated" or self.placement is None:
            return self.rankers * self.ranker_type.price_per_hour
        return self.rankers * self.ranker_type.price_per_hour + self.servers * self.server_type.price_per_hour


@dataclass(frozen=True)
class QueryWork:
    """Per-query costs that do not depend on the deployment."""

    samples: float
    scv: float
    lookup_s_per_table: np.ndarray
    """One core's seconds per query for all of each table's bags, on the calibration's table size
    (`lookup.size_factor` scales it to a server's)."""
    lookups_per_table: np.ndarray
    """Rows each table's bags read per query."""
    zipf_skew: float
    lookup: LookupCost
    dense_cpu_s: float
    dense_flops: float
    index_bytes_per_table: np.ndarray
    raw_bytes_per_table: np.ndarray
    partial_bytes_per_table: float
    bags: float
    tables: int
    lookups: float
    request_bytes: float
    """Client -> ranker: dense features, lengths and indices."""
    serving: ServingCost
    byte_s: float
    """CPU seconds each end of a TCP connection spends per byte (the loopback stream's rate)."""

    @classmethod
    def of(cls, model: ModelProfile, traffic: Traffic, calibration: Calibration) -> QueryWork:
        spec, s = model.spec, traffic.samples_per_query
        bags = np.asarray(spec.bag_sizes, dtype=np.float64)
        per_bag = np.array(
            [calibration.lookup.seconds_per_bag(spec.dim, float(b), traffic.zipf_skew) for b in bags]
        )
        per_bag += bags * calibration.serving.server_lookup_s
        flops = s * model.dense_flops_per_sample
        lookups = s * model.lookups_per_sample
        return cls(
            samples=s,
            scv=traffic.samples_cv**2 + 0.05,
            lookup_s_per_table=s * per_bag,
            lookups_per_table=s * bags,
            zipf_skew=traffic.zipf_skew,
            lookup=calibration.lookup,
            dense_cpu_s=calibration.dense.call_s + flops / calibration.dense.flops_per_s,
            dense_flops=flops,
            index_bytes_per_table=s * (bags + 1) * INDEX_BYTES,
            raw_bytes_per_table=s * bags * spec.dim * 4,
            partial_bytes_per_table=s * spec.dim * 4,
            bags=s * spec.num_tables,
            tables=spec.num_tables,
            lookups=lookups,
            request_bytes=lookups * INDEX_BYTES + s * (spec.num_tables + spec.num_dense) * 4,
            serving=calibration.serving,
            byte_s=1 / calibration.network.stream_bytes_per_s,
        )

    def handling_s(self, subrequests: float, split: bool) -> float:
        """The ranker's CPU seconds around the dense model for one query reaching `subrequests`
        servers; `split`: the placement splits some table over servers."""
        return self.serving.ranker_s(subrequests, self.tables, split, self.bags, self.lookups)

    def dense_s(self, node: NodeType, calibration: Calibration) -> float:
        if node.accelerator is None:
            return self.dense_cpu_s
        rate = node.accelerator.fp32_tflops * 1e12 * calibration.dense.gpu_efficiency
        return calibration.dense.gpu_call_s + self.dense_flops / rate


@dataclass(frozen=True)
class StageResult:
    """One tier at one load: its p99 contribution, capacity, and what limits it."""

    p99_s: float
    max_qps: float
    bottleneck: str
    bytes_to_ranker: float = 0.0
    """Response bytes per query all servers together send back to the ranker."""
    subrequests: float = 0.0
    """Expected servers one query reaches."""
    bytes_to_servers: float = 0.0
    """Request bytes per query the ranker sends to all servers together."""
    split_tables: bool = False
    """The placement splits some table over servers (the router looks up every key's shard)."""
    cpu_s: float = 0.0
    """CPU seconds per query the tier spends, all its processes together (one-host only)."""


def _split_vcpus(dep: Deployment, work: QueryWork, calibration: Calibration) -> tuple[int, int]:
    """(vCPUs for lookups, vCPUs or GPUs for the dense model) on each node of each role."""
    if dep.hosting == "one-host":  # every server and every ranker's request path: one process
        return int(PROCESS_CORES), int(PROCESS_CORES)
    if dep.hosting == "dedicated" and dep.placement is not None:
        dense_units = (
            dep.ranker_type.accelerator.count
            if dep.ranker_type.accelerator
            else usable_vcpus(dep.ranker_type)
        )
        return usable_vcpus(dep.server_type), dense_units
    node = dep.ranker_type
    if node.accelerator is not None:
        return usable_vcpus(node), node.accelerator.count
    cores = usable_vcpus(node)
    if cores < 2:
        return 1, 1
    lookups = float(work.lookup_s_per_table.sum())
    split = dep.placement is not None and dep.placement.splits_tables
    share = lookups / (lookups + work.dense_s(node, calibration) + work.handling_s(dep.servers, split))
    lookup_cores = min(cores - 1, max(1, round(cores * share)))
    return lookup_cores, cores - lookup_cores


@dataclass(frozen=True)
class ServerDemand:
    """What one query asks of each embedding server ([servers] arrays)."""

    service_s: np.ndarray
    """One core's seconds: the pooling kernel plus, where reached, one subrequest's handling."""
    reached: np.ndarray
    """Probability the query reaches the server at all (one subrequest if it does)."""
    in_bytes: np.ndarray
    out_bytes: np.ndarray
    touched: np.ndarray
    """Servers holding any of the traffic."""

    @classmethod
    def of(cls, dep: Deployment, work: QueryWork, model: ModelProfile, failures: int) -> ServerDemand:
        assert dep.placement is not None
        shares, touches = dep.placement.worst_load(model, failures)
        # A query of S samples misses a server only if none of its S bags per table lands there.
        missed = np.prod((1 - np.minimum(touches, 1)) ** work.samples, axis=1)
        reached = 1 - missed
        if dep.partial_pooling:
            out_bytes = touches.sum(axis=1) * work.partial_bytes_per_table
        else:
            out_bytes = shares @ work.raw_bytes_per_table
        in_bytes = shares @ work.index_bytes_per_table
        sizes = np.array([work.lookup.size_factor(b) for b in dep.placement.server_bytes(model)])
        kernels = (shares * work.lookup_s_per_table).sum(axis=1) * sizes
        ssd_reads = np.zeros(len(sizes))  # lookups that miss an mmap server's page cache
        if dep.storage == "mmap":
            row_bytes = np.asarray(model.table_row_bytes, dtype=np.float64)
            cache = usable_memory(dep.server_type)
            hits = hit_ratio(dep.placement.rows_held, row_bytes, cache, work.zipf_skew)
            ssd_reads = (shares * (1 - hits)) @ work.lookups_per_table
        return cls(
            service_s=kernels
            + ssd_reads * work.lookup.ssd_read_s
            + reached * work.serving.server_subrequest_s
            + (in_bytes + out_bytes) * work.byte_s,
            reached=reached,
            in_bytes=in_bytes,
            out_bytes=out_bytes,
            touched=np.asarray((touches > 0).any(axis=1)),
        )


def server_stage(
    dep: Deployment, work: QueryWork, model: ModelProfile, qps: float, degraded: bool, cores: int
) -> StageResult:
    """The embedding-server tier (local lookups, for scale-up)."""
    node = dep.server_type
    if dep.placement is None:  # scale-up: the whole query's lookups on one node, no network
        alive = dep.rankers - (max(dep.server_failures, dep.ranker_failures) if degraded else 0)
        service = float(work.lookup_s_per_table.sum()) * work.lookup.size_factor(model.embedding_bytes)
        p99 = mgc_quantile(qps / alive, service, cores, work.scv, QUANTILE)
        return StageResult(p99, alive * cores / service, "lookup vCPUs")  # fmt: skip
    demand = ServerDemand.of(dep, work, model, dep.server_failures if degraded else 0)
    load, out_bytes, in_bytes = demand.service_s, demand.out_bytes, demand.in_bytes
    if dep.hosting == "one-host":  # each server one process; the host's cores queue (`_one_host_path`)
        slowest = float(load.max())
        return StageResult(
            slowest,
            cores / max(slowest, 1e-30),
            "embedding-server processes",
            bytes_to_ranker=float(out_bytes.sum()),
            subrequests=float(demand.reached.sum()),
            bytes_to_servers=float(in_bytes.sum()),
            split_tables=dep.placement.splits_tables,
            cpu_s=float(load.sum()),
        )
    fanout = max(1, int(demand.touched.sum()))
    q = QUANTILE ** (1 / fanout)
    nic = node.network_bytes_per_s
    capacities = {
        "embedding-server vCPUs": float(np.min(np.where(load > 0, cores / np.maximum(load, 1e-30), np.inf))),
        "embedding-server NIC": float(np.min(nic / np.maximum(np.maximum(out_bytes, in_bytes), 1e-30))),
    }
    worst = 0.0
    for s in np.flatnonzero(demand.touched):
        wait = mgc_quantile(qps, float(load[s]), cores, work.scv, q)
        nic_util = qps * max(out_bytes[s], in_bytes[s]) / nic
        transfer = math.inf if nic_util >= 1 else (out_bytes[s] + in_bytes[s]) / nic / (1 - nic_util)
        worst = max(worst, wait + transfer)
    bottleneck = min(capacities, key=lambda k: capacities[k])
    return StageResult(
        float(worst),
        capacities[bottleneck],
        bottleneck,
        bytes_to_ranker=float(out_bytes.sum()),
        subrequests=float(demand.reached.sum()),
        bytes_to_servers=float(in_bytes.sum()),
        split_tables=dep.placement.splits_tables,
    )


def ranker_cpu_s(dep: Deployment, work: QueryWork, calibration: Calibration, servers: StageResult) -> float:
    """The ranker's CPU seconds per query besides the dense model: request handling, the bytes
    through its sockets, and pooling raw rows when the servers do not."""
    wire = work.request_bytes + servers.bytes_to_servers + servers.bytes_to_ranker
    handling = work.handling_s(servers.subrequests, servers.split_tables) + wire * work.byte_s
    if not dep.partial_pooling and dep.placement is not None:
        handling += servers.bytes_to_ranker / 4 * calibration.lookup.element_s
    return handling


def _contended_load(rate: float, handling: float, kappa: float) -> float:
    """The utilisation rho of a ranker's request path solving rho = rate handling (1 + kappa rho);
    1 where there is no solution below 1 (overloaded)."""
    base = rate * handling
    slope = base * kappa
    return base / (1 - slope) if base + slope < 1 else 1.0


def _client_s(work: QueryWork) -> float:
    """The load generator's CPU seconds per query (counted where it shares the cores)."""
    return work.serving.client_s(work.lookups) + work.request_bytes * work.byte_s


def _one_host_scv(work: QueryWork, calibration: Calibration, total: float) -> float:
    """Fixed per-request costs dominate small queries, so the service time varies less than the
    query size: the CV scaled by the share of the work that grows with the samples."""
    serving = work.serving
    fixed = serving.client_request_s + serving.ranker_request_s + calibration.dense.call_s
    return (work.scv - 0.05) * (1 - min(fixed / total, 1)) ** 2 + 0.05


def _ranker_processes(
    dep: Deployment, work: QueryWork, qps: float, calibration: Calibration, servers: StageResult
) -> StageResult:
    """One host's ranker processes. A ranker's requests take turns on its request path
    (`ranker_cores` of a core at most) and contention stretches it; the dense model (a few long
    torch calls) runs outside the turns. p99: the path's M/G/1 queue, then the dense model."""
    handling, dense = ranker_cpu_s(dep, work, calibration, servers), work.dense_cpu_s
    serving = work.serving
    cores = serving.ranker_cores
    if dep.in_flight:  # each ranker holds its share of the loop's requests
        handling *= serving.contention(dep.in_flight / dep.rankers)
        capacity = dep.rankers * cores / handling
    else:  # open arrivals: n in a busy ranker is 1 / (1 - rho), so handling grows by kappa x rho
        kappa, alone = serving.ranker_contention, handling
        handling = alone * (1 + kappa * _contended_load(qps / dep.rankers / cores, alone, kappa))
        capacity = dep.rankers * cores / (alone * (1 + kappa))
    scv = _one_host_scv(work, calibration, _client_s(work) + (handling + dense) + servers.cpu_s)
    path = mgc_quantile(qps / dep.rankers / cores, handling, 1, scv, QUANTILE)
    return StageResult(path + dense, capacity, "ranker processes", cpu_s=handling + dense)


def ranker_stage(
    dep: Deployment,
    work: QueryWork,
    qps: float,
    degraded: bool,
    units: int,
    calibration: Calibration,
    servers: StageResult,
) -> StageResult:
    """The ranker tier: request handling, the dense model (on the same cores, or on GPUs), the NIC."""
    if dep.hosting == "one-host":
        return _ranker_processes(dep, work, qps, calibration, servers)
    node = dep.ranker_type
    alive = dep.rankers - (dep.ranker_failures if degraded else 0)
    if dep.hosting == "colocated" or dep.placement is None:
        alive = dep.rankers - (max(dep.ranker_failures, dep.server_failures) if degraded else 0)
    cpu = ranker_cpu_s(dep, work, calibration, servers)
    dense = work.dense_s(node, calibration)
    rate = qps / alive
    if node.accelerator is None:
        cpu += dense
        p99 = mgc_quantile(rate, cpu, units, work.scv, QUANTILE)
        capacities = {"ranker vCPUs": alive * units / cpu}
    else:
        vcpus = usable_vcpus(node)
        p99 = mgc_quantile(rate, cpu, vcpus, work.scv, QUANTILE)
        p99 += mgc_quantile(rate, dense, units, work.scv, QUANTILE)
        capacities = {"ranker vCPUs": alive * vcpus / cpu, "ranker GPUs": alive * units / dense}
    bytes_in = servers.bytes_to_ranker
    if bytes_in > 0:
        nic = node.network_bytes_per_s
        capacities["ranker NIC"] = alive * nic / bytes_in
        util = rate * bytes_in / nic
        p99 += math.inf if util >= 1 else bytes_in / nic / (1 - util)
    bottleneck = min(capacities, key=lambda k: capacities[k])
    return StageResult(p99, capacities[bottleneck], bottleneck)


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for a deployment at a load."""

    qps: float
    p99_ms: float
    """Healthy cluster, at `qps`."""
    p99_ms_degraded: float
    """With the failures to survive, at `qps`."""
    max_qps: float
    """Throughput: the load at which the first resource saturates, healthy cluster."""
    max_qps_degraded: float
    bottleneck: str
    memory_ok: bool
    breakdown_ms: dict[str, float] = field(default_factory=dict)

    def meets(self, qps: float, p99_ms: float) -> bool:
        return (
            self.memory_ok
            and self.max_qps_degraded >= qps
            and self.p99_ms <= p99_ms
            and self.p99_ms_degraded <= p99_ms
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "qps": self.qps,
            "p99_ms": self.p99_ms,
            "p99_ms_degraded": self.p99_ms_degraded,
            "max_qps": self.max_qps,
            "max_qps_degraded": self.max_qps_degraded,
            "bottleneck": self.bottleneck,
            "memory_ok": self.memory_ok,
            "breakdown_ms": self.breakdown_ms,
        }


def memory_fits(dep: Deployment, model: ModelProfile) -> bool:
    dense = 4 * model.dense_param_bytes  # weights plus activations and buffers, generously
    if dep.placement is None:
        return model.embedding_bytes + dense <= usable_memory(dep.ranker_type)
    if dep.hosting == "one-host":
        held = float(dep.placement.server_bytes(model).sum())
        return held + dep.rankers * dense <= usable_memory(dep.server_type)
    held = float(dep.placement.server_bytes(model).max())
    if dep.hosting == "colocated":
        return held + dense <= usable_memory(dep.server_type)
    page_cache = dep.storage == "dram" or usable_memory(dep.server_type) > 0
    return (
        page_cache
        and held <= row_capacity(dep.server_type, dep.storage)
        and dense <= usable_memory(dep.ranker_type)
    )


def hop_s(calibration: Calibration) -> float:
    return calibration.network.rtt_s + calibration.network.wire_rtt_s


@dataclass(frozen=True)
class _Path:
    """One query's path through both tiers at one load: its p99 and what bounds its throughput."""

    p99_s: float
    capacities: dict[str, float]
    breakdown_ms: dict[str, float]

    @property
    def bottleneck(self) -> str:
        return min(self.capacities, key=lambda k: self.capacities[k])

    @property
    def max_qps(self) -> float:
        return self.capacities[self.bottleneck]


def _path(
    dep: Deployment, work: QueryWork, calibration: Calibration, qps: float, es: StageResult, rk: StageResult
) -> _Path:
    """The tiers in series: hops, the slowest server reached, the ranker."""
    if dep.hosting == "one-host":
        return _one_host_path(dep, work, calibration, qps, es, rk)
    hops = hop_s(calibration) * (1 if dep.placement is None else 2)
    return _Path(
        float(hops + es.p99_s + rk.p99_s),
        {es.bottleneck: es.max_qps, rk.bottleneck: rk.max_qps},
        {"network hops": 1e3 * hops, "lookups": 1e3 * float(es.p99_s), "ranker": 1e3 * float(rk.p99_s)},
    )


def _one_host_path(
    dep: Deployment, work: QueryWork, calibration: Calibration, qps: float, es: StageResult, rk: StageResult
) -> _Path:
    """Every process on one host's cores (see the module docstring)."""
    client = _client_s(work)
    total = client + rk.cpu_s + es.cpu_s
    cores = dep.ranker_type.vcpus
    wire = work.request_bytes + es.bytes_to_servers + es.bytes_to_ranker
    capacities = {
        # A saturated resource of this closed loop stays busy only part of the time: requests
        # handed between threads and processes leave gaps. The calibration measures that share
        # on the ranker's request path (`ranker_cores`); the cores fare the same.
        "shared cores": cores * work.serving.ranker_cores / total,
        rk.bottleneck: rk.max_qps,
        "load generator": PROCESS_CORES / client,
        es.bottleneck: es.max_qps,
        "loopback": dep.server_type.network_bytes_per_s / wire,
    }
    # Whichever queue is tighter: the whole query on the shared cores, or its ranker process
    # (requests take turns on its request path) with the rest of the path unqueued.
    scv = _one_host_scv(work, calibration, total)
    on_cores = mgc_quantile(qps, total, cores, scv, QUANTILE, SHARED_WAIT_SCV)
    in_ranker = rk.p99_s + (client + es.p99_s)
    hops = 2 * calibration.network.rtt_s
    p99 = hops + max(on_cores, in_ranker) if qps < min(capacities.values()) else math.inf
    breakdown = {
        "network hops": 1e3 * hops,
        "client": 1e3 * client,
        "ranker": 1e3 * rk.cpu_s,
        "lookups": 1e3 * es.cpu_s,
        "p99 over the mean demand": 1e3 * (p99 - hops - total),
    }
    return _Path(p99, capacities, breakdown)


def predict(
    dep: Deployment, model: ModelProfile, traffic: Traffic, calibration: Calibration, qps: float | None = None
) -> Prediction:
    """Predicted throughput and p99 of `dep` serving `traffic` (at `qps`, default its peak): the
    performance model the search, `flexemr plan` and the validation benchmark all use."""
    qps = traffic.peak_qps if qps is None else qps
    work = QueryWork.of(model, traffic, calibration)
    lookup_units, dense_units = _split_vcpus(dep, work, calibration)
    paths = []
    for degraded in (False, True):
        es = server_stage(dep, work, model, qps, degraded, lookup_units)
        rk = ranker_stage(dep, work, qps, degraded, dense_units, calibration, es)
        paths.append(_path(dep, work, calibration, qps, es, rk))
    healthy, worst = paths
    return Prediction(
        qps=qps,
        p99_ms=1e3 * healthy.p99_s,
        p99_ms_degraded=1e3 * worst.p99_s,
        max_qps=healthy.max_qps,
        max_qps_degraded=worst.max_qps,
        bottleneck=healthy.bottleneck,
        memory_ok=memory_fits(dep, model),
        breakdown_ms=healthy.breakdown_ms,
    )
