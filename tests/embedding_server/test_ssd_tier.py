"""The SSD tier: a server keeps its rows in a file it memory-maps, written once and reused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexemr.bench.cgroup import memory_cgroup, oom_kills
from flexemr.config import Endpoint, StorageConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.storage import FileStorage
from flexemr.embedding_server.store import ShardStore
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker, local_servers_need
from flexemr.memory import NotEnoughMemory
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import WeightSource, build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores
from tests.model.test_row_formats import _rss_anon


class _NoRows:
    """A source that fails if asked for rows: a reused file must not be refilled."""

    def __init__(self, source: WeightSource) -> None:
        self.spec = source.spec

    def dense_state(self) -> dict[str, object]:
        raise AssertionError("unused")

    def fill_rows(self, table: int, start: int, out: np.ndarray) -> None:
        raise RuntimeError("asked for rows")


def test_row_file_is_reused_and_rewritten_when_stale_or_half_written(tmp_path: Path) -> None:
    source = load_weights(ModelSource(preset="tiny", seed=1, row_dtype="int8,fp32,fp16,int8"))
    plan = make_plan("row", source.spec.table_rows, source.spec.dim, 2)
    path = tmp_path / "server-0.rows"
    first = ShardStore(plan, 0, source, progress=False, storage=FileStorage(path, "v1"))
    rows = np.arange(first.num_rows)
    want = first.raw(rows)
    again = ShardStore(plan, 0, _NoRows(source), progress=False, storage=FileStorage(path, "v1"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.raw(rows), want)
    with pytest.raises(RuntimeError, match="asked for rows"):  # another fingerprint: rewritten
        ShardStore(plan, 0, _NoRows(source), progress=False, storage=FileStorage(path, "v2"))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="asked for rows"):  # that load died: no header, rewritten
        ShardStore(plan, 0, _NoRows(source), progress=False, storage=FileStorage(path, "v2"))  # type: ignore[arg-type]
    ShardStore(plan, 0, source, progress=False, storage=FileStorage(path, "v1"))
    np.testing.assert_array_equal(
        ShardStore(plan, 0, _NoRows(source), progress=False, storage=FileStorage(path, "v1")).raw(rows),
        want,  # type: ignore[arg-type]
    )


def _serve_and_check(spec: ClusterSpec, cgroup: Path | None = None) -> int:
    """Serve `spec`, check scores against the monolithic model; the server's anonymous RSS."""
    monolithic = build_monolithic(load_weights(spec.model))
    with LocalCluster(spec, cgroup=cgroup) as cluster:
        ranker = build_ranker(cluster.spec)
        try:
            for seed in range(3):
                dense, indices, lengths = random_batch(model_spec(spec.model), 256, seed, max_bag=20)
                got = ranker.score(dense, indices, lengths)
                np.testing.assert_allclose(
                    got, reference_scores(monolithic, dense, indices, lengths), atol=1e-5
                )
        finally:
            ranker.close()
        return _rss_anon(cluster.pids[0])


def test_mmap_server_serves_exact_scores_from_file_backed_rows(tmp_path: Path) -> None:
    source = ModelSource(preset="rmc1", row_scale=0.02, seed=2)
    model = model_spec(source)
    plan = make_plan("table", model.table_rows, model.dim, 1)
    dram = ClusterSpec(source, plan, (Endpoint(),))
    mmap = dataclasses.replace(dram, storage=StorageConfig("mmap", str(tmp_path)))
    assert local_servers_need(mmap) == 0 < model.embedding_bytes == local_servers_need(dram)
    rss_mmap = _serve_and_check(mmap)
    rss_dram = _serve_and_check(dram)
    # the DRAM server's rows are anonymous memory; the mmap server's are page cache the kernel can drop
    assert rss_dram - rss_mmap > 0.8 * model.embedding_bytes, (rss_dram, rss_mmap)
    assert (tmp_path / "server-0.rows").stat().st_size >= model.embedding_bytes
    rss_again = _serve_and_check(mmap)  # a restart reuses the file
    assert rss_again < rss_dram - 0.8 * model.embedding_bytes


@pytest.mark.slow  # a server reading a 600 MB file through a 400 MiB cgroup
@pytest.mark.timeout(300)
def test_mmap_server_serves_a_table_larger_than_its_memory_limit(tmp_path: Path) -> None:
    source = ModelSource(preset="rmc1", row_scale=0.15, seed=2)  # 8 tables x 77 MB
    model = model_spec(source)
    plan = make_plan("table", model.table_rows, model.dim, 1)
    spec = ClusterSpec(source, plan, (Endpoint(),), storage=StorageConfig("mmap", str(tmp_path)))
    # the interpreter and torch take ~180 MB; the rows get a quarter of their size beside them
    limit = 250 * 2**20 + model.embedding_bytes // 4
    assert limit < model.embedding_bytes
    with memory_cgroup(limit) as group:
        if group is None:
            pytest.skip("no cgroup memory controller (v1 or v2) to limit the server with on this host")
        _serve_and_check(spec, cgroup=group)
        assert oom_kills(group) == 0
    assert not group.exists()


def test_the_room_check_reads_the_memory_cgroup_limit() -> None:
    limit = 512 * 2**20
    with memory_cgroup(limit) as group:
        if group is None:
            pytest.skip("no cgroup memory controller (v1 or v2) to limit a process with on this host")
        code = (
            "import sys; sys.stdin.readline(); from flexemr.memory import available_bytes, cgroup_room; "
            "print(cgroup_room(), available_bytes())"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        (group / "cgroup.procs").write_text(str(child.pid))  # joins before it reads the limit
        out, _ = child.communicate("go\n", timeout=120)
    room, available = (int(v) for v in out.split())
    assert 0 < room < limit  # the limit less what the interpreter already uses
    assert available <= room
    assert not group.exists()


def test_a_process_that_would_not_fit_refuses_with_the_flags_to_change(tmp_path: Path) -> None:
    source = ModelSource(preset="dlrm-v2")  # ~100 GB of rows at row scale 1
    model = model_spec(source)
    plan = make_plan("row", model.table_rows, model.dim, 2)
    spec = ClusterSpec(source, plan, (Endpoint(), Endpoint()))
    with pytest.raises(NotEnoughMemory, match="--row-scale"):
        LocalCluster(spec).start()
    spec.save(tmp_path / "spec.json")
    done = subprocess.run(
        [sys.executable, "-m", "flexemr.cli.main", "embedding-server", "--spec", str(tmp_path / "spec.json"),
         "--index", "0", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "embedding server 0 needs" in done.stderr and "--storage mmap" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(NotEnoughMemory, match="monolithic"):
        build_monolithic(load_weights(source))
