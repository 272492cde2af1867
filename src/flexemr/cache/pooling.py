"""Global pooling's cached part: a batch's hit rows summed per bag on the cache's device.

The ranker pools a batch into `pooled` float32 [T*B, D] (bag = table * B + sample). Its N indices,
flattened table-major, each carry a global key, and the bags are runs of them (KJT offsets):

    keys    [N]     int64   table_base[table] + row
    offsets [T*B+1] int64   bag b is keys[offsets[b]:offsets[b + 1]]; offsets[-1] = N

`cached_partial_sums` looks every key up once: the hits are summed per bag here (one
`embedding_bag` over the cache's rows, misses reading its zero row), the misses are what the
ranker sends to the embedding servers. Sums, never means: for mean pooling the ranker divides the
total (cache part + server partials) by the full bag length.

    pooled[bag] = sum(rows of hits in bag) + sum(server partials of bag)      (exact, fp32)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from flexemr.cache.row_cache import RowCache


@dataclass(frozen=True)
class CachedPart:
    hit: Tensor
    """bool [N]: served from the cache. Send only `keys[miss]` remotely."""
    sums: Tensor
    """float32 [num_bags, dim]: per bag, the sum of its cached rows (zero where none)."""
    offsets: Tensor
    """int64 [num_bags + 1]: bag b's keys are positions offsets[b] to offsets[b + 1] - 1."""

    @property
    def miss(self) -> Tensor:
        return ~self.hit

    @property
    def hits(self) -> int:
        return int(torch.count_nonzero(self.hit))  # far cheaper than sum() on a CPU bool tensor

    @cached_property
    def miss_lengths(self) -> Tensor:
        """int64 [num_bags]: each bag's misses, i.e. the bags the servers still see."""
        return lengths_of(self.miss, self.offsets)


def lengths_of(mask: Tensor, offsets: Tensor) -> Tensor:
    """int64 [num_bags]: per bag of KJT `offsets`, how many of its keys `mask` [N] selects (e.g.
    the misses: the bags the servers still see)."""
    before = torch.zeros(mask.numel() + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask, 0, out=before[1:])
    return before[offsets[1:]] - before[offsets[:-1]]


def cached_partial_sums(
    cache: RowCache, keys: Tensor, offsets: Tensor, out: Tensor | None = None
) -> CachedPart:
    """Look up `keys` [N] (marking hits used) and sum the hit rows of each bag of `offsets`
    [num_bags + 1] into `out` [num_bags, dim] (accumulated in place when given, so the ranker can
    pass its `pooled` buffer; a new tensor otherwise). Everything stays on the cache's device."""
    offsets = offsets.to(cache.device, torch.int64)
    num_bags = offsets.numel() - 1
    if (
        offsets.ndim != 1
        or num_bags < 0
        or bool(offsets[0] != 0)
        or bool(offsets[-1] != keys.numel())
        or bool((offsets[1:] < offsets[:-1]).any())
    ):
        raise ValueError(f"offsets must be non-decreasing from 0 to {keys.numel()} (the number of keys)")
    if out is not None and out.shape != (num_bags, cache.dim):
        raise ValueError(f"out must be [{num_bags}, {cache.dim}], got {list(out.shape)}")
    if cache.capacity_rows == 0:  # e.g. adaptive under high load: no per-key work at all
        hit = torch.zeros(keys.shape, dtype=torch.bool, device=cache.device)
        sums = torch.zeros(num_bags, cache.dim, device=cache.device) if out is None else out
        return CachedPart(hit, sums, offsets)
    hit, slot = cache.lookup(keys)
    sums = cache.bag_sums(slot, offsets[:-1])
    return CachedPart(hit, sums if out is None else out.add_(sums), offsets)
