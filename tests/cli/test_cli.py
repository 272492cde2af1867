"""The `flexemr` command line: version, and help that shows every default."""

from __future__ import annotations

import argparse
import importlib
from importlib.metadata import version

import pytest

from flexemr.bench.suite import SUITES, BenchConfig
from flexemr.cli.main import COMMANDS, main
from flexemr.config.security import admin_token
from flexemr.planner import Traffic
from flexemr.workload.synthetic import SyntheticConfig


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"flexemr {version('flexemr')}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_the_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    expected = {
        "serve": ["(default: 1.0)", "(default: mapped)", "(default: partial)"],
        "embedding-server": [],
        "ranker": ["(default: 120.0)", "(default: 2, or a spec file's)"],
        "demo": ["(default: 0.01)", "(default: 1.0)"],
        "shard": ["(default: 1.0)"],
        "bench": ["(default: quick)", "(default: http)", "(default: 60.0)"],
        "calibrate": ["(default: calibration.json)"],
        "plan": ["(default: 1.0)", "(default: 64.0)"],
        "spec": ["(default: 1.0)", "(default: 8000)"],
        "admin-token": [],
        "update": ["(default: default)", "(default: flexemr-update)", "(default: 64)"],
    }[command]
    assert all(default in text for default in expected), text


def test_admin_token_is_derived_from_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FLEXEMR_SECRET", raising=False)
    assert main(["admin-token"]) == 2  # no secret, no token
    monkeypatch.setenv("FLEXEMR_SECRET", "s3cret")
    assert main(["admin-token"]) == 0
    token = capsys.readouterr().out.strip()
    assert token == admin_token(b"s3cret") and "s3cret" not in token and len(token) == 64


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    importlib.import_module("flexemr.cli." + command).add_arguments(parser)
    return parser


@pytest.mark.parametrize("command", ["bench", "demo", "plan"])
def test_alpha_and_zipf_skew_are_one_flag_with_one_default(command: str) -> None:
    parser = _parser(command)
    required = ["--preset", "rmc1", "--p99-ms", "30"] if command == "plan" else []
    assert parser.parse_args([*required, "--alpha", "0.7"]).zipf_skew == 0.7
    assert parser.parse_args([*required, "--zipf-skew", "1.3"]).zipf_skew == 1.3
    default = parser.parse_args(required).zipf_skew
    assert default == Traffic(1.0).zipf_skew == SyntheticConfig().alpha == BenchConfig().alpha


def test_bench_defaults_to_the_full_suites_model() -> None:
    config, full = BenchConfig(), SUITES["full"]
    assert (config.preset, config.row_scale) == (full.preset, full.row_scale)
