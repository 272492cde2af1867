"""An embedding server's lookups per row range: exact counts of what was looked up, per (table,
rows) part, whatever the shards' layout, or a sample's estimates, in process and over real
connections."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from flexemr.config import NodeLimits
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.embedding_server import range_counts
from flexemr.embedding_server.range_counts import RangeCounts, range_rows
from flexemr.sharding.plan import make_plan, with_local_offsets
from tests.engine.helpers import burst, thread_servers


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("path", ["aligned", "split", "searchsorted"])
def test_counts_are_exact_per_part_and_parts_name_the_rows(
    dtype: type, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aligned: buckets of one row, on which every shard starts; split: too many of those allowed,
    # buckets of 8 rows (shard starts inside some); searchsorted: buckets longer than a shard
    monkeypatch.setattr(range_counts, "MAX_PARTS", {"aligned": 2**17, "split": 1024, "searchsorted": 8}[path])
    capped = path != "aligned"  # a bucket may span several grid ranges
    table_rows = (5000, 300, 7000)
    # server 0 holds odd-sized pieces (shard starts fall inside buckets) and two copies' worth
    shards = [Shard(0, 0, 1234, 0), Shard(2, 4000, 7000, 0), Shard(1, 0, 300, 0), Shard(0, 1234, 5000, 1)]
    shards += [Shard(2, 0, 4000, 1), Shard(1, 0, 300, 1), Shard(2, 4000, 7000, 1)]
    plan = ShardingPlan(2, table_rows, 4, with_local_offsets(shards))
    mine = plan.shards_of(0)
    counts = RangeCounts(mine, table_rows, 4)
    assert (counts._aligned, counts._first_part is None) == (path == "aligned", path != "split")
    rng = np.random.default_rng(0)
    local = [rng.integers(0, plan.server_rows(0), size=n).astype(dtype) for n in (1, 500, 20_000, 0)]
    for rows in local:
        counts.expect()
        counts.count(rows)
    stats = counts.stats()
    every = np.concatenate(local)
    assert stats["lookups"] == every.size and stats["skipped"] == 0
    assert stats["table_rows"] == list(table_rows) and stats["range_rows"] == [
        range_rows(r) for r in table_rows
    ]
    # each local row as (table, table row), counted by brute force
    truth: dict[tuple[int, int], int] = {}
    for shard in mine:
        inside = every[(every >= shard.local_start) & (every < shard.local_start + shard.rows)]
        for row, n in zip(
            *np.unique(inside - shard.local_start + shard.row_start, return_counts=True), strict=True
        ):
            truth[(shard.table, int(row))] = int(n)
    seen = 0
    for table, start, end, n in stats["ranges"]:
        assert n > 0 and (capped or end - start <= range_rows(table_rows[table]))
        assert n == sum(truth.get((table, r), 0) for r in range(start, end)), (table, start, end)
        seen += n
    assert seen == every.size


def test_a_row_wise_servers_parts_cover_its_shards() -> None:
    plan = make_plan("row", (100_000, 3), 8, 2)
    counts = RangeCounts(plan.shards_of(1), plan.table_rows, plan.dim)
    counts.expect()
    counts.count(np.arange(plan.server_rows(1), dtype=np.int32))  # every row once
    stats = counts.stats()
    held = {(s.table, r) for s in plan.shards_of(1) for r in range(s.row_start, s.row_end)}
    assert sum(end - start for _, start, end, _ in stats["ranges"]) == len(held)
    assert all(n == end - start for _, start, end, n in stats["ranges"])


def test_counters_stay_small_for_big_tables_beside_tiny_ones() -> None:
    """DLRM-v2's shapes: 40M-row tables beside 3-row ones; the counters stay bounded in number."""
    table_rows = (40_000_000, 3, 39_000_000, 5)
    plan = make_plan("row", table_rows, 8, 2)
    counts = RangeCounts(plan.shards_of(0), table_rows, 8)
    assert counts._counts.size <= range_counts.MAX_PARTS + len(plan.shards_of(0))
    counts.expect()
    counts.count(np.array([0, 1, plan.server_rows(0) - 1], dtype=np.int64))
    assert counts.stats()["lookups"] == 3


def test_round_tables_count_by_bucket_alone_at_the_planners_grid() -> None:
    """rmc1's layout (tables of 40,000 rows back to back): parts are the buckets of `row >> bits`,
    none longer than a grid range, and every row lands in its own table's part."""
    table_rows = (40_000,) * 4
    plan = make_plan("table", table_rows, 8, 2)
    counts = RangeCounts(plan.shards_of(0), table_rows, 8)
    assert counts._aligned
    counts.expect()
    counts.count(np.arange(plan.server_rows(0), dtype=np.int32))
    stats = counts.stats()
    assert all(
        0 < end - start <= range_rows(40_000) and n == end - start for _, start, end, n in stats["ranges"]
    )
    assert sorted({table for table, *_ in stats["ranges"]}) == [s.table for s in plan.shards_of(0)]
    assert stats["lookups"] == plan.server_rows(0)


def test_stats_wait_for_the_lookups_answered_before_them() -> None:
    """A lookup is announced before its answer goes out and counted after: stats asked for in
    between (by a client that already has the answer) include it."""
    plan = make_plan("table", (1000, 1000), 8, 1)
    counts = RangeCounts(plan.shards_of(0), plan.table_rows, 8)
    counts.expect()
    late = threading.Thread(target=lambda: (time.sleep(0.2), counts.count(np.arange(10, dtype=np.int32))))
    late.start()
    assert counts.stats()["lookups"] == 10
    late.join()


def test_a_sample_counts_one_subrequest_in_n_each_row_n_times() -> None:
    """One subrequest in 4 is counted, at random, each of its rows as 4 lookups: the counts are
    estimates whose shares follow the traffic's (a hot range's half of the lookups stays half)."""
    plan = make_plan("table", (1024, 1024), 8, 1)
    counts = RangeCounts(plan.shards_of(0), plan.table_rows, 8, sample=4, seed=1)
    rng = np.random.default_rng(2)
    subrequests = 4000
    counted = 0
    for _ in range(subrequests):
        rows = rng.integers(8, plan.server_rows(0), size=20).astype(np.int32)  # never row 7 but:
        rows[:10] = 7  # half of every subrequest's rows: row 7, grid range 7 of table 0
        if counts.expect():
            counts.count(rows)
            counted += 1
    stats = counts.stats()
    assert stats["sample"] == 4 and stats["skipped"] == 0
    assert 900 <= counted <= 1100  # 1000 expected (binomial, sd 27; the seed fixes it)
    assert stats["lookups"] == 4 * 20 * counted
    assert all(n % 4 == 0 for *_, n in stats["ranges"])
    hot = sum(n for table, start, _, n in stats["ranges"] if table == 0 and start == 7)
    assert hot == stats["lookups"] // 2  # every counted subrequest looked row 7 up 10 times
    # the estimate of all lookups is within 10% of the truth
    assert abs(stats["lookups"] - 20 * subrequests) <= 0.1 * 20 * subrequests


def test_a_sample_of_one_counts_every_subrequest_and_a_sample_below_one_is_refused() -> None:
    plan = make_plan("table", (1000,), 8, 1)
    counts = RangeCounts(plan.shards_of(0), plan.table_rows, 8, sample=1)
    assert all(counts.expect() for _ in range(100))
    with pytest.raises(ValueError, match="N >= 1"):
        RangeCounts(plan.shards_of(0), plan.table_rows, 8, sample=0)


def test_a_server_counts_the_sample_its_limits_ask_for() -> None:
    """Over real connections: servers with `range_sample` 8 answer every lookup, count about one
    in 8 and say so in the stats the ranker gathers."""
    with thread_servers(2, limits=NodeLimits(range_sample=8, heartbeat_timeout_s=10.0)) as servers:
        engine = servers.engine()
        try:
            subs = burst(engine, servers, 800, seed=3)  # raw lookups count their rows too
            for server in range(2):
                rows = sum(request.rows.size for s, request in subs if s == server)
                stats = engine.server_credit_stats(server)["ranges"]
                assert stats["sample"] == 8 and stats["lookups"] % 8 == 0
                assert servers.servers[server].lookups == sum(s == server for s, _ in subs)
                # about 50 of ~400 subrequests counted: the estimate lands within half of the truth
                assert stats["lookups"] > 0 and abs(stats["lookups"] - rows) < rows / 2
        finally:
            engine.close()
