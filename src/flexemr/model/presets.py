"""Named model shapes: `tiny` for tests, DeepRecSys' RMC1-3 and MLPerf's DLRM-v2.

Every preset takes a `row_scale` so it fits the machine at hand: table rows are multiplied by it,
but a table never shrinks below `MIN_SCALED_ROWS` rows (or its own size, if smaller), so small
categorical tables keep their shape.
"""

from __future__ import annotations

import math

from flexemr.model.spec import ModelSpec

MIN_SCALED_ROWS = 64

# MLPerf Inference DLRM-v2 (Criteo 1TB, multi-hot): rows and multi-hot sizes per table.
_DLRM_V2_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
_DLRM_V2_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

_PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        table_rows=(100, 50, 200, 30),
        dim=8,
        bottom_mlp=(4, 16, 8),
        top_mlp=(16, 8, 1),
        interaction="dot",
        pooling_factors=(3, 2, 4, 1),
    ),
    "rmc1": ModelSpec(
        table_rows=(4_000_000,) * 8,
        dim=32,
        bottom_mlp=(128, 64, 32),
        top_mlp=(256, 64, 1),
        interaction="cat",
        pooling_factors=(80,) * 8,
    ),
    "rmc2": ModelSpec(
        table_rows=(500_000,) * 32,
        dim=64,
        bottom_mlp=(256, 128, 64),
        top_mlp=(128, 64, 1),
        interaction="cat",
        pooling_factors=(120,) * 32,
    ),
    "rmc3": ModelSpec(
        table_rows=(2_000_000,) * 10,
        dim=32,
        bottom_mlp=(2560, 1024, 256, 32),
        top_mlp=(512, 256, 1),
        interaction="cat",
        pooling_factors=(20,) * 10,
    ),
    "dlrm-v2": ModelSpec(
        table_rows=_DLRM_V2_ROWS,
        dim=128,
        bottom_mlp=(13, 512, 256, 128),
        top_mlp=(1024, 1024, 512, 256, 1),
        interaction="dot",
        pooling_factors=_DLRM_V2_HOTNESS,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def scale_rows(rows: int, row_scale: float) -> int:
    return min(rows, max(math.ceil(rows * row_scale), MIN_SCALED_ROWS))


def preset(name: str, row_scale: float = 1.0) -> ModelSpec:
    """The named preset with its tables scaled by `row_scale` (0 < row_scale <= 1)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    if not 0 < row_scale <= 1:
        raise ValueError(f"row_scale must be in (0, 1], got {row_scale}")
    spec = _PRESETS[name]
    return spec.with_overrides(table_rows=tuple(scale_rows(r, row_scale) for r in spec.table_rows))
