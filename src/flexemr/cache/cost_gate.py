"""Does consulting the cache make a batch's lookups faster on this hardware? A pure policy.

FlexEMR's cache pays because a hit pooled on the GPU is far cheaper than a remote lookup. Where
the cache is on a CPU beside fast embedding servers, a hit (hash, probe, gather on one core) can
cost more than the remote lookup it saves (servers pool on their own cores): the cache then only
adds latency. So `adaptive` measures both on live traffic, as an A/B test over batches:

    arm "cache"   lookup phase = cache lookup + remote lookup of the misses
    arm "bypass"  lookup phase = remote lookup of every key

Each arm's cost is an exponentially weighted mean of lookup-phase seconds per key. Each batch
goes to the cheaper arm, and every `probe_every`-th to the other one, so both estimates follow
the load (a saturated server makes remote keys dearer, and the cache worth it again). A probe
waits for a batch of at most `probe_max_keys` keys: the cost per key is the same in a small
batch, and a big batch in the slower arm would hold up everything queued behind it. It switches
only when the other arm is cheaper by `margin`, so noise does not flip it. Until both arms have
`warmup` measurements it alternates. Scores are exact in both arms.

No threads, no clock: the caller times the lookup phase and reports it.
"""

from __future__ import annotations

from flexemr.config.cache import CostGateConfig


class CostGate:
    def __init__(self, config: CostGateConfig | None = None) -> None:
        self.config = config or CostGateConfig()
        self.cost: dict[bool, float | None] = {True: None, False: None}
        """Seconds per key of the lookup phase with (True) and without (False) the cache."""
        self._measured = {True: 0, False: 0}
        self._chosen = True
        self._since_probe = 0

    @property
    def chosen(self) -> bool:
        """The arm in force: True when the cache is consulted (probes aside)."""
        return self._chosen

    def use_cache(self, keys: int) -> bool:
        """Whether the next batch, of `keys` keys, consults the cache."""
        if min(self._measured.values()) < self.config.warmup:
            return self._measured[True] <= self._measured[False]
        self._since_probe += 1
        if self._since_probe >= self.config.probe_every and keys <= self.config.probe_max_keys:
            self._since_probe = 0
            return not self._chosen
        return self._chosen

    def record(self, used_cache: bool, keys: int, seconds: float) -> None:
        """The lookup phase of a batch of `keys` keys took `seconds`, with the cache or without."""
        if keys <= 0 or seconds < 0:
            return
        per_key = seconds / keys
        old = self.cost[used_cache]
        a = self.config.smoothing
        self.cost[used_cache] = per_key if old is None else (1 - a) * old + a * per_key
        self._measured[used_cache] += 1
        with_cache, without = self.cost[True], self.cost[False]
        if with_cache is None or without is None or min(self._measured.values()) < self.config.warmup:
            return
        factor = 1 - self.config.margin
        if self._chosen and without < factor * with_cache:
            self._chosen = False
        elif not self._chosen and with_cache < factor * without:
            self._chosen = True
