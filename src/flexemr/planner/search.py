"""Find the cheapest deployment that meets the p99 target at peak QPS, healthy and degraded.

The fast search uses that the two tiers meet only through a sum of latencies and the bytes the
servers send back:

1. For every server type, storage (rows in DRAM; or, on types with local SSD, in a file the
   server memory-maps, the DRAM holding the hot rows: `serve --storage mmap`) and sharding
   strategy, sweep the server count upward from a lower bound (room for k+1 copies; lookup
   vCPUs for the peak load with k servers down) and keep each
   count whose tier is not saturated: (cost, p99 healthy, p99 degraded, bytes to the ranker).
   A sweep stops once more servers stop cutting the tier's p99 (by 1%, 3 counts running).
2. Visit those options cheapest first. For each, for every ranker type, from its lower bound
   (dense capacity with j rankers down) add rankers until the whole path meets the target,
   pruning any pair that cannot beat the cheapest plan found so far.

`exhaustive_search` tries every combination up to given counts with `predict`; the tests check
the fast search against it. Monolithic baselines: `scale_up` (every node holds every table) and
`scale_out` (tables sharded over identical nodes that are rankers too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flexemr.planner.calibration import Calibration
from flexemr.planner.catalog import Catalog, NodeType
from flexemr.planner.inputs import PlanRequest
from flexemr.planner.perf_model import (
    Deployment,
    Prediction,
    QueryWork,
    StageResult,
    Storage,
    hop_s,
    memory_fits,
    predict,
    ranker_cpu_s,
    ranker_stage,
    row_capacity,
    server_stage,
    usable_memory,
    usable_vcpus,
)
from flexemr.planner.placement import STRATEGIES, Placement, Strategy, place

MAX_NODES = 512
"""Most nodes of one role the search considers."""
WINDOW = 32
"""How far above its lower bound a count sweep goes."""
_STALL_STEPS = 3


class PlanningError(Exception):
    """No deployment meets the request; says why and what would help."""

    def __init__(self, reasons: list[str], fixes: list[str]) -> None:
        self.reasons = reasons
        self.fixes = fixes
        lines = ["no plan meets the request:", *(f"  - {r}" for r in reasons), "what would fix it:"]
        super().__init__("\n".join([*lines, *(f"  - {f}" for f in fixes)]))


@dataclass(frozen=True)
class Candidate:
    deployment: Deployment
    prediction: Prediction

    @property
    def cost_per_hour(self) -> float:
        return self.deployment.cost_per_hour


@dataclass(frozen=True)
class _ServerOption:
    node: NodeType
    storage: Storage
    placement: Placement
    cost: float
    healthy: StageResult
    degraded: StageResult


def _probe(
    request: PlanRequest,
    ranker: NodeType,
    server: NodeType,
    placement: Placement | None,
    storage: Storage = "dram",
) -> Deployment:
    availability = request.availability
    return Deployment(
        ranker_type=ranker,
        rankers=1,
        server_type=server,
        placement=placement,
        ranker_failures=availability.ranker_failures,
        server_failures=availability.embedding_server_failures,
        partial_pooling=request.partial_pooling,
        storage=storage,
    )


def _server_tiers(catalog: Catalog) -> list[tuple[NodeType, Storage]]:
    """Every node type with rows in DRAM, and those with local SSD with rows on it, cheapest
    capacity for rows first."""
    tiers: list[tuple[NodeType, Storage]] = [(n, "dram") for n in catalog.node_types]
    tiers += [(n, "mmap") for n in catalog.node_types if n.ssd_gib > 0]
    return sorted(tiers, key=lambda t: t[0].price_per_hour / max(row_capacity(*t), 1))


def _holds(node: NodeType, storage: Storage, row_bytes: float) -> bool:
    """Whether a server on `node` holds `row_bytes` of rows with `storage`; rows that fit in its
    DRAM take no SSD (the DRAM option serves them as fast)."""
    if storage == "mmap" and row_bytes <= usable_memory(node):
        return False
    return row_bytes <= row_capacity(node, storage)


def _server_options(
    request: PlanRequest,
    work: QueryWork,
    node: NodeType,
    storage: Storage,
    strategy: Strategy,
    budget: Callable[[], float],
) -> Iterable[_ServerOption]:
    model, qps = request.model, request.traffic.peak_qps
    k, copies = request.availability.embedding_server_failures, request.availability.replicas
    memory = row_capacity(node, storage)
    if memory <= 0 or usable_memory(node) <= 0:
        return
    cores = usable_vcpus(node)
    lowest = max(
        copies,
        math.ceil(copies * model.embedding_bytes / memory),
        # Lookups at their cheapest (every table in the caches): a bound no placement beats.
        math.ceil(qps * float(work.lookup_s_per_table.sum()) * work.lookup.size_factor(0) / cores) + k,
    )
    best_p99, stalled = math.inf, 0
    for n in range(lowest, min(lowest + WINDOW, MAX_NODES) + 1):
        if n * node.price_per_hour >= budget():
            return
        placement = place(model, n, copies, strategy)
        if not _holds(node, storage, float(placement.server_bytes(model).max())):
            continue
        dep = _probe(request, node, node, placement, storage)
        healthy = server_stage(dep, work, model, qps, False, cores)
        degraded = server_stage(dep, work, model, qps, True, cores)
        if min(healthy.max_qps, degraded.max_qps) < qps:
            continue
        yield _ServerOption(node, storage, placement, n * node.price_per_hour, healthy, degraded)
        p99 = max(healthy.p99_s, degraded.p99_s)
        stalled = stalled + 1 if p99 > 0.99 * best_p99 else 0
        best_p99 = min(best_p99, p99)
        if stalled >= _STALL_STEPS:
            return


def _ranker_floor(
    request: PlanRequest,
    work: QueryWork,
    node: NodeType,
    calibration: Calibration,
    servers: StageResult,
    placement: Placement | None = None,
) -> int:
    """The fewest rankers of type `node` whose vCPUs (request handling, and the dense model on a
    CPU node) and GPUs keep up with the peak load with j of them down."""
    qps = request.traffic.peak_qps
    cpu = ranker_cpu_s(_probe(request, node, node, placement), work, calibration, servers)
    dense = work.dense_s(node, calibration)
    if node.accelerator is None:
        need = qps * (cpu + dense) / usable_vcpus(node)
    else:
        need = max(qps * cpu / usable_vcpus(node), qps * dense / node.accelerator.count)
    return math.ceil(need) + request.availability.ranker_failures


def _ranker_tier(request: PlanRequest, option: _ServerOption, node: NodeType, count: int) -> Deployment:
    availability = request.availability
    return Deployment(
        node,
        count,
        option.node,
        option.placement,
        availability.ranker_failures,
        availability.embedding_server_failures,
        request.partial_pooling,
        storage=option.storage,
    )


def _ranker_tier_fits(
    request: PlanRequest, work: QueryWork, calibration: Calibration, option: _ServerOption, dep: Deployment
) -> bool:
    """Whether `dep`'s rankers carry the peak load within the target, healthy and degraded."""
    node, qps = dep.ranker_type, request.traffic.peak_qps
    units = node.accelerator.count if node.accelerator else usable_vcpus(node)
    hops = 2 * hop_s(calibration)
    for degraded, es in ((False, option.healthy), (True, option.degraded)):
        rk = ranker_stage(dep, work, qps, degraded, units, calibration, es)
        if rk.max_qps < qps or hops + es.p99_s + rk.p99_s > request.p99_ms / 1e3:
            return False
    return True


def _cheapest_rankers(
    request: PlanRequest,
    work: QueryWork,
    calibration: Calibration,
    option: _ServerOption,
    rankers: list[tuple[NodeType, int]],
    best: tuple[float, Deployment] | None,
) -> tuple[float, Deployment] | None:
    """The cheapest ranker tier completing `option` that beats `best`, or None."""
    found = best
    for node, floor in rankers:
        if found is not None and option.cost + floor * node.price_per_hour >= found[0]:
            break
        exact = _ranker_floor(request, work, node, calibration, option.healthy, option.placement)
        lowest = max(floor, exact, 1 + request.availability.ranker_failures)
        highest = min(lowest + WINDOW, MAX_NODES)
        if found is not None:  # only counts cheaper than the best plan so far
            highest = min(highest, math.ceil((found[0] - option.cost) / node.price_per_hour) - 1)
        if highest < lowest or not memory_fits(_ranker_tier(request, option, node, lowest), request.model):
            continue

        def fits(count: int, node: NodeType = node) -> bool:
            return _ranker_tier_fits(
                request, work, calibration, option, _ranker_tier(request, option, node, count)
            )

        # More rankers only lower the load on each, so `fits` is monotone: bisect for the fewest.
        if not fits(highest):
            continue
        while lowest < highest:
            middle = (lowest + highest) // 2
            lowest, highest = (lowest, middle) if fits(middle) else (middle + 1, highest)
        found = (option.cost + lowest * node.price_per_hour, _ranker_tier(request, option, node, lowest))
    return found if found is not best else None


def search_disaggregated(
    request: PlanRequest,
    catalog: Catalog,
    calibration: Calibration,
    strategies: tuple[Strategy, ...] = STRATEGIES,
) -> Candidate:
    """The cheapest disaggregated deployment meeting `request`; raises `PlanningError` if none."""
    model, qps, target_s = request.model, request.traffic.peak_qps, request.p99_ms / 1e3
    work = QueryWork.of(model, request.traffic, calibration)
    if _latency_floor_s(request, catalog, calibration, work) > target_s:
        raise PlanningError(*_explain(request, catalog, calibration, work, True))
    unknown = StageResult(0.0, 0.0, "", subrequests=1.0)  # servers not chosen yet: a lower bound
    rankers = sorted(
        ((node, _ranker_floor(request, work, node, calibration, unknown)) for node in catalog.node_types),
        key=lambda r: r[1] * r[0].price_per_hour,
    )
    cheapest_rankers = rankers[0][1] * rankers[0][0].price_per_hour
    best: tuple[float, Deployment] | None = None

    def budget() -> float:
        return math.inf if best is None else best[0] - cheapest_rankers

    any_servers = False
    for server, storage in _server_tiers(catalog):
        for strategy in strategies:
            for option in _server_options(request, work, server, storage, strategy, budget):
                any_servers = True
                found = _cheapest_rankers(request, work, calibration, option, rankers, best)
                if found is not None:
                    best = found
    if best is None:
        raise PlanningError(*_explain(request, catalog, calibration, work, any_servers))
    prediction = predict(best[1], model, request.traffic, calibration)
    assert prediction.meets(qps, request.p99_ms), "fast search and predict() disagree"
    return Candidate(best[1], prediction)


def _latency_floor_s(
    request: PlanRequest, catalog: Catalog, calibration: Calibration, work: QueryWork
) -> float:
    """Two hops plus the p99 of one query's ranker work (request handling and dense model) on the
    fastest ranker with no queueing and one server reached: no plan's p99 is lower."""
    unknown = StageResult(0.0, 0.0, "", subrequests=1.0)
    floors = []
    for node in catalog.node_types:
        dep = _probe(request, node, node, None)
        units = node.accelerator.count if node.accelerator else usable_vcpus(node)
        floors.append(ranker_stage(dep, work, 1e-9, False, units, calibration, unknown).p99_s)
    return 2 * hop_s(calibration) + min(floors)


def _explain(
    request: PlanRequest, catalog: Catalog, calibration: Calibration, work: QueryWork, any_servers: bool
) -> tuple[list[str], list[str]]:
    reasons, fixes = [], []
    largest = max(row_capacity(*tier) for tier in _server_tiers(catalog))
    copies = request.availability.replicas
    need = copies * request.model.embedding_bytes
    if not any_servers:
        if need > MAX_NODES * largest:
            reasons.append(
                f"{copies} copies of the tables need {need / 2**30:.0f} GiB, more than {MAX_NODES} of the "
                f"largest node ({largest / 2**30:.0f} GiB usable, in DRAM or on local SSD) hold"
            )
            fixes.append(
                "lower --availability, shrink the model (--row-scale, fp16/int8 rows) or add bigger nodes"
            )
        else:
            reasons.append(
                f"no embedding-server tier of up to {MAX_NODES} nodes sustains "
                f"{request.traffic.peak_qps:g} QPS"
            )
            fixes.append("lower --qps, or add node types with more vCPUs or network bandwidth")
    floor_ms = 1e3 * _latency_floor_s(request, catalog, calibration, work)
    if floor_ms > request.p99_ms:
        reasons.append(
            f"the p99 target {request.p99_ms:g} ms is below the latency floor {floor_ms:.2f} ms "
            f"(two network hops plus one query's request handling and dense model on the fastest "
            f"ranker, with no queueing)"
        )
        fixes.append(
            f"raise --p99-ms above {floor_ms:.2f}, send fewer samples per query, or add faster rankers (GPUs)"
        )
    if not reasons:
        reasons.append(
            f"no combination of up to {MAX_NODES} rankers and servers meets p99 <= {request.p99_ms:g} ms"
        )
        fixes.append("raise --p99-ms, lower --qps, or add faster node types to the catalogue")
    return reasons, fixes


def exhaustive_search(
    request: PlanRequest,
    catalog: Catalog,
    calibration: Calibration,
    max_rankers: int,
    max_servers: int,
    strategies: tuple[Strategy, ...] = STRATEGIES,
) -> Candidate | None:
    """Every disaggregated deployment up to the given counts, each through `predict`: the reference."""
    best: Candidate | None = None
    availability = request.availability
    for server, storage in _server_tiers(catalog):
        for strategy in strategies:
            for n in range(availability.replicas, max_servers + 1):
                placement = place(request.model, n, availability.replicas, strategy)
                if not _holds(server, storage, float(placement.server_bytes(request.model).max())):
                    continue
                for ranker in catalog.node_types:
                    for count in range(1 + availability.ranker_failures, max_rankers + 1):
                        dep = Deployment(
                            ranker,
                            count,
                            server,
                            placement,
                            availability.ranker_failures,
                            availability.embedding_server_failures,
                            request.partial_pooling,
                            storage=storage,
                        )
                        if best is not None and dep.cost_per_hour >= best.cost_per_hour:
                            continue
                        prediction = predict(dep, request.model, request.traffic, calibration)
                        if prediction.meets(request.traffic.peak_qps, request.p99_ms):
                            best = Candidate(dep, prediction)
    return best


def scale_up(request: PlanRequest, catalog: Catalog, calibration: Calibration) -> Candidate | str:
    """Identical monolithic nodes, each holding the whole model; or why there is none."""
    failures = max(request.availability.embedding_server_failures, request.availability.ranker_failures)
    best: Candidate | None = None
    fits_anywhere = False
    for node in sorted(catalog.node_types, key=lambda n: n.price_per_hour):
        work = QueryWork.of(request.model, request.traffic, calibration)
        lookups = float(work.lookup_s_per_table.sum()) * work.lookup.size_factor(
            request.model.embedding_bytes
        )
        per_query = lookups + work.dense_s(node, calibration)
        lowest = math.ceil(request.traffic.peak_qps * per_query / usable_vcpus(node)) + failures
        for count in range(max(lowest, 1 + failures), min(lowest + WINDOW, MAX_NODES) + 1):
            if best is not None and count * node.price_per_hour >= best.cost_per_hour:
                break
            dep = Deployment(node, count, node, None, failures, failures, True, hosting="colocated")
            if not memory_fits(dep, request.model):
                break
            fits_anywhere = True
            prediction = predict(dep, request.model, request.traffic, calibration)
            if prediction.meets(request.traffic.peak_qps, request.p99_ms):
                best = Candidate(dep, prediction)
                break
    if best is not None:
        return best
    if not fits_anywhere:
        return f"no node type holds the whole model ({request.model.embedding_bytes / 2**30:.1f} GiB)"
    return f"no count of up to {MAX_NODES} nodes of one type meets the target"


def scale_out(request: PlanRequest, catalog: Catalog, calibration: Calibration) -> Candidate | str:
    """Identical monolithic nodes with the tables sharded over them (each also ranks); or why none."""
    failures = max(request.availability.embedding_server_failures, request.availability.ranker_failures)
    model = request.model
    best: Candidate | None = None
    for node in sorted(catalog.node_types, key=lambda n: n.price_per_hour):
        memory = usable_memory(node)
        if memory <= 0:
            continue
        lowest = max(failures + 1, math.ceil((failures + 1) * model.embedding_bytes / memory))
        for strategy in STRATEGIES:
            for count in range(lowest, min(lowest + WINDOW, MAX_NODES) + 1):
                if best is not None and count * node.price_per_hour >= best.cost_per_hour:
                    break
                placement = place(model, count, failures + 1, strategy)
                dep = Deployment(
                    node, count, node, placement, failures, failures, request.partial_pooling, "colocated"
                )
                if not memory_fits(dep, model):
                    continue
                prediction = predict(dep, model, request.traffic, calibration)
                if prediction.meets(request.traffic.peak_qps, request.p99_ms):
                    best = Candidate(dep, prediction)
                    break
    return best if best is not None else f"no count of up to {MAX_NODES} nodes of one type meets the target"
