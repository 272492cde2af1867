from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class ServeProcess:
    """A `flexemr serve` running as a child process, and its URL."""

    proc: subprocess.Popen[str]
    url: str
    output: list[str]
    pump: threading.Thread

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if any("Traceback" in line for line in self.output):
            print("flexemr serve logged an error:\n" + "".join(self.output[-80:]))  # shown if a test fails


def start_serve(*args: str, timeout: float = 90.0) -> ServeProcess:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            match = re.search(r"flexemr ready: (http://\S+)", line)
            if match:
                url.append(match.group(1))
                ready.set()
        ready.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    if not ready.wait(timeout) or not url:
        ServeProcess(proc, "", output, thread).stop()
        raise RuntimeError("flexemr serve did not become ready:\n" + "".join(output))
    return ServeProcess(proc, url[0], output, thread)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServeProcess]]:
    """Start `flexemr serve` with the given flags; everything started is stopped afterwards."""
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        started.append(start_serve(*args))
        return started[-1]

    yield start
    for server in started:
        server.stop()
