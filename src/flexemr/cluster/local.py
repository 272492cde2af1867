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
from pathlib import Path
from types import TracebackType

from flexemr.config import ClusterSpec, Endpoint
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


class LocalCluster:
    def __init__(self, spec: ClusterSpec, progress: bool = False, cgroup: Path | None = None) -> None:
        self.spec = spec
        self.progress = progress
        self.cgroup = cgroup
        """A cgroup (v2) the servers run in, e.g. one with a memory limit."""
        self._procs: list[subprocess.Popen[str]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="flexemr-cluster-")

    def start(self, timeout: float = 300.0) -> ClusterSpec:
        """Start every server; return the spec with the ports they actually bound."""
        from flexemr.cluster.roles import local_servers_need  # roles imports the serving stack

        servers = f"{len(self.spec.embedding_servers)} embedding servers on this host"
        try:
            check_memory(local_servers_need(self.spec), servers, SERVING_ADVICE)
        except NotEnoughMemory:
            self.stop()
            raise
        spec_path = Path(self._dir.name) / "cluster.json"
        self.spec.save(spec_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for index in range(len(self.spec.embedding_servers)):
            command = [
                sys.executable, "-m", "flexemr.cli.main", "embedding-server",
                "--spec", str(spec_path), "--index", str(index), "--watch-stdin",
            ]  # fmt: skip
            if not self.progress:
                command.append("--quiet")
            self._procs.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            )
            if self.cgroup is not None:  # before it loads: the child is still importing
                (self.cgroup / "cgroup.procs").write_text(str(self._procs[-1].pid))
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
        return self.spec

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def kill_server(self, index: int) -> None:
        """Kill one server outright (for failure tests and drills)."""
        self._procs[index].kill()
        self._procs[index].wait()

    def stop(self, grace_s: float = 5.0) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        self._dir.cleanup()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
