"""int4 rows in the SSD tier: the row file holds them at dim / 2 + 4 bytes a row, is reused as
written, and a memory-mapped int4 server serves the monolithic int4 model's scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from flexemr.config import Endpoint, StorageConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.storage import DramStorage, FileStorage
from flexemr.embedding_server.store import ShardStore
from flexemr.entrypoints.roles import local_servers_need
from flexemr.model.source import load_weights, model_spec
from flexemr.sharding.plan import make_plan
from tests.embedding_server.test_ssd_tier import _NoRows, _serve_and_check


def test_the_row_file_holds_int4_rows_and_is_reused(tmp_path: Path) -> None:
    source = load_weights(ModelSource(preset="rmc1", row_scale=0.001, seed=3, row_dtype="int4"))
    spec = source.spec
    plan = make_plan("table", spec.table_rows, spec.dim, 1)
    path = tmp_path / "server-0.rows"
    first = ShardStore(plan, 0, source, progress=False, storage=FileStorage(path, "int4"))
    rows = sum(spec.table_rows)
    assert first.nbytes == rows * (spec.dim // 2 + 4) == spec.embedding_bytes
    assert spec.embedding_bytes <= path.stat().st_size < spec.embedding_bytes + 2 * 4096  # header, alignment
    everything = np.arange(first.num_rows)
    in_memory = ShardStore(plan, 0, source, progress=False, storage=DramStorage())
    np.testing.assert_array_equal(first.raw(everything), in_memory.raw(everything))
    again = ShardStore(plan, 0, _NoRows(source), progress=False, storage=FileStorage(path, "int4"))  # type: ignore[arg-type]
    for mapped, want in zip(again.tables, in_memory.tables, strict=True):
        assert mapped.equal(want)  # the same int4 bytes, read back from the file without a reload


def test_an_mmap_int4_server_serves_exact_scores(tmp_path: Path) -> None:
    source = ModelSource(preset="rmc1", row_scale=0.02, seed=2, row_dtype="int4")
    model = model_spec(source)
    plan = make_plan("table", model.table_rows, model.dim, 1)
    dram = ClusterSpec(source, plan, (Endpoint(),))
    mmap = dataclasses.replace(dram, storage=StorageConfig("mmap", str(tmp_path)))
    assert local_servers_need(dram) == model.embedding_bytes == sum(model.table_rows) * (model.dim // 2 + 4)
    assert local_servers_need(mmap) == 0
    _serve_and_check(mmap)
    assert (tmp_path / "server-0.rows").stat().st_size >= model.embedding_bytes
