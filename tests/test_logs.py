"""Peer-caused log lines are kept to a rate, each kind on its own."""

from __future__ import annotations

import logging

from flexemr.logs import RateLimitedWarnings


def record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("flexemr.test", level, __file__, 1, message, (), None)
    made.__dict__.update(extra)
    return made


def test_each_kind_of_warning_has_its_own_rate() -> None:
    limit = RateLimitedWarnings(interval_s=3600)
    flood = [limit.filter(record("refused (%s)", rate_key="malformed handshake")) for _ in range(5)]
    assert flood == [True, False, False, False, False]
    assert limit.filter(record("refused (%s)", rate_key="out of file descriptors"))  # another reason
    assert limit.filter(record("Invalid HTTP request received."))  # no key: its template is the kind
    assert not limit.filter(record("Invalid HTTP request received."))
    assert limit.filter(record("refused (%s)", logging.ERROR, rate_key="malformed handshake"))
