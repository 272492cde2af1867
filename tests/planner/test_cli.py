from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexemr.cli.main import main
from flexemr.config.plan import ShardingPlan
from flexemr.planner import load_calibration, load_sharding

PLAN = ["plan", "--preset", "rmc1", "--row-scale", "0.1", "--qps", "500", "--p99-ms", "30"]


def test_plan_prints_saves_and_round_trips_to_a_sharding_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    assert main([*PLAN, "--availability", "1", "--uncalibrated", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "UNCALIBRATED" in text and "scale-up" in text and "scale-out" in text and "$" in text
    saved = json.loads(out.read_text())
    assert saved["sharding"]["replicas"] == 2 and saved["cost_per_hour"] > 0
    plan = load_sharding(out)
    assert isinstance(plan, ShardingPlan) and plan.replicas == 2
    assert json.loads(json.dumps(plan.to_dict())) == saved["sharding"]


def test_plan_refuses_without_calibration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PLAN) == 2
    assert "flexemr calibrate" in capsys.readouterr().err


def test_infeasible_plan_exits_nonzero_with_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PLAN[:-1], "0.01", "--uncalibrated"]) == 1
    err = capsys.readouterr().err
    assert "no plan meets the request" in err and "what would fix it" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(360)  # about 2 minutes on a quiet 2-core machine, much more on a loaded one
def test_calibrate_quick_writes_a_usable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    cal = load_calibration(out)
    assert cal.calibrated and cal.lookup.seconds_per_bag(64, 10, 0.0) > 0 and cal.dense.flops_per_s > 0
    assert cal.measurements["lookups"] and cal.network.rtt_s > 0
    assert cal.measurements["serving"]["points"] and cal.serving.ranker_request_s > 0
    # A target loose enough for a calibration taken on a busy machine: the file is what is tested.
    loose = [*PLAN[:-1], "1000"]
    assert main([*loose, "--calibration", str(out)]) == 0
    assert "calibrated on" in capsys.readouterr().out
