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

Availability: the degraded case takes the `server_failures` servers whose loss loads a survivor
most (their chunks' traffic moves to the other copies) and `ranker_failures` rankers away; a plan
must meet its target in both the healthy and the degraded case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from flexemr.planner.calibration import Calibration
from flexemr.planner.catalog import NodeType
from flexemr.planner.inputs import ModelProfile, Traffic
from flexemr.planner.placement import Placement

QUANTILE = 0.99
RESERVED_VCPUS = 1
"""vCPUs per node left to the OS and the I/O threads."""
RESERVED_MEMORY_FRACTION = 0.1
RESERVED_MEMORY_BYTES = 2 * 2**30
"""Memory per node left to the OS, the runtime and buffers: 10% plus 2 GiB."""
INDEX_BYTES = 8
"""Requests carry int64 indices and offsets."""


def usable_memory(node: NodeType) -> float:
    return node.memory_bytes * (1 - RESERVED_MEMORY_FRACTION) - RESERVED_MEMORY_BYTES


def usable_vcpus(node: NodeType) -> int:
    return max(1, node.vcpus - RESERVED_VCPUS)


def erlang_c(servers: int, offered: float) -> float:
    """Probability an arrival waits in M/M/c with `servers` servers and `offered` = lam / mu < c."""
    blocking = 1.0
    for i in range(1, servers + 1):
        blocking = offered * blocking / (i + offered * blocking)
    rho = offered / servers
    return blocking / (1 - rho + rho * blocking)


def mgc_quantile(arrival_rate: float, service_s: float, servers: int, scv: float, q: float) -> float:
    """The q-quantile of response time (wait + service) in M/G/c; infinite when overloaded."""
    if service_s <= 0 or arrival_rate <= 0:
        return max(service_s, 0.0)
    offered = arrival_rate * service_s
    if offered >= servers:
        return math.inf
    wait_prob = erlang_c(servers, offered)
    decay = (servers / service_s - arrival_rate) * 2 / (1 + scv)
    wait = math.log(wait_prob / (1 - q)) / decay if wait_prob > 1 - q else 0.0
    service = service_s * max(1.0, 1 + NormalDist().inv_cdf(q) * math.sqrt(scv))
    return wait + service


@dataclass(frozen=True)
class Deployment:
    """Node counts and types, the placement, and which failures to survive.

    Disaggregated: `rankers` x `ranker_type` and `placement.num_servers` x `server_type`.
    Monolithic scale-out (`colocated`): the same nodes are rankers and servers, so `server_type`
    == `ranker_type`, `rankers` == `placement.num_servers`, and the vCPUs are split between
    lookups and the dense model by their work. Monolithic scale-up: `placement` None, every node
    holds every table and looks rows up locally.
    """

    ranker_type: NodeType
    rankers: int
    server_type: NodeType
    placement: Placement | None
    ranker_failures: int = 0
    server_failures: int = 0
    partial_pooling: bool = True
    colocated: bool = False

    @property
    def servers(self) -> int:
        if self.placement is None:
            return self.rankers
        return self.placement.num_servers

    @property
    def cost_per_hour(self) -> float:
        if self.colocated or self.placement is None:
            return self.rankers * self.ranker_type.price_per_hour
        return self.rankers * self.ranker_type.price_per_hour + self.servers * self.server_type.price_per_hour


@dataclass(frozen=True)
class QueryWork:
    """Per-query costs that do not depend on the deployment."""

    samples: float
    scv: float
    lookup_s_per_table: np.ndarray
    """One core's seconds per query for all of each table's bags."""
    dense_cpu_s: float
    dense_flops: float
    index_bytes_per_table: np.ndarray
    raw_bytes_per_table: np.ndarray
    partial_bytes_per_table: float

    @classmethod
    def of(cls, model: ModelProfile, traffic: Traffic, calibration: Calibration) -> QueryWork:
        spec, s = model.spec, traffic.samples_per_query
        bags = np.asarray(spec.bag_sizes, dtype=np.float64)
        per_bag = np.array(
            [calibration.lookup.seconds_per_bag(spec.dim, float(b), traffic.zipf_skew) for b in bags]
        )
        flops = s * model.dense_flops_per_sample
        return cls(
            samples=s,
            scv=traffic.samples_cv**2 + 0.05,
            lookup_s_per_table=s * per_bag,
            dense_cpu_s=calibration.dense.call_s + flops / calibration.dense.flops_per_s,
            dense_flops=flops,
            index_bytes_per_table=s * (bags + 1) * INDEX_BYTES,
            raw_bytes_per_table=s * bags * spec.dim * 4,
            partial_bytes_per_table=s * spec.dim * 4,
        )

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


def _split_vcpus(dep: Deployment, work: QueryWork, calibration: Calibration) -> tuple[int, int]:
    """(vCPUs for lookups, vCPUs or GPUs for the dense model) on each node of each role."""
    if not dep.colocated and dep.placement is not None:
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
    share = lookups / (lookups + work.dense_s(node, calibration))
    lookup_cores = min(cores - 1, max(1, round(cores * share)))
    return lookup_cores, cores - lookup_cores


def server_stage(
    dep: Deployment, work: QueryWork, model: ModelProfile, qps: float, degraded: bool, cores: int
) -> StageResult:
    """The embedding-server tier (local lookups, for scale-up)."""
    node = dep.server_type
    if dep.placement is None:  # scale-up: the whole query's lookups on one node, no network
        alive = dep.rankers - (max(dep.server_failures, dep.ranker_failures) if degraded else 0)
        service = float(work.lookup_s_per_table.sum())
        p99 = mgc_quantile(qps / alive, service, cores, work.scv, QUANTILE)
        return StageResult(p99, alive * cores / service, "lookup vCPUs")  # fmt: skip
    failures = dep.server_failures if degraded else 0
    shares, touches = dep.placement.worst_load(model, failures)
    touched = touches > 0
    fanout = max(1, int(touched.any(axis=1).sum()))
    q = QUANTILE ** (1 / fanout)
    service = (shares * work.lookup_s_per_table).sum(axis=1)
    if dep.partial_pooling:
        out_bytes = touches.sum(axis=1) * work.partial_bytes_per_table
    else:
        out_bytes = shares @ work.raw_bytes_per_table
    in_bytes = shares @ work.index_bytes_per_table
    nic = node.network_bytes_per_s
    capacities = {
        "embedding-server vCPUs": float(
            np.min(np.where(service > 0, cores / np.maximum(service, 1e-30), np.inf))
        ),
        "embedding-server NIC": float(np.min(nic / np.maximum(np.maximum(out_bytes, in_bytes), 1e-30))),
    }
    worst = 0.0
    for s in np.flatnonzero(touched.any(axis=1)):
        wait = mgc_quantile(qps, float(service[s]), cores, work.scv, q)
        nic_util = qps * max(out_bytes[s], in_bytes[s]) / nic
        transfer = math.inf if nic_util >= 1 else (out_bytes[s] + in_bytes[s]) / nic / (1 - nic_util)
        worst = max(worst, wait + transfer)
    bottleneck = min(capacities, key=lambda k: capacities[k])
    return StageResult(float(worst), capacities[bottleneck], bottleneck, float(out_bytes.sum()))


def ranker_stage(
    dep: Deployment,
    work: QueryWork,
    qps: float,
    degraded: bool,
    units: int,
    calibration: Calibration,
    bytes_in: float,
    element_s: float,
) -> StageResult:
    """The ranker tier: pooling raw rows (when servers do not), the dense model, the NIC."""
    node = dep.ranker_type
    alive = dep.rankers - (dep.ranker_failures if degraded else 0)
    if dep.colocated or dep.placement is None:
        alive = dep.rankers - (max(dep.ranker_failures, dep.server_failures) if degraded else 0)
    service = work.dense_s(node, calibration)
    if not dep.partial_pooling and dep.placement is not None:
        service += bytes_in / 4 * element_s
    rate = qps / alive
    p99 = mgc_quantile(rate, float(service), units, work.scv, QUANTILE)
    capacities = {"ranker dense": alive * units / service}
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
    held = float(dep.placement.server_bytes(model).max())
    if dep.colocated:
        return held + dense <= usable_memory(dep.server_type)
    return held <= usable_memory(dep.server_type) and dense <= usable_memory(dep.ranker_type)


def hop_s(calibration: Calibration) -> float:
    return calibration.network.rtt_s + calibration.network.wire_rtt_s


def predict(
    dep: Deployment, model: ModelProfile, traffic: Traffic, calibration: Calibration, qps: float | None = None
) -> Prediction:
    """Predicted throughput and p99 of `dep` serving `traffic` (at `qps`, default its peak).

    This is the function a validation run compares with measurements of a real deployment.
    """
    qps = traffic.peak_qps if qps is None else qps
    work = QueryWork.of(model, traffic, calibration)
    lookup_units, dense_units = _split_vcpus(dep, work, calibration)
    hops = hop_s(calibration) * (1 if dep.placement is None else 2)
    results = {}
    for degraded in (False, True):
        es = server_stage(dep, work, model, qps, degraded, lookup_units)
        rk = ranker_stage(
            dep,
            work,
            qps,
            degraded,
            dense_units,
            calibration,
            es.bytes_to_ranker,
            calibration.lookup.element_s,
        )
        results[degraded] = (es, rk)
    (es, rk), (es_d, rk_d) = results[False], results[True]
    return Prediction(
        qps=qps,
        p99_ms=1e3 * float(hops + es.p99_s + rk.p99_s),
        p99_ms_degraded=1e3 * float(hops + es_d.p99_s + rk_d.p99_s),
        max_qps=min(es.max_qps, rk.max_qps),
        max_qps_degraded=min(es_d.max_qps, rk_d.max_qps),
        bottleneck=es.bottleneck if es.max_qps <= rk.max_qps else rk.bottleneck,
        memory_ok=memory_fits(dep, model),
        breakdown_ms={
            "network hops": 1e3 * hops,
            "lookups": 1e3 * float(es.p99_s),
            "ranker": 1e3 * float(rk.p99_s),
        },
    )
