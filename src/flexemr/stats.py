"""Typed stats numbers: what a number means decides how `/metrics` exports it, never its name.

Components report their stats as nested dicts (JSON at `/v2/stats`). A number that only ever grows
(events, bytes moved) is a `Count` and becomes a Prometheus counter; every other number (sizes,
depths, rates, states) is a gauge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Count(int):
    """A monotonic count since start (requests, bytes sent, hits...): a Prometheus counter.

    It is an `int` everywhere else (JSON, arithmetic); arithmetic gives back a plain int, so wrap
    sums where they are reported."""


def counts(values: Mapping[str, int]) -> dict[str, Any]:
    """`values` (all monotonic counts, e.g. a counters dataclass's fields) as `Count`s."""
    return {key: Count(value) for key, value in values.items()}
