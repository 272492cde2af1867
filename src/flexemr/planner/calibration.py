"""Calibration: the measured constants of the performance model, and the file that holds them.

`flexemr calibrate` fills one by running `flexemr.calibrate.microbench` on this machine; without a
file the planner can fall back to `default_calibration()`, whose `calibrated` flag is False so every
report says the numbers are guesses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexemr.planner.inputs import InputError


@dataclass(frozen=True)
class LookupCost:
    """Seconds one core spends on one bag: `bag_s + pooling * (row_s + dim * element_s)`, divided by
    `1 + skew_gain * min(zipf_skew, 1.5)` (hot rows stay in cache), on a table of `table_bytes`;
    a smaller table (its rows more often in the caches) costs `size_factor` of that."""

    bag_s: float = 150e-9
    """Per-bag cost (offsets, the output vector)."""
    row_s: float = 25e-9
    """Per-row cost independent of width: the random memory access."""
    element_s: float = 0.4e-9
    """Per-element cost of adding a row into the bag's sum."""
    skew_gain: float = 0.4
    """Speed-up per unit of Zipf exponent, fitted from uniform vs skewed runs."""
    table_bytes: float = 512 * 2**20
    """The table the constants above were measured on (bigger than the caches)."""
    small_table_bytes: float = 4 * 2**20
    """The smallest table measured: smaller ones cost as much per bag as it."""
    size_exponent: float = 0.4
    """Between the two, the cost per bag grows as (table bytes)^this; fitted from both sizes."""
    ssd_read_s: float = 100e-6
    """A lookup an mmap server (`--storage mmap`) does not find in its page cache: one random 4 KiB
    read from the node's local NVMe SSD at low queue depth, during which the faulting core waits.
    Not measured by `flexemr calibrate` (this machine has no such SSD): 100 us is the order NVMe
    data sheets give for queue-depth-1 random reads (typically 70-100 us); measure a node with
    `fio --rw=randread --bs=4k --iodepth=1 --direct=1` and set it in the calibration file."""

    def seconds_per_bag(self, dim: int, pooling: float, zipf_skew: float) -> float:
        uniform = self.bag_s + pooling * (self.row_s + dim * self.element_s)
        return uniform / (1.0 + self.skew_gain * min(zipf_skew, 1.5))

    def size_factor(self, table_bytes: float) -> float:
        """Cost of a bag on a table of `table_bytes` relative to the measured table; 1 beyond it
        (every row from DRAM)."""
        held = min(max(table_bytes, self.small_table_bytes), self.table_bytes)
        return float((held / self.table_bytes) ** self.size_exponent)


@dataclass(frozen=True)
class DenseCost:
    """Seconds for one forward pass of B samples: `call_s + B * flops_per_sample / flops_per_s`."""

    call_s: float = 60e-6
    """Fixed cost per call on one CPU core (framework and kernel dispatch)."""
    flops_per_s: float = 25e9
    """Sustained FLOP/s of one CPU core (one vCPU) on the MLPs."""
    gpu_call_s: float = 250e-6
    """Fixed cost per call on a GPU (launches, host-device copies). Not measured without a GPU."""
    gpu_efficiency: float = 0.35
    """Fraction of a GPU's peak fp32 TFLOPS the MLPs reach. Not measured without a GPU."""


@dataclass(frozen=True)
class NetworkCost:
    """One TCP hop as this system's sockets see it."""

    rtt_s: float = 80e-6
    """Round trip of a small message (software stack; loopback when measured on one machine)."""
    stream_bytes_per_s: float = 2e9
    """Bytes/s one connection moves (caps transfers besides the NIC)."""
    wire_rtt_s: float = 50e-6
    """Extra round trip of a real datacentre network (same zone), added to the measured one."""


@dataclass(frozen=True)
class ServingCost:
    """CPU seconds this system's own code spends around the kernels, per query, by process role:
    HTTP and KServe parsing, validation, routing, frames, I/O threads, gathering partial sums. Fitted
    to the CPU time each process of a local cluster uses per request (`microbench.measure_serving`);
    the lookup kernel (`LookupCost`) and the dense model (`DenseCost`) are not counted here."""

    ranker_request_s: float = 1.0e-3
    """Per request on the ranker: the HTTP server, parsing, the response, thread hand-offs."""
    ranker_subrequest_s: float = 200e-6
    """Per embedding server a request reaches: cutting, framing and collecting its subrequest."""
    ranker_table_s: float = 5e-6
    """Per table where every table is held whole by one server: the router sends its keys as one
    slice (a few numpy calls)."""
    ranker_routed_key_s: float = 10e-9
    """Per index where some table is split over servers: the router finds every key's shard."""
    ranker_bag_s: float = 300e-9
    """Per bag (sample x table): lengths, validation, gathering partial sums."""
    ranker_lookup_s: float = 45e-9
    """Per index: range checks, global keys, routing, the bytes through both sockets."""
    ranker_contention: float = 1.0
    """A ranker process serving n requests at once spends (1 + this x (1 - 1/n)) times the CPU
    on each one's request path (all but the dense model) that it spends on one alone: its threads
    take turns and still hand the interpreter lock back and forth (about 0.4 on a 2-core VM)."""
    ranker_cores: float = 0.9
    """Cores one ranker process's request path keeps busy when saturated: it computes one request
    at a time (its turn), so at most one, less the gaps of handing requests between threads and
    processes (the dense model runs outside it). Shared cores, saturated, stay busy as much."""
    server_subrequest_s: float = 200e-6
    """Per subrequest on an embedding server: reading, checking and answering the frame."""
    server_lookup_s: float = 10e-9
    """Per index on a server besides the pooling kernel (decoding, range checks)."""
    client_request_s: float = 600e-6
    """Per request in the load generator's process (only counted where it shares the cores)."""
    client_lookup_s: float = 7e-9
    """Per index in the load generator: building and encoding the request."""

    def ranker_s(self, subrequests: float, tables: float, split: bool, bags: float, lookups: float) -> float:
        """A request of `bags` bags and `lookups` indices in `tables` tables reaching `subrequests`
        servers; `split`: some table of the plan is split over servers."""
        return (
            self.ranker_request_s
            + subrequests * self.ranker_subrequest_s
            + (lookups * self.ranker_routed_key_s if split else tables * self.ranker_table_s)
            + bags * self.ranker_bag_s
            + lookups * self.ranker_lookup_s
        )

    def contention(self, in_flight: float) -> float:
        """The factor on a ranker's request CPU with `in_flight` (>= 1) requests in its process."""
        return 1 + self.ranker_contention * (1 - 1 / max(in_flight, 1.0))

    def client_s(self, lookups: float) -> float:
        return self.client_request_s + lookups * self.client_lookup_s


@dataclass(frozen=True)
class Calibration:
    """All measured constants, where they came from, and the raw measurements behind them."""

    lookup: LookupCost = LookupCost()
    dense: DenseCost = DenseCost()
    network: NetworkCost = NetworkCost()
    serving: ServingCost = ServingCost()
    calibrated: bool = False
    """False for the built-in defaults: plans made with them are labelled uncalibrated."""
    host: str = "defaults"
    """Where the measurements ran."""
    measured_at: str = ""
    measurements: dict[str, Any] = field(default_factory=dict, compare=False)
    """The raw microbenchmark results the fits came from."""

    @property
    def label(self) -> str:
        if self.calibrated:
            return f"calibrated on {self.host} at {self.measured_at}"
        return "UNCALIBRATED: built-in default constants, not measurements (run `flexemr calibrate`)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def default_calibration() -> Calibration:
    return Calibration()


def _part(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where} must be an object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}")
    bad = {k: v for k, v in data.items() if not isinstance(v, int | float) or v < 0}
    if bad:
        raise InputError(f"{where}: values must be non-negative numbers, got {bad}")
    return cls(**{k: float(v) for k, v in data.items()})


def calibration_from_dict(data: dict[str, Any], where: str = "calibration") -> Calibration:
    return Calibration(
        lookup=_part(LookupCost, data.get("lookup", {}), f"{where}: lookup"),
        dense=_part(DenseCost, data.get("dense", {}), f"{where}: dense"),
        network=_part(NetworkCost, data.get("network", {}), f"{where}: network"),
        serving=_part(ServingCost, data.get("serving", {}), f"{where}: serving"),
        calibrated=bool(data.get("calibrated", False)),
        host=str(data.get("host", "unknown")),
        measured_at=str(data.get("measured_at", "")),
        measurements=dict(data.get("measurements", {})),
    )


def load_calibration(path: str | Path) -> Calibration:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(
            f"calibration file {path} does not exist; run `flexemr calibrate --out {path}` first"
        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"calibration file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"calibration file {path} must hold a JSON object")
    return calibration_from_dict(data, where=str(path))
