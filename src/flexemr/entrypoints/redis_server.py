"""Start a throwaway `redis-server` on 127.0.0.1 (persistence off) for the Redis-tier baseline."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from flexemr.extras import needs_extra

with needs_extra("redis"):
    import redis


class RedisServer:
    def __init__(self, host: str = "127.0.0.1", maxmemory: str = "8gb") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        with socket.socket() as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://{host}:{self.port}/0"
        self._proc = subprocess.Popen(
            [binary, "--bind", host, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--maxmemory", maxmemory, "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
