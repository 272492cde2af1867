"""The cache's share of a batch's pooling: sums of the cached rows per bag.

The ranker pools a batch into `pooled` float32 [T*B, D] (bag = table * B + sample). Its indices,
flattened table-major, each carry a bag id and a global key:

    keys    [N] int64   table_base[table] + row
    bag_ids [N] int64   repeat(arange(T*B), lengths)

`cached_partial_sums` looks every key up once: the hits are summed per bag here (`index_add_`),
the misses are what the ranker sends to the embedding servers. Sums, never means: for mean
pooling the ranker divides the total (cache part + server partials) by the full bag length.

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

    @property
    def miss(self) -> Tensor:
        return ~self.hit

    @property
    def hits(self) -> int:
        return int(self.hit.sum())


def cached_partial_sums(
    cache: RowCache, bag_ids: Tensor, keys: Tensor, num_bags: int, out: Tensor | None = None
) -> CachedPart:
    """Look up `keys` [N] (marking hits used) and sum the hit rows per bag into `out` [num_bags,
    dim] (accumulated in place when given, so the ranker can pass its `pooled` buffer; a new
    zero tensor otherwise). Everything stays on the cache's device."""
    if bag_ids.shape != keys.shape:
        raise ValueError(f"bag_ids {list(bag_ids.shape)} and keys {list(keys.shape)} must match")
    if out is None:
        out = torch.zeros(num_bags, cache.dim, device=cache.device)
    elif out.shape != (num_bags, cache.dim):
        raise ValueError(f"out must be [{num_bags}, {cache.dim}], got {list(out.shape)}")
    hit, slot = cache.lookup(keys)
    rows = cache.gather(slot[hit])
    out.index_add_(0, bag_ids.to(cache.device, torch.int64)[hit], rows.to(out.dtype))
    return CachedPart(hit, out)
