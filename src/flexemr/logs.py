"""Log lines that a remote peer can cause, kept to a rate: a client that sends bad input in a loop
must not fill the logs."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedWarnings(logging.Filter):
    """Lets at most one warning of each kind through per `interval_s`; errors always pass.

    The kind is the record's `rate_key` (`log.warning(..., extra={"rate_key": reason})`), else its
    message template: uvicorn logs one warning for every malformed HTTP request, an embedding server
    one for every peer it refuses, and a client can cause either in a loop."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._next: dict[object, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = getattr(record, "rate_key", record.msg)
        with self._lock:
            now = time.monotonic()
            if now < self._next.get(key, 0.0):
                return False
            self._next[key] = now + self.interval_s
            return True
