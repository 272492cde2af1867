"""Loading a served model's weights from its `ModelSource` (a seeded preset or a reference checkpoint)."""

from __future__ import annotations

from typing import Any

from flexemr.config.model import ModelSource
from flexemr.model.presets import preset
from flexemr.model.spec import ModelSpec
from flexemr.model.weights import CheckpointWeights, PresetWeights, WeightSource


def load_weights(source: ModelSource) -> WeightSource:
    if source.checkpoint is not None:
        weights = CheckpointWeights(
            source.checkpoint,
            interaction=source.interaction or "dot",
            interaction_itself=bool(source.interaction_itself),
            pooling=source.pooling or "sum",
        )
        if source.row_dtype is not None:
            formats = source.row_formats(weights.spec.num_tables)
            weights.spec = weights.spec.with_overrides(row_formats=formats)
        return weights
    assert source.preset is not None
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("interaction", source.interaction),
            ("interaction_itself", source.interaction_itself),
            ("pooling", source.pooling),
        )
        if v is not None
    }
    spec = preset(source.preset, source.row_scale)
    if source.row_dtype is not None:
        overrides["row_formats"] = source.row_formats(spec.num_tables)
    return PresetWeights(spec.with_overrides(**overrides), source.seed)


def model_spec(source: ModelSource) -> ModelSpec:
    return load_weights(source).spec
