"""The systems a benchmark compares, each started the way a user would start it.

Every served system is a real `flexemr serve` child process (ranker) with its own children
(embedding servers, or Redis), reached over HTTP; the monolithic baseline runs in the benchmark's
own process and is called directly (its reports say `in-process`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from flexemr.client import Client
from flexemr.cluster.child import AnnouncedProcess
from flexemr.workload.request import Request


@dataclass(frozen=True)
class System:
    name: str
    flags: tuple[str, ...]
    """`flexemr serve` flags on top of the model's; empty for the in-process monolithic model."""
    description: str


NAIVE_FLAGS = ("--lookup", "raw", "--engine", "single", "--io-threads", "1", "--cache", "off")

SYSTEMS = {
    s.name: s
    for s in [
        System("monolithic", (), "all tables in the benchmark's process, the same dense model"),
        System("naive", NAIVE_FLAGS, "raw rows, one I/O thread, no cache"),
        System("flexemr", (), "every technique on (the defaults)"),
        System("flexemr-no-partial", ("--lookup", "raw"), "servers return raw rows"),
        System("flexemr-no-mapped", ("--engine", "shared"), "I/O threads share connections under locks"),
        System("flexemr-no-credits", ("--credits", "off"), "no flow control"),
        System("flexemr-no-migration", ("--migration", "off"), "no live connection migration"),
        System("flexemr-adaptive-cache", ("--cache", "adaptive"), "adaptive embedding cache on the ranker"),
        System("flexemr-batching", ("--batch-window-ms", "2"), "dynamic batching, 2 ms window"),
        System("redis", ("--embedding-tier", "redis", "--lookup", "raw", "--cache", "off"),
               "rows in Redis (MGET), pooled on the ranker: HugeCTR-PS style"),
    ]
}  # fmt: skip


class ServedSystem:
    """`flexemr serve` in a child process, and an HTTP backend for LoadGen."""

    transport = "http"

    def __init__(self, system: System, model_flags: tuple[str, ...], timeout_s: float = 300.0) -> None:
        self.name = system.name
        command = [
            sys.executable,
            "-m",
            "flexemr.cli.main",
            "serve",
            "--port",
            "0",
            "--watch-stdin",
            *model_flags,
            *system.flags,
        ]
        self._process = AnnouncedProcess(command, "flexemr ready:", timeout_s)
        self.url = self._process.url
        self.client = Client(self.url)

    def infer(self, request: Request) -> Any:
        return self.client.infer(request.dense, request.indices, request.lengths)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/v2/stats", timeout=30).json()
        return result

    def pids(self) -> dict[str, int]:
        """The ranker and its children (embedding servers or Redis) by role."""
        kids = self._process.children()
        return {"ranker": self._process.pid, **{f"tier-{i}": pid for i, pid in enumerate(kids)}}

    def close(self) -> None:
        self.client.close()
        self._process.close()

    def __enter__(self) -> ServedSystem:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wire_bytes(stats: dict[str, Any]) -> int:
    """Bytes the ranker sent to and received from its embedding tier so far (the per-server
    totals; the engine's per-thread and per-connection counters break the same bytes down)."""
    transport = stats.get("transport", {})
    tiers = [*transport.get("servers", []), transport.get("redis", {})]
    return sum(int(t.get("bytes_sent", 0)) + int(t.get("bytes_received", 0)) for t in tiers)


def cache_hit_rate(stats: dict[str, Any]) -> float | None:
    cache = stats.get("cache")
    if isinstance(cache, dict) and "hit_rate" in cache:
        return float(cache["hit_rate"])
    return None
