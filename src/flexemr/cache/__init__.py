"""The ranker's adaptive embedding cache (DESIGN.md technique 3).

One concept per module:

- `row_cache`: `RowCache`, a set-associative, LRU-by-timestamp cache of rows in device memory.
- `pooling`: `cached_partial_sums`, the cache's per-bag sums of a batch and its hit mask.
- `sketch`: `FrequencySketch`, count-min with conservative update and aging; hottest missing rows.
- `load_monitor`: `LoadMonitor`, a pure sliding-window HIGH/LOW policy with hysteresis and dwell.
- `memory_model`: `MemoryModel`, the dense network's memory by batch size; the cache's budget.
- `cost_gate`: `CostGate`, a pure A/B policy: consult the cache only where it speeds lookups up.
- `manager`: `AdaptiveCacheManager`, all of the above behind a thread-safe per-batch API.

Its tuning (`CacheConfig`, `LoadMonitorConfig`, `CostGateConfig`) is in `flexemr.config.cache`.
"""

from flexemr.cache.cost_gate import CostGate
from flexemr.cache.load_monitor import LoadDecision, LoadMonitor
from flexemr.cache.manager import AdaptiveCacheManager, CacheStats, ResizeEvent, WarmRequest
from flexemr.cache.memory_model import MemoryModel
from flexemr.cache.pooling import CachedPart, cached_partial_sums
from flexemr.cache.row_cache import RowCache
from flexemr.cache.sketch import FrequencySketch

__all__ = [
    "AdaptiveCacheManager",
    "CacheStats",
    "CachedPart",
    "CostGate",
    "FrequencySketch",
    "LoadDecision",
    "LoadMonitor",
    "MemoryModel",
    "ResizeEvent",
    "RowCache",
    "WarmRequest",
    "cached_partial_sums",
]
