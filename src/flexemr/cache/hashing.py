"""Multiplicative hashing of global row keys, shared by the row cache (set index) and the sketch.

Keys are non-negative int64 (`table_base[table] + row`). The hash folds the high bits into 31 bits
and multiplies by a 32-bit odd constant, so the product stays below 2**63: no int64 overflow on any
device. The low 16 bits of the product are dropped (they mix poorly).
"""

from __future__ import annotations

from torch import Tensor

GOLDEN = 0x9E3779B1
"""Knuth's multiplicative constant (2**32 / phi, odd)."""

SKETCH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646C | 1)
"""Independent odd multipliers, one per sketch row."""


def _fold(keys: Tensor) -> Tensor:
    """31 bits of each key, its high bits folded in: times a 32-bit constant, below 2**63."""
    return (keys ^ (keys >> 31)) & 0x7FFFFFFF


def mix(keys: Tensor, multiplier: int = GOLDEN) -> Tensor:
    """A non-negative int64 hash of each key (up to 47 bits)."""
    return (_fold(keys) * multiplier) >> 16


def bucket(keys: Tensor, buckets: int) -> Tensor:
    """int64 in [0, buckets), for `buckets` < 2**31: Knuth's multiplicative hash modulo 2**32,
    whose high bits mix well, scaled to the range by multiply-shift (Lemire's fastrange) instead
    of an integer division (which would cost a third of a cache lookup)."""
    return (((_fold(keys) * GOLDEN) & 0xFFFFFFFF) * buckets) >> 32
