"""Where a served model's weights come from: a seeded preset or a reference checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexemr.config import flag
from flexemr.model.presets import preset
from flexemr.model.rows import RowFormat, check_format
from flexemr.model.spec import Interaction, ModelSpec, Pooling
from flexemr.model.weights import CheckpointWeights, PresetWeights, WeightSource


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a seeded preset or a reference checkpoint (exactly one)."""

    preset: str | None = None
    """Preset name (tiny, rmc1, rmc2, rmc3, dlrm-v2)."""
    row_scale: float = field(default=1.0, metadata=flag("--row-scale", "scale a preset's table rows (0, 1]"))
    """Preset tables' rows are multiplied by this, to fit the machine."""
    seed: int = field(default=0, metadata=flag("--seed", "seed of a preset's weights"))
    """Seed of a preset's random weights; every process derives the same weights from it."""
    checkpoint: str | None = None
    """Path to a `torch.save`d state_dict of Meta's reference DLRM_Net."""
    interaction: Interaction | None = field(
        default=None, metadata=flag("--interaction", "default: the preset's, or dot")
    )
    """Override the interaction (a checkpoint does not record it; default `dot`)."""
    interaction_itself: bool | None = field(
        default=None, metadata=flag("--interaction-itself", "dot: include self-interactions")
    )
    """Override self-interaction for `dot` (default off)."""
    pooling: Pooling | None = field(default=None, metadata=flag("--pooling", "default: the preset's, or sum"))
    """Override the pooling (default `sum`)."""
    row_dtype: str | None = field(
        default=None,
        metadata=flag(
            "--row-dtype",
            "how rows are stored: fp32, fp16 or int8 (row-wise quantised), or one per table "
            "comma-separated (default fp32; a checkpoint's fp16 tables stay fp16)",
        ),
    )

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of a preset or a checkpoint")
        if self.row_dtype is not None:
            for fmt in self.row_dtype.split(","):
                check_format(fmt)

    def _row_formats(self, num_tables: int) -> tuple[RowFormat, ...]:
        assert self.row_dtype is not None
        formats = tuple(check_format(f) for f in self.row_dtype.split(","))
        if len(formats) == 1:
            return formats * num_tables
        if len(formats) != num_tables:
            raise ValueError(f"--row-dtype lists {len(formats)} formats for {num_tables} tables")
        return formats

    def load(self) -> WeightSource:
        if self.checkpoint is not None:
            weights = CheckpointWeights(
                self.checkpoint,
                interaction=self.interaction or "dot",
                interaction_itself=bool(self.interaction_itself),
                pooling=self.pooling or "sum",
            )
            if self.row_dtype is not None:
                formats = self._row_formats(weights.spec.num_tables)
                weights.spec = weights.spec.with_overrides(row_formats=formats)
            return weights
        assert self.preset is not None
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("interaction", self.interaction),
                ("interaction_itself", self.interaction_itself),
                ("pooling", self.pooling),
            )
            if v is not None
        }
        spec = preset(self.preset, self.row_scale)
        if self.row_dtype is not None:
            overrides["row_formats"] = self._row_formats(spec.num_tables)
        return PresetWeights(spec.with_overrides(**overrides), self.seed)

    def spec(self) -> ModelSpec:
        return self.load().spec
