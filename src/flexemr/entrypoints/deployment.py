"""A local deployment with several rankers: embedding servers (`LocalCluster`) plus N `flexemr
ranker --spec` processes on the same servers, and a backend that spreads requests over the rankers'
HTTP endpoints round-robin (what a load balancer in front of a ranker tier does). The calibration
measures it, and the planner's validation benchmark runs LoadGen over it.

    with LocalDeployment(spec, rankers=2) as deployment:
        run_offline(deployment.backend(), pool)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from flexemr.batch import SparseBatch
from flexemr.client import Client
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.entrypoints.local import LocalCluster


def start_ranker(
    spec_path: Path, dense_threads: int | None = None, timeout_s: float = 120.0, reuse_port: bool = False
) -> AnnouncedProcess:
    """`flexemr ranker --spec FILE` in a child process. `dense_threads`: its `--torch-threads`
    (None: the spec's). `reuse_port`: share the spec's HTTP port with other rankers (SO_REUSEPORT)."""
    command = [sys.executable, "-m", "flexemr.cli.main", "ranker", "--spec", str(spec_path), "--watch-stdin"]
    if reuse_port:
        command.append("--reuse-port")
    if dense_threads is not None:
        command += ["--torch-threads", str(dense_threads)]
    return AnnouncedProcess(command, "flexemr ranker ready:", timeout_s)


class RoundRobinBackend:
    """Sends each request to the next ranker in turn (a LoadGen `Backend`)."""

    transport: Literal["http"] = "http"

    def __init__(self, urls: list[str], name: str = "flexemr", model: str = "dlrm") -> None:
        if not urls:
            raise ValueError("need at least one ranker URL")
        self.name = name
        self.clients = [Client(url, model) for url in urls]
        self._next = itertools.count()
        self._lock = threading.Lock()

    def infer(self, request: SparseBatch) -> np.ndarray:
        with self._lock:
            client = self.clients[next(self._next) % len(self.clients)]
        return client.infer(request.dense, request.indices, request.lengths)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class LocalDeployment:
    """The embedding servers of `spec` and `rankers` ranker processes, started and stopped together.

    Rankers run the dense model on one thread by default, as the embedding servers run their
    kernels: with every process on the same few cores, torch's per-core threads only spin (they
    cost about 2 ms of CPU per dlrm-v2 query of 32 samples here, for no speed-up)."""

    def __init__(self, spec: ClusterSpec, rankers: int = 1, dense_threads: int | None = 1) -> None:
        if rankers < 1:
            raise ValueError(f"need at least one ranker, got {rankers}")
        # Every ranker binds its own free port.
        self.spec = dataclasses.replace(spec, ranker=dataclasses.replace(spec.ranker, port=0))
        self.num_rankers = rankers
        self.dense_threads = dense_threads
        self.cluster = LocalCluster(self.spec)
        self.rankers: list[AnnouncedProcess] = []
        self._dir = tempfile.TemporaryDirectory(prefix="flexemr-deployment-")

    def start(self) -> LocalDeployment:
        try:
            spec = self.cluster.start()
            spec_path = Path(self._dir.name) / "cluster.json"
            spec.save(spec_path)
            for _ in range(self.num_rankers):
                self.rankers.append(start_ranker(spec_path, self.dense_threads))
        except BaseException:
            self.stop()
            raise
        return self

    def backend(self, name: str = "flexemr") -> RoundRobinBackend:
        return RoundRobinBackend([r.url for r in self.rankers], name, self.spec.ranker.model_name)

    def pids(self) -> dict[str, int]:
        """Every process by role: ranker-i and server-i."""
        return {
            **{f"ranker-{i}": r.pid for i, r in enumerate(self.rankers)},
            **{f"server-{i}": pid for i, pid in enumerate(self.cluster.pids)},
        }

    def stop(self) -> None:
        for ranker in self.rankers:
            ranker.close()
        self.rankers.clear()
        self.cluster.stop()
        self._dir.cleanup()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
