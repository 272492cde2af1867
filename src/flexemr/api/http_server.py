"""The ranker's HTTP server: uvicorn on a listening socket bound here."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from flexemr.api.front_door import FrontDoor
from flexemr.api.http import RateLimitedWarnings, create_app
from flexemr.api.http_protocol import infer_protocol

SCORING_THREADS = 16
"""Requests scored at once (each takes a turn for its Python; waits, such as lookups, overlap)."""


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def http_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The HTTP listening socket, with TCP_NODELAY. Without it Nagle holds each response body back
    until the client's delayed ACK of the headers (+40 ms per keep-alive request). asyncio sets it
    only on sockets whose protocol number is IPPROTO_TCP (create_server's is 0); accepted sockets
    inherit it from the listener. With `reuse_port`, several rankers listen on one address and the
    kernel spreads new connections over them (SO_REUSEPORT)."""
    listener = socket.create_server((host, port), backlog=1024, reuse_port=reuse_port)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


class HttpServer:
    """uvicorn on a socket we bind ourselves, so port 0 works and the real port is known at once."""

    def __init__(self, door: FrontDoor, host: str, port: int, reuse_port: bool = False) -> None:
        self.socket = http_listener(host, port, reuse_port)
        self.host = host
        self.port = self.socket.getsockname()[1]
        self.workers = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="infer")
        app = create_app(door, self.workers)
        logging.getLogger("uvicorn.error").addFilter(RateLimitedWarnings())  # clients' bad HTTP
        httptools = door.config.http_parser == "httptools"
        config = uvicorn.Config(
            app.asgi,
            http=infer_protocol(app.route, self.workers) if httptools else "h11",
            loop="uvloop" if httptools else "asyncio",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (main thread) or `stop()`.

        uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM then turns into
        SystemExit here, so the caller's cleanup (stopping child processes) still runs."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.server.run(sockets=[self.socket])
        except (KeyboardInterrupt, SystemExit):
            pass

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="http")
        self._thread.start()
        self.wait_started()

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()
        self.workers.shutdown(wait=False)
