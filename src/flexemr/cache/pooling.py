"""The cache's share of a batch's pooling: sums of the cached rows per bag.

The ranker pools a batch into `pooled` float32 [T*B, D] (bag = table * B + sample). Its indices,
flattened table-major, each carry a bag id and a global key:

    keys    [N] int64   table_base[table] + row
    bag_ids [N] int64   repeat(arange(T*B), lengths)      (non-decreasing: a bag is a run)

`cached_partial_sums` looks every key up once: the hits are summed per bag here (one
`embedding_bag` over the cache's rows, misses reading its zero row), the misses are what the
ranker sends to the embedding servers. Sums, never means: for mean pooling the ranker divides the
total (cache part + server partials) by the full bag length.

    pooled[bag] = sum(rows of hits in bag) + sum(server partials of bag)      (exact, fp32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexemr.cache.row_cache import RowCache


@dataclass(frozen=True)
class CachedPart:
    hit: Tensor
    """bool [N]: served from the cache. Send only `keys[miss]` / `bag_ids[miss]` remotely."""
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


def bag_offsets(bag_ids: Tensor, num_bags: int) -> Tensor:
    """int64 [num_bags + 1]: where each bag's run starts in `bag_ids` [N], then N."""
    if bag_ids.numel() and (
        bool(bag_ids[0] < 0) or bool(bag_ids[-1] >= num_bags) or bool((bag_ids[1:] < bag_ids[:-1]).any())
    ):
        raise ValueError(f"bag_ids must be non-decreasing and in [0, {num_bags}), as in the KJT layout")
    return torch.searchsorted(bag_ids, torch.arange(num_bags + 1, device=bag_ids.device))


def cached_partial_sums(
    cache: RowCache, bag_ids: Tensor, keys: Tensor, num_bags: int, out: Tensor | None = None
) -> CachedPart:
    """Look up `keys` [N] (marking hits used) and sum the hit rows per bag into `out` [num_bags,
    dim] (accumulated in place when given, so the ranker can pass its `pooled` buffer; a new
    tensor otherwise). Everything stays on the cache's device."""
    if bag_ids.shape != keys.shape:
        raise ValueError(f"bag_ids {list(bag_ids.shape)} and keys {list(keys.shape)} must match")
    if out is not None and out.shape != (num_bags, cache.dim):
        raise ValueError(f"out must be [{num_bags}, {cache.dim}], got {list(out.shape)}")
    offsets = bag_offsets(bag_ids.to(cache.device, torch.int64), num_bags)
    if cache.capacity_rows == 0:  # e.g. adaptive under high load: no per-key work at all
        hit = torch.zeros(keys.shape, dtype=torch.bool, device=cache.device)
        sums = torch.zeros(num_bags, cache.dim, device=cache.device) if out is None else out
        return CachedPart(hit, sums, offsets)
    hit, slot = cache.lookup(keys)
    sums = cache.bag_sums(slot, offsets[:-1])
    return CachedPart(hit, sums if out is None else out.add_(sums), offsets)
