"""The cluster's lookups per row range: each embedding server's counts, gathered for the planner.

Embedding servers count the rows they look up per range of a fixed grid
(`flexemr.embedding_server.range_counts`) and send the counts with their control channel's stats.
The ranker's `GET /v2/stats/ranges` gathers them from every server it is connected to, which is
what `flexemr plan --from-stats URL` reads (or a saved copy of it, `--from-stats FILE`).
"""

from __future__ import annotations

from typing import Any

from flexemr.engine.engine import IoEngine
from flexemr.ranker.ranker import Ranker


def gather_range_counts(ranker: Ranker) -> dict[str, Any]:
    """The servers' counts side by side: the model's shape, the grid's rows per range of each table
    (`range_rows`, the same on every server), the lookups each server estimates from the one
    subrequest in `sample` it counted (`lookups`; `sample` 1: exact), looked up but left uncounted
    (`skipped`, always 0 but from older servers), the servers that could not be asked (`missing`),
    and every server's `[table, row_start, row_end, lookups]` parts in `ranges` (replicas' parts of
    one range add up)."""
    plan, transport = ranker.router.plan, ranker.transport
    if not isinstance(transport, IoEngine):
        raise ValueError("per-range lookup counts come from embedding servers; this ranker has none")
    lookups: list[int | None] = []
    sample: list[int | None] = []
    skipped: list[int | None] = []
    ranges: list[list[int]] = []
    grid: list[int] = []
    for server in range(plan.num_servers):
        try:
            counted = transport.server_credit_stats(server)["ranges"]
        except (ConnectionError, TimeoutError):
            lookups.append(None)
            sample.append(None)
            skipped.append(None)
            continue
        lookups.append(counted["lookups"])
        sample.append(counted.get("sample", 1))  # servers before sampling counted every lookup
        skipped.append(counted["skipped"])
        ranges.extend(counted["ranges"])
        grid = counted["range_rows"]
    return {
        "table_rows": list(plan.table_rows),
        "dim": plan.dim,
        "range_rows": grid,
        "lookups": lookups,
        "sample": sample,
        "skipped": skipped,
        "missing": [s for s, n in enumerate(lookups) if n is None],
        "ranges": ranges,
    }
