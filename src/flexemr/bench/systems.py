"""The systems a benchmark compares, each started the way a user would start it.

Every served system is a real `flexemr serve` child process (ranker) with its own children
(embedding servers, or Redis), reached over KServe v2 HTTP or gRPC. Two monolithic baselines hold
every table in one process: `served-monolithic` (`flexemr serve --embedding-tier local`, behind the
same HTTP/gRPC front as flexemr: what a user would run for a model that fits one machine) and
`monolithic` (the model in the benchmark's own process, called directly: the upper bound on one
machine, no API at all; its reports say `in-process`).
"""

from __future__ import annotations

import http.client
import re
import sys
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np

from flexemr.batch import SparseBatch
from flexemr.client import Client, InferenceError, binary_body, infer_inputs
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.extras import needs_extra

if TYPE_CHECKING:
    from flexemr.bench.loadgen_sut import Transport


@dataclass(frozen=True)
class System:
    name: str
    flags: tuple[str, ...]
    """`flexemr serve` flags on top of the model's; empty for the in-process monolithic model."""
    description: str


ApiProtocol = Literal["http", "grpc"]

NAIVE_FLAGS = ("--lookup", "raw", "--engine", "single", "--io-threads", "1", "--cache", "off")

SYSTEMS = {
    s.name: s
    for s in [
        System("monolithic", (), "all tables in the benchmark's process, called directly (no API)"),
        System("served-monolithic", ("--embedding-tier", "local"),
               "all tables in the ranker's process, behind the same API as flexemr"),
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
    """`flexemr serve` in a child process, and a LoadGen backend reaching it over HTTP or gRPC."""

    def __init__(
        self,
        system: System,
        model_flags: tuple[str, ...],
        protocol: ApiProtocol = "http",
        timeout_s: float = 300.0,
    ) -> None:
        self.name = system.name
        self.transport: Transport = protocol
        command = [
            sys.executable,
            "-m",
            "flexemr.cli.main",
            "serve",
            "--port",
            "0",
            "--watch-stdin",
            *(("--grpc-port", "0") if protocol == "grpc" else ()),
            *model_flags,
            *system.flags,
        ]
        self._process = AnnouncedProcess(command, "flexemr ready:", timeout_s)
        self.url = self._process.url
        self.client = Client(self.url)
        self._http = KeepAliveHttp(self.url)
        self._grpc: GrpcClient | None = None
        if protocol == "grpc":
            match = re.search(r"flexemr ready: .* grpc=(\S+)", "".join(self._process.output))
            if match is None:
                self.close()
                raise RuntimeError("flexemr serve announced no gRPC address")
            self._grpc = GrpcClient(match.group(1))

    def infer(self, request: SparseBatch) -> Any:
        if self._grpc is not None:
            return self._grpc.infer(request)
        return self._http.infer(request)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/v2/stats", timeout=30).json()
        return result

    def pids(self) -> dict[str, int]:
        """The ranker and its children (embedding servers or Redis) by role."""
        kids = self._process.children()
        return {"ranker": self._process.pid, **{f"tier-{i}": pid for i, pid in enumerate(kids)}}

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()
        self.client.close()
        self._http.close()
        self._process.close()

    def __enter__(self) -> ServedSystem:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class KeepAliveHttp:
    """KServe v2 binary-tensor requests on one keep-alive `http.client` connection per calling
    thread: the load generator shares the served system's cores, so its client costs a body
    encoding, a write and a read per request (1.6-1.9 ms of CPU for a 400-pair query of rmc1 x0.01
    against httpx's 2.8-3.0 ms, measured on 2 shared cores)."""

    def __init__(self, url: str, model: str = "dlrm", timeout_s: float = 60.0) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.path = f"/v2/models/{model}/infer"
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def infer(self, request: SparseBatch) -> np.ndarray:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, self.timeout_s)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        body, header_length = binary_body(infer_inputs(request.dense, request.indices, request.lengths))
        connection.request("POST", self.path, body, {"Inference-Header-Content-Length": str(header_length)})
        response = connection.getresponse()
        content = response.read()
        if response.status != 200:
            raise InferenceError(response.status, content.decode(errors="replace"))
        split = int(response.getheader("inference-header-content-length", "0"))
        return np.frombuffer(content, dtype="<f4", offset=split)

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


class GrpcClient:
    """KServe v2 gRPC `ModelInfer` with raw tensor contents, through the generated stubs (the lean
    path a production client takes; `tritonclient.grpc` builds the same message)."""

    def __init__(self, address: str, model: str = "dlrm", timeout_s: float = 60.0) -> None:
        with needs_extra("bench"):
            import grpc
            from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb = service_pb2
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 * 2**20)]
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.model = model
        self.timeout_s = timeout_s

    def infer(self, request: SparseBatch) -> np.ndarray:
        tensor = self._pb.ModelInferRequest.InferInputTensor
        inputs = infer_inputs(request.dense, request.indices, request.lengths)
        message = self._pb.ModelInferRequest(
            model_name=self.model,
            inputs=[tensor(name=n, datatype=d, shape=list(a.shape)) for n, d, a in inputs],
            raw_input_contents=[a.tobytes() for _, _, a in inputs],
        )
        response = self._stub.ModelInfer(message, timeout=self.timeout_s)
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4")

    def close(self) -> None:
        self._channel.close()


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
