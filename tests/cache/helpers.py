"""Factories for cache tests: random KeyedJaggedTensor-layout batches and a reference pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass
class Batch:
    indices: Tensor
    """int64 [N] table-major rows."""
    lengths: Tensor
    """int32 [T*B] bag sizes, lengths[t*B + b]."""
    keys: Tensor
    """int64 [N] global keys."""
    bag_ids: Tensor
    """int64 [N] bag of each index."""
    batch_size: int

    @property
    def offsets(self) -> Tensor:
        """int64 [T*B + 1] KJT offsets of the bags."""
        return F.pad(torch.cumsum(self.lengths.long(), 0), (1, 0))


def make_tables(table_rows: tuple[int, ...], dim: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=gen) for rows in table_rows]


def table_base(table_rows: tuple[int, ...]) -> Tensor:
    rows = torch.tensor(table_rows, dtype=torch.int64)
    return torch.cumsum(rows, 0) - rows


def make_batch(
    table_rows: tuple[int, ...], batch_size: int, max_bag: int, gen: torch.Generator, zipf: float = 1.2
) -> Batch:
    """Bags of 0..max_bag rows (empty bags included), rows drawn with a power-law skew."""
    num_tables = len(table_rows)
    lengths = torch.randint(0, max_bag + 1, (num_tables * batch_size,), generator=gen, dtype=torch.int32)
    per_table = lengths.view(num_tables, batch_size).sum(1)
    parts = []
    for rows, n in zip(table_rows, per_table.tolist(), strict=True):
        weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** zipf
        parts.append(torch.multinomial(weights, n, replacement=True, generator=gen))
    indices = torch.cat(parts).to(torch.int64)
    keys = indices + torch.repeat_interleave(table_base(table_rows), per_table)
    bag_ids = torch.repeat_interleave(torch.arange(num_tables * batch_size), lengths.to(torch.int64))
    return Batch(indices, lengths, keys, bag_ids, batch_size)


def rows_of(tables: list[Tensor], keys: Tensor) -> Tensor:
    """Source rows of global keys."""
    return torch.cat(tables)[keys]


def reference_pool(tables: list[Tensor], batch: Batch, mode: str) -> Tensor:
    """[T*B, D] with torch's embedding_bag, table by table."""
    num_tables = len(tables)
    per_table = batch.lengths.view(num_tables, batch.batch_size).to(torch.int64)
    out = []
    chunks = torch.split(batch.indices, per_table.sum(1).tolist())
    for table, idx, lens in zip(tables, chunks, per_table, strict=True):
        offsets = torch.cumsum(lens, 0) - lens
        out.append(F.embedding_bag(idx, table, offsets, mode=mode))
    return torch.cat(out)


def pool_with_cache(
    cached_sums: Tensor, hit: Tensor, tables: list[Tensor], batch: Batch, mode: str
) -> Tensor:
    """What the ranker does: cached sums + the 'servers' sums of the misses, then mean divides."""
    miss = ~hit
    pooled = cached_sums.clone()
    pooled.index_add_(0, batch.bag_ids[miss], rows_of(tables, batch.keys[miss]))
    if mode == "mean":
        pooled /= batch.lengths.clamp(min=1).to(pooled.dtype).unsqueeze(1)
    return pooled
