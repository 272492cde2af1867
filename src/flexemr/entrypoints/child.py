"""A child process that announces its HTTP URL on stdout (`flexemr serve`, `flexemr ranker`).

Its output is drained by a thread to the end (so the child never blocks on a full pipe) and kept,
for the error message when it does not start and for tests that look for tracebacks. Its stdin is
a pipe from the parent: started with `--watch-stdin`, the child exits when that pipe closes, so a
parent killed outright leaves nothing running (`exit_when_stdin_closes`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType


class AnnouncedProcess:
    def __init__(
        self,
        command: list[str],
        banner: str,
        timeout_s: float,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start `command` and wait until it prints `<banner> http://...`; `url` is that address.
        Raises RuntimeError, with the end of its output, if it exits or is silent for `timeout_s`."""
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.output: list[str] = []
        pattern = re.compile(re.escape(banner) + r" (http://\S+)")
        ready = threading.Event()
        url: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                match = pattern.search(line)
                if match:
                    url.append(match.group(1))
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout_s) or not url:
            self.close()
            raise RuntimeError(f"{' '.join(command[:4])} ... did not start:\n{''.join(self.output[-30:])}")
        self.url = url[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        """Its child processes' pids (embedding servers, Redis), whichever of its threads started
        them (a supervisor thread restarts servers)."""
        pids: list[int] = []
        for path in Path(f"/proc/{self.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                pids.extend(int(p) for p in path.read_text().split())
        return sorted(pids)

    def close(self, grace_s: float = 30.0) -> None:
        """SIGTERM (it stops what it started), then SIGKILL after `grace_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> AnnouncedProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def exit_when_stdin_closes(grace_s: float = 10.0) -> None:
    """In the child: when stdin reaches its end (the parent closed it, or died), stop as on
    SIGTERM (closing what it started); exit outright if that takes over `grace_s`."""

    def watch() -> None:
        while os.read(0, 4096):  # unbuffered: a buffered reader would block interpreter shutdown
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
