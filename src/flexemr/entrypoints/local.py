"""A local cluster: embedding-server processes on this machine, started and stopped together.

Each server is a child process running `flexemr embedding-server --watch-stdin`. It binds the port
its endpoint names (0: any free port) and prints one line with the address it got; the parent
reads it back. The child exits when its stdin closes, so servers never outlive a parent that was
killed without the chance to stop them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from flexemr.config import Endpoint
from flexemr.config.spec import ClusterSpec
from flexemr.memory import SERVING_ADVICE, NotEnoughMemory, check_memory

log = logging.getLogger(__name__)

READY_PREFIX = "flexemr-embedding-server ready "


class ClusterStartError(RuntimeError):
    pass


def _read_ready_line(proc: subprocess.Popen[str], out: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(READY_PREFIX):
            out.append(line[len(READY_PREFIX) :].strip())
            return


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


class LocalCluster:
    """With `supervise`, a server that dies is started again on the same address (the ranker's
    reconnect re-admits it once it answers), after a backoff that doubles with each start that
    fails; after `max_restart_failures` failures in a row it is left down, loudly."""

    def __init__(
        self,
        spec: ClusterSpec,
        progress: bool = False,
        supervise: bool = False,
        max_restart_failures: int = 5,
        cgroup: Path | None = None,
    ) -> None:
        self.spec = spec
        self.progress = progress
        self.cgroup = cgroup
        """A cgroup (v2) the servers run in, e.g. one with a memory limit."""
        self.max_restart_failures = max_restart_failures
        self.restarts = 0
        self._procs: list[subprocess.Popen[str]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="flexemr-cluster-")
        self._spec_path = Path(self._dir.name) / "cluster.json"
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor = (
            threading.Thread(target=self._supervise, daemon=True, name="flexemr-cluster-supervisor")
            if supervise
            else None
        )

    def _spawn(self, index: int) -> subprocess.Popen[str]:
        command = [
            sys.executable, "-m", "flexemr.cli.main", "embedding-server",
            "--spec", str(self._spec_path), "--index", str(index), "--watch-stdin",
        ]  # fmt: skip
        if not self.progress:
            command.append("--quiet")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.cgroup is not None:  # before it loads: the child is still importing
            (self.cgroup / "cgroup.procs").write_text(str(proc.pid))
        return proc

    def start(self, timeout: float = 300.0) -> ClusterSpec:
        """Start every server; return the spec with the ports they actually bound."""
        from flexemr.entrypoints.roles import local_servers_need  # roles imports the serving stack

        servers = f"{len(self.spec.embedding_servers)} embedding servers on this host"
        try:
            check_memory(local_servers_need(self.spec), servers, SERVING_ADVICE)
        except NotEnoughMemory:
            self.stop()
            raise
        if self.spec.updates.log_dir is None:  # stable per server, so a restart replays its updates
            updates = dataclasses.replace(self.spec.updates, log_dir=str(Path(self._dir.name) / "updates"))
            self.spec = dataclasses.replace(self.spec, updates=updates)
        self.spec.save(self._spec_path)
        for index in range(len(self.spec.embedding_servers)):
            self._procs.append(self._spawn(index))
        endpoints = []
        for index, proc in enumerate(self._procs):
            got: list[str] = []
            reader = threading.Thread(target=_read_ready_line, args=(proc, got), daemon=True)
            reader.start()
            reader.join(timeout)
            if not got:
                self.stop()
                code = proc.poll()
                why = f"exited with code {code}" if code is not None else f"not ready after {timeout} s"
                raise ClusterStartError(f"embedding server {index} {why}; see its log above")
            host, port = got[0].rsplit(":", 1)
            endpoints.append(Endpoint(host, int(port)))
        self.spec = dataclasses.replace(self.spec, embedding_servers=tuple(endpoints))
        self.spec.save(self._spec_path)  # restarted servers bind the same ports
        if self._supervisor is not None:
            self._supervisor.start()
        return self.spec

    def _supervise(self, poll_s: float = 0.2, load_timeout_s: float = 300.0) -> None:
        failures = [0] * len(self._procs)
        retry_at = [0.0] * len(self._procs)
        while not self._stopping.wait(poll_s):
            for index, proc in enumerate(list(self._procs)):
                if proc.poll() is None or failures[index] >= self.max_restart_failures:
                    continue
                if time.monotonic() < retry_at[index]:
                    continue
                _close_pipes(proc)
                log.warning(
                    "embedding server %d exited with code %s; restarting it on %s",
                    index, proc.returncode, self.spec.embedding_servers[index],
                )  # fmt: skip
                with self._lock:
                    if self._stopping.is_set():
                        return
                    fresh = self._spawn(index)
                    self._procs[index] = fresh
                got: list[str] = []
                reader = threading.Thread(target=_read_ready_line, args=(fresh, got), daemon=True)
                reader.start()
                reader.join(load_timeout_s)
                if got:
                    failures[index] = 0
                    self.restarts += 1
                    log.info("embedding server %d is back on %s", index, got[0])
                    continue
                failures[index] += 1
                retry_at[index] = time.monotonic() + min(0.5 * 2 ** failures[index], 30.0)
                if failures[index] >= self.max_restart_failures:
                    log.error(
                        "embedding server %d failed to restart %d times; leaving it down",
                        index,
                        failures[index],
                    )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def kill_server(self, index: int) -> None:
        """Kill one server outright (for failure tests and drills)."""
        self._procs[index].kill()
        self._procs[index].wait()

    def stop(self, grace_s: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
        if self._supervisor is not None and self._supervisor.is_alive():
            for proc in self._procs:  # also ends the wait for a restarted server to load
                if proc.poll() is None:
                    proc.terminate()
            self._supervisor.join(30)
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _close_pipes(proc)
        self._procs.clear()
        self._dir.cleanup()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
