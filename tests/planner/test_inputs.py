from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexemr.planner import InputError, Traffic, load_catalog
from flexemr.planner.calibration import load_calibration
from flexemr.planner.inputs import Availability, load_model, load_traffic


def test_traffic_rejects_bad_values_and_names_them() -> None:
    with pytest.raises(InputError, match="peak_qps must be positive, got -5"):
        Traffic(-5)
    with pytest.raises(InputError, match="zipf_skew"):
        Traffic(10, zipf_skew=9)


def test_availability_limits() -> None:
    assert Availability(2, 1).replicas == 3
    with pytest.raises(InputError, match="embedding-server failures"):
        Availability(-1)


def test_model_file_from_preset_and_from_spec(tmp_path: Path) -> None:
    ref = tmp_path / "m.json"
    ref.write_text(json.dumps({"preset": "rmc1", "row_scale": 0.5}))
    model = load_model(ref)
    assert model.spec.table_rows == (2_000_000,) * 8
    full = tmp_path / "full.json"
    full.write_text(json.dumps({**model.spec.to_dict(), "dtype_bytes": 2}))  # an older model file
    again = load_model(full)
    assert again.spec.formats == ("fp16",) * 8 and again.embedding_bytes == model.embedding_bytes // 2
    ref.write_text(json.dumps({"preset": "rmc1", "row_scale": 0.5, "row_dtype": "int8"}))
    int8 = load_model(ref)
    assert int8.row_bytes == 32 + 8  # values, then a float32 scale and bias per row
    assert int8.embedding_bytes == 2_000_000 * 8 * 40
    ref.write_text(json.dumps({"preset": "rmc1", "row_scale": 0.5, "row_dtype": "int4"}))
    assert load_model(ref).row_bytes == 32 // 2 + 4  # two values a byte, then an fp16 scale and bias


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"preset": "rmc9"}', "unknown preset"),
        ('{"table_rows": [10], "dim": 4, "bottom_mlp": [3, 4], "top_mlp": [2], "colour": 1}', "unknown"),
    ],
)
def test_bad_model_files_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_traffic_file_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"peak_qps": 10, "qps": 3}))
    with pytest.raises(InputError, match=r"unknown field\(s\) \['qps'\]"):
        load_traffic(path)


def test_default_catalog_has_real_types_with_source_and_date() -> None:
    catalog = load_catalog()
    assert "aws.amazon.com" in catalog.source and "list prices" in catalog.source.lower()
    assert catalog.as_of
    names = {n.name for n in catalog.node_types}
    assert {"r6i.8xlarge", "c7i.4xlarge", "g5.xlarge", "g6.xlarge"} <= names
    assert catalog.get("g5.xlarge").accelerator is not None
    assert catalog.get("r6i.large").price_per_hour < catalog.get("r6i.xlarge").price_per_hour


def test_missing_calibration_tells_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="flexemr calibrate"):
        load_calibration(tmp_path / "nope.json")
