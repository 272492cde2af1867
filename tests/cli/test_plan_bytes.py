"""The plan printed at start-up counts the bytes each server stores in its row formats (what its
store allocates), and says where they are kept."""

from __future__ import annotations

import re

import pytest

from flexemr.cli.main import main
from flexemr.cli.options import describe_plan
from flexemr.config import StorageConfig
from flexemr.config.model import ModelSource
from flexemr.embedding_server.storage import DramStorage
from flexemr.embedding_server.store import store_layout
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan


def printed_mib(text: str) -> list[str]:
    return re.findall(r"server \d+:\s+([\d.]+) MiB", text)


@pytest.mark.parametrize(
    "row_dtype", ["fp32", "fp16", "int8", "int4", "int8,fp16,fp32,int4,fp16,fp32,int8,int4"]
)
@pytest.mark.parametrize("strategy", ["table", "row"])
def test_each_server_shows_the_bytes_its_store_allocates(row_dtype: str, strategy: str) -> None:
    spec = model_spec(ModelSource(preset="rmc1", row_scale=0.01, row_dtype=row_dtype))
    plan = make_plan(strategy, spec.table_rows, spec.dim, 3)  # type: ignore[arg-type]
    allocated = [DramStorage().resident_bytes(store_layout(plan, s, spec.formats)) for s in range(3)]
    text = describe_plan(plan, spec, StorageConfig())
    assert printed_mib(text) == [f"{b / 2**20:.1f}" for b in allocated]
    assert plan.server_bytes([4 * spec.dim] * spec.num_tables) == plan.server_bytes()  # fp32: as before
    if row_dtype != "fp32":
        assert sum(allocated) < sum(plan.server_bytes())


def test_the_plan_says_the_formats_and_where_rows_are_kept() -> None:
    spec = model_spec(ModelSource(preset="rmc1", row_scale=0.01, row_dtype="int8"))
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    assert "rows stored as int8 in DRAM" in describe_plan(plan, spec, StorageConfig())
    mmap = StorageConfig(kind="mmap", directory="/ssd/rows")
    assert "rows stored as int8 in mmap files under /ssd/rows" in describe_plan(plan, spec, mmap)
    mixed = model_spec(
        ModelSource(preset="rmc1", row_scale=0.01, row_dtype="fp16,int8,int8,int8,int8,int8,int8,int8")
    )
    assert "rows stored as fp16 x1, int8 x7" in describe_plan(plan, mixed)


def test_flexemr_shard_prints_stored_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "shard",
                "--preset",
                "rmc1",
                "--row-scale",
                "0.01",
                "--row-dtype",
                "int8",
                "--embedding-servers",
                "2",
            ]
        )
        == 0
    )
    spec = model_spec(ModelSource(preset="rmc1", row_scale=0.01, row_dtype="int8"))
    plan = make_plan("auto", spec.table_rows, spec.dim, 2)
    allocated = [DramStorage().resident_bytes(store_layout(plan, s, spec.formats)) for s in range(2)]
    assert printed_mib(capsys.readouterr().out) == [f"{b / 2**20:.1f}" for b in allocated]
