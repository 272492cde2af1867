"""Node types the planner may rent, and their prices.

The default catalogue (`aws_us_east_1.json`, next to this module) lists AWS EC2 on-demand Linux
instances in us-east-1: memory-optimised (r6i, r7i) for embedding servers, compute-optimised
(c6i, c7i) and GPU (g5, g6) for rankers, and storage-optimised nodes with local NVMe SSDs (i4i,
im4gn) for embedding servers that keep rows on SSD (`serve --storage mmap`). Any type may take
either role; the search decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from flexemr.planner.inputs import InputError, read_json_object

DEFAULT_CATALOG = "aws_us_east_1.json"


@dataclass(frozen=True)
class Accelerator:
    """GPUs on a node (all of one model)."""

    name: str
    count: int
    memory_gib: float
    """Memory of one device."""
    fp32_tflops: float
    """Peak dense fp32 throughput of one device, from the vendor's data sheet."""

    def __post_init__(self) -> None:
        if self.count < 1 or self.memory_gib <= 0 or self.fp32_tflops <= 0:
            raise InputError(f"accelerator {self.name!r}: count, memory and TFLOPS must be positive")


@dataclass(frozen=True)
class NodeType:
    """One rentable machine shape."""

    name: str
    vcpus: int
    memory_gib: float
    network_gbps: float
    """Sustained (baseline) NIC bandwidth; for "up to" instances the baseline, not the burst."""
    price_per_hour: float
    """On-demand list price in US dollars."""
    accelerator: Accelerator | None = None
    ssd_gib: float = 0.0
    """Local NVMe instance storage (GiB, 10^9-byte GB as AWS lists it converted): room for the rows
    of a server with `--storage mmap`; 0: none (EBS only)."""

    def __post_init__(self) -> None:
        if self.ssd_gib < 0:
            raise InputError(f"node type {self.name!r}: ssd_gib must not be negative, got {self.ssd_gib}")
        if self.vcpus < 1 or self.memory_gib <= 0 or self.network_gbps <= 0 or self.price_per_hour <= 0:
            raise InputError(
                f"node type {self.name!r}: vcpus, memory_gib, network_gbps and price_per_hour must be "
                f"positive, got {self.vcpus}, {self.memory_gib}, {self.network_gbps}, {self.price_per_hour}"
            )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def network_bytes_per_s(self) -> float:
        return self.network_gbps * 1e9 / 8

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_gib": self.memory_gib,
            "network_gbps": self.network_gbps,
            "price_per_hour": self.price_per_hour,
        }
        if self.accelerator is not None:
            out["accelerator"] = vars(self.accelerator).copy()
        if self.ssd_gib:
            out["ssd_gib"] = self.ssd_gib
        return out


@dataclass(frozen=True)
class Catalog:
    """The node types on offer, and where their numbers came from."""

    node_types: tuple[NodeType, ...]
    source: str = "user supplied"
    as_of: str = ""

    def __post_init__(self) -> None:
        if not self.node_types:
            raise InputError("the catalogue lists no node types")
        names = [n.name for n in self.node_types]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"the catalogue lists node type(s) {duplicates} more than once")

    def get(self, name: str) -> NodeType:
        for node in self.node_types:
            if node.name == name:
                return node
        raise InputError(f"node type {name!r} is not in the catalogue")

    def subset(self, names: list[str]) -> Catalog:
        return Catalog(tuple(self.get(n) for n in names), self.source, self.as_of)


def _node_from_dict(data: dict[str, Any], where: str) -> NodeType:
    known = {
        "name",
        "family",
        "vcpus",
        "memory_gib",
        "network_gbps",
        "network_burst_gbps",
        "price_per_hour",
        "ssd_gib",
    }
    unknown = sorted(set(data) - known - {"accelerator"})
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}")
    try:
        accel = data.get("accelerator")
        return NodeType(
            name=str(data["name"]),
            vcpus=int(data["vcpus"]),
            memory_gib=float(data["memory_gib"]),
            network_gbps=float(data["network_gbps"]),
            price_per_hour=float(data["price_per_hour"]),
            accelerator=Accelerator(**accel) if accel else None,
            ssd_gib=float(data.get("ssd_gib", 0.0)),
        )
    except KeyError as exc:
        raise InputError(f"{where}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None


def catalog_from_dict(data: dict[str, Any], where: str = "catalogue") -> Catalog:
    if not isinstance(data.get("node_types"), list):
        raise InputError(f"{where}: needs a 'node_types' list")
    nodes = tuple(_node_from_dict(n, f"{where}: node_types[{i}]") for i, n in enumerate(data["node_types"]))
    return Catalog(nodes, source=str(data.get("source", "user supplied")), as_of=str(data.get("as_of", "")))


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalogue in `path`, or the default AWS us-east-1 one."""
    if path is None:
        text = resources.files("flexemr.planner").joinpath(DEFAULT_CATALOG).read_text()
        return catalog_from_dict(json.loads(text), where=DEFAULT_CATALOG)
    data = read_json_object(path, "catalogue")
    return catalog_from_dict(data, where=str(path))
