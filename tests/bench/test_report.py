"""The bench report states queries, duration and LoadGen's verdict per run, and never quotes a
peak or an unmarked ratio from an INVALID run."""

from __future__ import annotations

from pathlib import Path

from flexemr.bench.loadgen_sut import LoadGenResult, loadgen_percentiles_ms, loadgen_verdict
from flexemr.bench.report import markdown
from flexemr.bench.suite import SUITES, BenchConfig, SystemResult, finishing_qps, lowest_qps


def run(
    scenario: str, qps: float | None, queries: int, p99: float, valid: bool, why: tuple[str, ...] = ()
) -> LoadGenResult:
    return LoadGenResult(
        backend="x", transport="http", scenario=scenario, target_qps=qps, queries=queries,  # type: ignore[arg-type]
        pairs=queries * 300, errors=0, duration_s=queries / (qps or 100), queries_per_s=qps or 100.0,
        pairs_per_s=(qps or 100) * 300, p50_ms=p99 / 2, p99_ms=p99, p999_ms=p99 * 1.2, p99_target_ms=60.0,
        loadgen_valid=valid, invalid_reasons=why, log_dir=Path("."),
    )  # fmt: skip


def test_report_states_validity_and_quotes_only_valid_runs() -> None:
    served = SystemResult("served-monolithic", "d", "http", run("Offline", None, 9000, 900, True))
    served.server_runs = [
        run("Server", 20, 600, 40, True),
        run("Server", 40, 610, 90, False, ("p99 over target",)),
    ]
    served.peak_qps = 20
    flex = SystemResult("flexemr", "d", "http", run("Offline", None, 700, 900, False, ("too short",)))
    flex.server_runs = [run("Server", 30, 12, 30, False, ("too few queries",))]  # under target, but too short
    text = markdown([served, flex], SUITES["quick"], BenchConfig())
    assert "| served-monolithic | Server | 20.0 | 600 |" in text and "| VALID |" in text
    assert "INVALID (p99 over target)" in text and "INVALID (too few queries)" in text
    assert "| flexemr | 0.0 |" in text  # its only Server run was under target but INVALID: no peak
    assert "| served-monolithic | 20.0 |" in text
    assert "(INVALID)" in text  # the Offline ratio against an INVALID (too short) run is marked


def test_verdict_is_read_from_loadgen_summary(tmp_path: Path) -> None:
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "Result is : INVALID\n  Performance constraints satisfied : Yes\n  Min duration satisfied : NO\n"
        "  Min queries satisfied : Yes\n  Early stopping satisfied: NO\n"
    )
    assert loadgen_verdict(tmp_path) == (False, ("too short", "early stopping: too few queries for this p99"))
    assert loadgen_verdict(tmp_path / "missing") == (None, ())


def test_latencies_are_loadgens_own(tmp_path: Path) -> None:
    """The percentiles LoadGen judged the run by (from each query's scheduled time), not ours."""
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "Result is : INVALID\n50.00 percentile latency (ns)   : 6600000\n"
        "90.00 percentile latency (ns)   : 9000000\n99.00 percentile latency (ns)   : 174802556\n"
        "99.90 percentile latency (ns)   : 200000000\n"
    )
    assert loadgen_percentiles_ms(tmp_path) == (6.6, 174.802556, 200.0)
    (tmp_path / "mlperf_log_summary.txt").write_text("Result is : VALID\n")
    assert loadgen_percentiles_ms(tmp_path) is None  # then the report falls back to ours


def test_the_peak_search_never_tries_a_load_too_low_to_finish() -> None:
    quick = SUITES["quick"]
    floor = 1.2 * quick.server_queries / quick.server_max_s  # 20 queries/s: 1,500 queries in 75 s
    assert lowest_qps(quick, 1000.0) == 1000.0 / 16
    assert lowest_qps(quick, 100.0) == floor
    assert lowest_qps(quick, 15.0) == 7.5  # a slow system: half its own rate, the run is cut
    assert finishing_qps(quick) == floor  # below it: no Server run at all
