"""The ranker's embedding cache tuning (a spec's `cache` section): the cache itself, its load
monitor and its cost gate (`flexemr.cache`)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_WAYS = 4
"""Ways per set. A lookup costs about 10 ns per key per way on a CPU (gather, compare, max); with
Zipf traffic 4 ways hit within about a point of 16, at a third of the cost."""


@dataclass(frozen=True)
class CostGateConfig:
    probe_every: int = 16
    """Every this many batches, one goes to the arm currently not chosen."""
    probe_max_keys: int = 1 << 18
    """Batches with more keys are never probes (nor warm-up batches once both arms are measured)."""
    warmup: int = 4
    """Measurements per arm before choosing by cost (alternating until then)."""
    smoothing: float = 0.2
    """Weight of the newest measurement in each arm's mean."""
    margin: float = 0.1
    """Switch arms only when the other is cheaper by this fraction."""

    def __post_init__(self) -> None:
        if self.probe_every < 2:
            raise ValueError(f"probe_every must be >= 2, got {self.probe_every}")
        if self.probe_max_keys < 1:
            raise ValueError(f"probe_max_keys must be >= 1, got {self.probe_max_keys}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class LoadMonitorConfig:
    window_s: float = 1.0
    """Length of the sliding window over recent batches."""
    enter_high: float = 0.75
    """Enter HIGH when the window's mean (batch + queue) reaches this fraction of `max_batch`."""
    exit_high: float = 0.4
    """Leave HIGH when it falls to this fraction (below `enter_high`: the hysteresis band)."""
    min_dwell_s: float = 2.0
    """Least time in a state before leaving it."""

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if not 0 <= self.exit_high < self.enter_high:
            raise ValueError(
                f"need 0 <= exit_high < enter_high, got exit_high={self.exit_high}, "
                f"enter_high={self.enter_high}"
            )
        if self.min_dwell_s < 0:
            raise ValueError(f"min_dwell_s must be >= 0, got {self.min_dwell_s}")


@dataclass(frozen=True)
class CacheConfig:
    """The tuning of the ranker's embedding cache (a spec's `cache` section). Whether there is one
    and its size (`RankerConfig.cache`), its device budget, the lookup mode and the largest batch
    are the ranker section's, given to the cache beside this."""

    ways: int = DEFAULT_WAYS
    """Associativity: rows one set holds (LRU within a set)."""
    max_bytes: int | None = None
    """`adaptive`: never grow beyond this (None: as far as the memory model allows)."""
    min_bytes: int = 256 << 10
    """`adaptive`: a smaller budget gives no cache at all. A lookup costs the same per key whatever
    the cache's size, so a sliver (what a full batch leaves) costs more than its few hits save."""
    grow_threshold: float = 0.1
    """`adaptive`: grow only when the budget exceeds the capacity by this fraction (shrinks are
    immediate), so small budget changes do not rebuild the cache."""
    grow_after_s: float = 5.0
    """`adaptive`: no grow within this long after a shrink. Shrinks are immediate (the batch
    needs the memory now); growing back slowly keeps a bursty load from resizing the cache every
    second (a resize copies the cache and holds up lookups meanwhile)."""
    safety_margin_bytes: int = 64 << 20
    """Held back from the cache beyond parameters and activations."""
    sketch_width: int = 1 << 16
    """Counters per sketch row (a power of two)."""
    sketch_depth: int = 4
    """Sketch rows (independent hashes)."""
    sketch_candidates: int = 4096
    """Heavy-hitter candidates tracked for warming."""
    sketch_half_life: float = 1e6
    """Observed keys after which a count weighs half."""
    sketch_sample: int = 1 << 12
    """Keys of one batch the sketch counts at most (a strided sample, each weighing
    batch / sample): bounds its cost on big batches."""
    load: LoadMonitorConfig = field(default_factory=LoadMonitorConfig)
    """Load detection (window, thresholds, dwell)."""
    gate: CostGateConfig | None = field(default_factory=CostGateConfig)
    """`adaptive`: the A/B test that bypasses the cache where consulting it makes lookups slower
    (see `cost_gate`); None: always consult it."""

    def __post_init__(self) -> None:
        if self.grow_threshold < 0:
            raise ValueError(f"grow_threshold must be >= 0, got {self.grow_threshold}")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")
        if self.grow_after_s < 0:
            raise ValueError(f"grow_after_s must be >= 0, got {self.grow_after_s}")
