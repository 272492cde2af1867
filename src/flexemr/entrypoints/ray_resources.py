"""What flexemr's processes ask Ray for, from the sharding plan (no Ray needed: the KubeRay recipe's
test checks its node sizes against these)."""

from __future__ import annotations

from flexemr.config.plan import ShardingPlan

PROCESS_BYTES = 512 * 2**20
"""Memory an embedding server process needs beyond its rows (interpreter, torch, buffers)."""
ROW_OVERHEAD = 1.1
"""Rows are held with some slack (huge-page rounding, load-time copies of a shard's slice)."""


def server_memory(plan: ShardingPlan) -> list[int]:
    """Bytes each embedding server asks Ray for: its rows with slack, plus the process itself."""
    return [int(b * ROW_OVERHEAD) + PROCESS_BYTES for b in plan.server_bytes()]


def replica_groups(plan: ShardingPlan) -> list[list[int]]:
    """Servers holding the same shards (replicas of each other), which must land on distinct nodes."""
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for server in range(plan.num_servers):
        key = tuple(
            sorted((s.table, s.row_start, s.row_end, *s.columns(plan.dim)) for s in plan.shards_of(server))
        )
        groups.setdefault(key, []).append(server)
    return list(groups.values())
