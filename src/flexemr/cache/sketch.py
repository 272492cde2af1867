"""Which rows are hot: a count-min sketch with conservative update and exponential aging, plus a
short list of heavy-hitter candidates (the sketch alone cannot enumerate keys).

    counts float32 [depth, width]     counter of key k in row r: counts[r, h_r(k) % width]
    estimate(k) = min_r counts[r, h_r(k)]            (never below the true, aged count)

A batch is counted at once: each distinct key with count c raises its counters to at least
`estimate + c` (conservative update: counters that already over-count are left alone, which
keeps collisions from inflating cold keys). Before each batch all counters are multiplied by
`0.5 ** (batch_keys / half_life)`, so a key's weight halves every `half_life` observed keys and
the sketch follows a drifting hot set. A batch of more than `sample` keys is counted from a
strided sample of about `sample` of them, each weighing batch / sample: the distinct-key sort
dominates the cost and grows with the batch, while hot rows stand out in a sample just as well
(estimates of rare keys become noisy, and may undercount).

Candidates: the `candidates` keys with the highest estimates among the previous candidates and
the batch's keys, re-ranked every batch with `topk`. Given the cache's `contains`, keys already
cached are left out: they need no warming, and keeping them would cap what warming can ever fill
at `candidates` rows however big the cache.

Not thread-safe: `AdaptiveCacheManager` serialises access.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flexemr.cache.hashing import SKETCH_MULTIPLIERS, mix


class FrequencySketch:
    def __init__(
        self,
        width: int = 1 << 16,
        depth: int = 4,
        candidates: int = 4096,
        half_life: float = 1e6,
        device: torch.device | str = "cpu",
        sample: int = 1 << 12,
    ) -> None:
        if width < 1 or width & (width - 1):
            raise ValueError(f"width must be a power of two, got {width}")
        if not 1 <= depth <= len(SKETCH_MULTIPLIERS):
            raise ValueError(f"depth must be in [1, {len(SKETCH_MULTIPLIERS)}], got {depth}")
        if candidates < 1:
            raise ValueError(f"candidates must be positive, got {candidates}")
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life}")
        if sample < 1:
            raise ValueError(f"sample must be positive, got {sample}")
        self.width, self.depth, self.capacity, self.half_life = width, depth, candidates, half_life
        self.sample = sample
        self.device = torch.device(device)
        self.counts = torch.zeros(depth, width, device=self.device)
        self.candidates = torch.empty(0, dtype=torch.int64, device=self.device)

    def _index(self, keys: Tensor) -> Tensor:
        """[depth, N] counter positions of `keys`."""
        return torch.stack([mix(keys, m) & (self.width - 1) for m in SKETCH_MULTIPLIERS[: self.depth]])

    def estimate(self, keys: Tensor) -> Tensor:
        """float32 [N]: aged frequency estimates (upper bounds of the aged true counts, when no
        batch was sampled)."""
        keys = keys.to(self.device, torch.int64)
        if keys.numel() == 0:
            return torch.zeros(0, device=self.device)
        return self.counts.gather(1, self._index(keys)).min(dim=0).values

    def take_sample(self, keys: Tensor) -> tuple[Tensor, int]:
        """(a strided sample of at most `sample` of a batch's keys, as a new tensor; the batch's
        size): what `observe` needs of the batch, cheap enough for the request path."""
        keys = keys.reshape(-1)
        step = max(1, -(-keys.numel() // self.sample))
        return keys[::step].to(self.device, torch.int64, copy=True), keys.numel()

    def observe(
        self, keys: Tensor, cached: Callable[[Tensor], Tensor] | None = None, total: int | None = None
    ) -> None:
        """Count one batch of keys (duplicates count once each), or a sample of one standing for
        `total` keys; candidates leave out keys where `cached(keys)` is True."""
        if total is None:
            keys, total = self.take_sample(keys)
        keys = keys.to(self.device, torch.int64).reshape(-1)
        if keys.numel() == 0:
            return
        self.counts *= 0.5 ** (total / self.half_life)
        distinct, counts = torch.unique(keys, return_counts=True)
        index = self._index(distinct)
        weight = total / keys.numel()
        raised = self.counts.gather(1, index).min(dim=0).values + counts.to(self.counts.dtype) * weight
        self.counts.scatter_reduce_(1, index, raised.expand(self.depth, -1), reduce="amax")

        pool = torch.unique(torch.cat([self.candidates, distinct]))
        if cached is not None:
            pool = pool[~cached(pool)]
        top = torch.topk(self.estimate(pool), min(self.capacity, pool.numel())).indices
        self.candidates = pool[top]

    def hottest_missing(self, k: int, cached: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Up to `k` candidate keys, hottest first, leaving out those where `cached(keys)` is True
        (pass the cache's `contains`); with no `cached`, simply the hottest keys."""
        keys = self.candidates
        if cached is not None and keys.numel():
            keys = keys[~cached(keys)]
        if keys.numel() == 0 or k <= 0:
            return keys[:0]
        return keys[torch.topk(self.estimate(keys), min(k, keys.numel())).indices]

    def clear(self) -> None:
        self.counts.zero_()
        self.candidates = self.candidates[:0]
