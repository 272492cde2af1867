"""The engine's flags and config: parsed, validated, saved with the cluster spec."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from flexemr.cli import ranker
from flexemr.cli.flags import over
from flexemr.cli.options import add_cluster_arguments, add_model_arguments, cluster_spec
from flexemr.config import (
    CacheMode,
    EngineConfig,
    FrameLimits,
    NodeLimits,
    RankerConfig,
    SecurityConfig,
    StorageConfig,
)
from flexemr.config.cache import CacheConfig, LoadMonitorConfig
from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import links
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.presets import preset
from flexemr.model.source import load_weights
from flexemr.sharding.plan import ShardingConfig
from flexemr.transport.local import LocalTransport


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_cluster_arguments(parser)
    return parser.parse_args(["--preset", "tiny", *flags])


def test_defaults_are_mapped_with_priority_credits_and_migration() -> None:
    config = cluster_spec(parse()).engine
    assert (config.mode, config.credits, config.migration) == ("mapped", "priority", True)


def test_flags_reach_the_spec_and_survive_a_round_trip() -> None:
    spec = cluster_spec(
        parse("--engine", "shared", "--io-threads", "4", "--credits", "piggyback", "--migration", "off")
    )
    assert spec.engine == dataclasses.replace(
        EngineConfig(), mode="shared", io_threads=4, credits="piggyback", migration=False
    )
    assert ClusterSpec.from_dict(spec.to_dict()).engine == spec.engine


def test_flags_override_a_base_config() -> None:
    base = EngineConfig(io_threads=8, credit_capacity=16)
    config = over(base, argparse.Namespace(engine="single", credits="off"))
    assert (config.mode, config.credits, config.io_threads, config.credit_capacity) == (
        "single",
        "off",
        8,
        16,
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("mode", "turbo", "engine mode"), ("credits", "maybe", "credits"), ("io_threads", 0, "io_threads")],
)
def test_bad_values_are_refused_with_the_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})  # type: ignore[arg-type]


def test_servers_bind_their_own_host_and_the_secret_file_is_the_only_secret_flag() -> None:
    spec = cluster_spec(parse("--host", "0.0.0.0", "--server-host", "::1", "--secret-file", "/run/s"))
    assert spec.ranker.host == "0.0.0.0"
    assert {e.host for e in spec.embedding_servers} == {"::1"}
    assert spec.security == SecurityConfig(secret_file="/run/s")
    assert "secret" not in spec.to_json().replace("secret_file", "").replace("secret_env", "")
    again = ClusterSpec.from_dict(spec.to_dict())
    assert (again.security, again.limits) == (spec.security, NodeLimits())
    assert {e.host for e in cluster_spec(parse("--host", "0.0.0.0")).embedding_servers} == {"127.0.0.1"}


def test_node_limits_and_tls_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        NodeLimits(heartbeat_interval_s=1.0, heartbeat_timeout_s=0.5)
    with pytest.raises(ValueError, match="positive"):
        NodeLimits(max_connections=0)
    with pytest.raises(ValueError, match="together"):
        SecurityConfig(tls_cert="cert.pem")


def test_ranker_flags_override_only_what_they_name_in_a_spec_file(tmp_path: Path) -> None:
    """`flexemr ranker --spec`: the file's ranker and engine sections stand unless a flag is given."""
    path = tmp_path / "cluster.json"
    ranker_section = RankerConfig(
        port=0, model_name="ctr", max_batch=64, cache=CacheMode.parse("fixed:1MiB"), deadline_s=3.0
    )
    engine_section = EngineConfig(mode="shared", io_threads=3, migration=False)
    base = cluster_spec(parse())
    dataclasses.replace(base, ranker=ranker_section, engine=engine_section).save(path)
    parser = argparse.ArgumentParser()
    ranker.add_arguments(parser)

    untouched = ranker.load_spec(parser.parse_args(["--spec", str(path)]))
    assert (untouched.ranker, untouched.engine) == (ranker_section, engine_section)

    flags = ["--spec", str(path), "--max-batch", "32", "--deadline-ms", "500", "--io-threads", "2"]
    changed = ranker.load_spec(parser.parse_args(flags))
    assert changed.ranker == dataclasses.replace(ranker_section, max_batch=32, deadline_s=0.5)
    assert changed.engine == dataclasses.replace(engine_section, io_threads=2)


def test_flags_not_given_leave_every_default_of_its_dataclass() -> None:
    spec = cluster_spec(parse())
    assert (spec.ranker, spec.engine, spec.security, spec.storage) == (
        RankerConfig(),
        EngineConfig(),
        SecurityConfig(),
        StorageConfig(),
    )
    assert spec.model.row_scale == 1.0 and spec.model.interaction_itself is None
    given = cluster_spec(
        parse("--max-body", "1MiB", "--storage", "mmap", "--storage-dir", "/ssd", "--interaction-itself")
    )
    assert given.ranker.max_body_bytes == 2**20 and given.model.interaction_itself is True
    assert given.storage == StorageConfig("mmap", "/ssd")


def test_sharding_flags_come_from_the_sharding_config() -> None:
    assert cluster_spec(parse()).sharding == ShardingConfig().plan(
        preset("tiny").table_rows, preset("tiny").dim
    )
    spec = cluster_spec(parse("--embedding-servers", "3", "--sharding", "row", "--replicas", "2"))
    plan = spec.sharding
    assert (plan.num_servers, plan.strategy, plan.replicas) == (6, "row", 2)
    assert plan == ShardingConfig(3, "row", 2).plan(plan.table_rows, plan.dim)
    assert len(spec.embedding_servers) == 6
    for bad in (["--sharding", "diagonal"], ["--replicas", "x"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    with pytest.raises(ValueError, match="at least 1, got 0, 1"):
        cluster_spec(parse("--embedding-servers", "0"))


TUNED_CACHE = CacheConfig(
    ways=4, min_bytes=0, grow_after_s=1.0, load=LoadMonitorConfig(window_s=0.5), gate=None
)
SMALL_FRAMES = FrameLimits(max_buffers=4, max_frame_bytes=2**20)


def test_cache_and_frame_limits_are_spec_file_sections(tmp_path: Path) -> None:
    base = cluster_spec(parse("--cache", "fixed:1MiB", "--max-batch", "64"))
    assert (base.cache, base.frames) == (CacheConfig(), FrameLimits())
    tuned = dataclasses.replace(base, cache=TUNED_CACHE, frames=SMALL_FRAMES)
    path = tmp_path / "cluster.json"
    tuned.save(path)
    data = json.loads(path.read_text())
    assert data["cache"]["ways"] == 4 and data["cache"]["gate"] is None and data["frames"]["max_buffers"] == 4
    # what the ranker section sets is written once, there, as text
    assert "mode" not in data["cache"] and "max_batch" not in data["cache"]["load"]
    assert data["ranker"]["cache"] == "fixed:1048576"
    again = ClusterSpec.load(path)
    assert again == tuned
    assert ClusterSpec.from_dict(base.to_dict()) == base  # a gate's section round-trips too
    older = base.to_dict()
    del older["cache"], older["frames"]
    assert ClusterSpec.from_dict(older) == base


def test_a_cache_section_cannot_set_what_the_ranker_section_sets() -> None:
    data = cluster_spec(parse()).to_dict()
    for cache in ({"mode": "adaptive"}, {"device_budget_bytes": 2**30}, {"load": {"max_batch": 3}}):
        with pytest.raises(TypeError, match="unexpected keyword"):
            ClusterSpec.from_dict({**data, "cache": cache})
    # a spec file writes the mode in the ranker section as a flag does (older files too)
    written = {**data, "ranker": {**data["ranker"], "cache": "fixed:64MiB"}}
    assert ClusterSpec.from_dict(written).ranker.cache == CacheMode("fixed", 64 << 20)
    with pytest.raises(ValueError, match="cache mode"):
        ClusterSpec.from_dict({**data, "ranker": {**data["ranker"], "cache": "sometimes"}})
    with pytest.raises(ValueError, match="positive"):
        FrameLimits(max_frame_bytes=0)


def test_the_ranker_and_its_links_use_the_specs_sections() -> None:
    base = cluster_spec(parse("--cache", "fixed:1MiB", "--max-batch", "64", "--lookup", "raw"))
    spec = dataclasses.replace(base, cache=TUNED_CACHE, frames=SMALL_FRAMES)
    served = build_ranker(spec, transport=LocalTransport(spec.sharding, load_weights(spec.model)))
    try:
        assert served.cache is not None
        assert served.cache.config == TUNED_CACHE
        assert served.cache.mode == CacheMode("fixed", 2**20)
        assert (served.cache.wire, served.cache.monitor.max_batch) == ("raw", 64)
    finally:
        served.close()
    assert {link._dialer.limits for link in links(spec)} == {SMALL_FRAMES}


def test_a_flag_is_parsed_once_and_a_bad_value_gets_the_parsers_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = cluster_spec(parse("--cache", "fixed:1MiB", "--max-body", "2MiB"))
    assert (spec.ranker.cache, spec.ranker.max_body_bytes) == (CacheMode("fixed", 2**20), 2 * 2**20)
    for flag, value, message in (
        ("--cache", "bogus", "cache mode must be off, fixed:BYTES"),
        ("--max-body", "12XB", "not a byte size: '12XB'"),
    ):
        with pytest.raises(SystemExit):
            parse(flag, value)
        assert message in capsys.readouterr().err
