from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flexemr.entrypoints.child import AnnouncedProcess

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class ServeProcess(AnnouncedProcess):
    """A `flexemr serve` running as a child process, and its URL."""

    def stop(self) -> None:
        self.close(grace_s=20)
        if any("Traceback" in line for line in self.output):
            print("flexemr serve logged an error:\n" + "".join(self.output[-80:]))  # shown if a test fails


def start_serve(*args: str, timeout: float = 90.0) -> ServeProcess:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin", *args]
    return ServeProcess(command, "flexemr ready:", timeout, {**os.environ, "PYTHONUNBUFFERED": "1"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, each kept whole and in order: `make test`'s two workers take
    whole files, so the long ones start early and the many short ones even out the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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
