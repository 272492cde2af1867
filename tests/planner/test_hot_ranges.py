"""`flexemr plan --from-stats`: hot row ranges get more copies, on distinct servers, within the
memory budget, and the load the counts measured is balanced over the servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flexemr.cli.main import main
from flexemr.embedding_server.range_counts import range_rows
from flexemr.planner import load_sharding
from flexemr.planner.hot_ranges import RangeTraffic, hot_range_plan
from flexemr.planner.inputs import InputError

TABLE_ROWS = (50_000, 20_000, 8_000, 8_000)


def skewed_stats(hot_share: float = 0.6) -> dict[str, Any]:
    """Range stats where table 0's first grid range takes `hot_share` of all lookups and the rest
    is spread evenly over every table's rows, as two servers would report them (parts split)."""
    grid = [range_rows(r) for r in TABLE_ROWS]
    total = 1_000_000
    ranges = [
        [0, 0, grid[0] // 2, int(hot_share * total) // 2],
        [0, grid[0] // 2, grid[0], int(hot_share * total) // 2],
    ]
    cold = (1 - hot_share) * total / sum(TABLE_ROWS)
    for t, rows in enumerate(TABLE_ROWS):
        for start in range(grid[t] if t == 0 else 0, rows, grid[t]):
            end = min(start + grid[t], rows)
            ranges.append([t, start, end, round(cold * (end - start))])
    return {
        "table_rows": list(TABLE_ROWS),
        "dim": 16,
        "range_rows": grid,
        "lookups": [total, 0],
        "missing": [],
        "ranges": ranges,
    }


def test_the_hot_range_gets_a_copy_on_every_server_and_the_load_is_balanced() -> None:
    traffic = RangeTraffic.from_stats(skewed_stats())
    result = hot_range_plan(traffic, num_servers=4, replicas=2, memory_budget=2.1)
    plan = result.plan
    grid0 = range_rows(TABLE_ROWS[0])
    runs = plan.copies(0)
    assert runs[0] == (0, grid0, 4)  # the hot range: on all four servers
    assert all(copies == 2 for t in range(4) for _, _, copies in plan.copies(t)[1 if t == 0 else 0 :])
    assert plan.replicas == 2 and plan.strategy == "hot-range"
    assert sum(s.rows for s in plan.shards) <= 2.1 * sum(TABLE_ROWS)
    assert "estimated" not in result.describe()  # exact counts
    # 60% of the lookups on one range: spread over 4 copies, no server takes much over a quarter
    load = result.server_load
    assert load.max() / load.mean() < 1.1
    # every copy of the hot range on its own server (the plan validates it; say it here too)
    hot_servers = [s.server for s in plan.shards if s.table == 0 and s.row_start == 0]
    assert sorted(hot_servers) == [0, 1, 2, 3]


def test_the_budget_limits_the_extra_copies_and_replicas_stay_the_floor() -> None:
    traffic = RangeTraffic.from_stats(skewed_stats())
    tight = hot_range_plan(traffic, num_servers=4, replicas=1, memory_budget=1.0)
    assert {c for t in range(4) for *_, c in tight.plan.copies(t)} == {1}
    assert sum(s.rows for s in tight.plan.shards) == sum(TABLE_ROWS)
    with pytest.raises(InputError, match="cannot hold replicas=2"):
        hot_range_plan(traffic, num_servers=4, replicas=2, memory_budget=1.5)
    uniform = hot_range_plan(RangeTraffic.from_stats(skewed_stats(0.0)), 4, 2, 3.0)
    assert {c for t in range(4) for *_, c in uniform.plan.copies(t)} == {2}  # nothing is hot


def test_a_part_over_several_grid_ranges_shares_its_count_by_overlap() -> None:
    grid = range_rows(TABLE_ROWS[1])  # 20
    stats = {**skewed_stats(), "ranges": [[1, grid // 2, 3 * grid, 50], [3, 0, 1, 7]]}
    traffic = RangeTraffic.from_stats(stats)
    np.testing.assert_allclose(traffic.lookups[1][:4], [10, 20, 20, 0])
    assert traffic.lookups[3][0] == 7 and traffic.total == 57


def test_bad_stats_are_refused_with_the_reason(tmp_path: Path) -> None:
    stats = skewed_stats()
    with pytest.raises(InputError, match="outside the model's tables"):
        RangeTraffic.from_stats({**stats, "ranges": [[0, 49_990, 50_010, 5]]})
    with pytest.raises(InputError, match="need table_rows, dim, range_rows and ranges"):
        RangeTraffic.from_stats({"dim": 4})
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**stats, "missing": [1]}))
    assert main(["plan", "--from-stats", str(partial)]) == 2


def test_cli_writes_a_plan_file_serve_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats, out = tmp_path / "stats.json", tmp_path / "plan.json"
    stats.write_text(json.dumps(skewed_stats()))
    args = ["plan", "--from-stats", str(stats), "--embedding-servers", "3", "--availability", "1"]
    assert main([*args, "--memory-budget", "2.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hot-range plan: 1 row ranges" in printed and "up to 3" in printed
    plan = load_sharding(out)
    assert plan.num_servers == 3 and plan.replicas == 2 and plan.copies(0)[0][2] == 3
    assert np.isclose(sum(s.rows for s in plan.shards) / sum(TABLE_ROWS), 2.0, atol=0.05)
    # without --from-stats, the provisioning planner still needs its inputs
    assert main(["plan", "--qps", "10"]) == 2
    assert "--preset, --model or --checkpoint and --p99-ms" in capsys.readouterr().err


def test_shard_prints_a_plan_file_for_its_model_and_refuses_one_for_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats, out = tmp_path / "stats.json", tmp_path / "plan.json"
    tiny = {"table_rows": [100, 50, 200, 30], "dim": 8, "range_rows": [1, 1, 1, 1], "missing": []}
    stats.write_text(json.dumps({**tiny, "ranges": [[0, 7, 8, 900], [2, 5, 6, 100]]}))
    assert main(["plan", "--from-stats", str(stats), "--embedding-servers", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["shard", "--preset", "tiny", "--plan", str(out)]) == 0
    assert "hot-range-wise plan: 4 tables over 2 servers" in capsys.readouterr().out
    assert main(["shard", "--preset", "tiny", "--row-scale", "0.5", "--plan", str(out)]) == 2
    assert "made for another model" in capsys.readouterr().err


def test_a_wide_table_whose_hot_range_the_budget_cannot_copy_is_cut_into_column_blocks() -> None:
    """One copy of every row and no room for more: 60% of the lookups on one range of table 0.
    Rows 16 wide stay whole and that range's server takes most of the load; rows 256 wide are cut
    into 4 column blocks, each block's range on its own server: the same memory, the load spread."""
    narrow = hot_range_plan(RangeTraffic.from_stats(skewed_stats()), 4, replicas=1, memory_budget=1.0)
    wide = hot_range_plan(
        RangeTraffic.from_stats({**skewed_stats(), "dim": 256}), 4, replicas=1, memory_budget=1.0
    )
    assert all(s.col_end is None for s in narrow.plan.shards)
    assert narrow.server_load.max() / narrow.server_load.mean() > 2.0
    plan = wide.plan
    plan.validate()
    assert plan.column_blocks()[:4] == [(0, 0, 64), (0, 64, 128), (0, 128, 192), (0, 192, 256)]
    hot = [s for s in plan.shards if s.table == 0 and s.row_start == 0]
    assert sorted(s.server for s in hot) == [0, 1, 2, 3]  # each block of the hot range elsewhere
    assert plan.server_bytes() == pytest.approx([sum(plan.server_bytes()) / 4] * 4, rel=0.1)
    assert sum(plan.server_bytes()) == 4 * 256 * sum(TABLE_ROWS)  # one copy: the same memory
    assert wide.server_load.max() / wide.server_load.mean() < 1.1
    assert "cut into column blocks" in wide.describe()


def test_a_plan_from_sampled_counts_says_its_lookups_are_estimates() -> None:
    """Servers that count one lookup in 16 say so per server (`GET /v2/stats/ranges`: None for
    one that was down); the plan's description names the sample."""
    sampled = RangeTraffic.from_stats({**skewed_stats(), "sample": [16, None]})
    assert sampled.sample == 16
    result = hot_range_plan(sampled, num_servers=4, replicas=2, memory_budget=2.1)
    assert "estimated: the servers counted one lookup in 16" in result.describe()
    assert RangeTraffic.from_stats({**skewed_stats(), "sample": 4}).sample == 4  # one server's stats
