"""Where a served model's weights come from (a seeded preset or a reference checkpoint), and the
names of the choices a model offers (interaction, pooling, row formats). Data only: loading the
weights is `flexemr.model.source`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flexemr.config import flag

Interaction = Literal["dot", "cat"]
Pooling = Literal["sum", "mean"]
RowFormat = Literal["fp32", "fp16", "int8", "int4"]
ROW_FORMATS: tuple[RowFormat, ...] = ("fp32", "fp16", "int8", "int4")


def check_format(name: str) -> RowFormat:
    for fmt in ROW_FORMATS:
        if name == fmt:
            return fmt
    raise ValueError(f"row format must be one of {', '.join(ROW_FORMATS)}, got {name!r}")


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
            "how rows are stored: fp32, fp16, int8 or int4 (row-wise quantised), or one per table "
            "comma-separated (default fp32; a checkpoint's fp16 tables stay fp16)",
        ),
    )

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of a preset or a checkpoint")
        if self.row_dtype is not None:
            for fmt in self.row_dtype.split(","):
                check_format(fmt)

    def row_formats(self, num_tables: int) -> tuple[RowFormat, ...]:
        """The format of each of `num_tables` tables, from `row_dtype`."""
        assert self.row_dtype is not None
        formats = tuple(check_format(f) for f in self.row_dtype.split(","))
        if len(formats) == 1:
            return formats * num_tables
        if len(formats) != num_tables:
            raise ValueError(f"--row-dtype lists {len(formats)} formats for {num_tables} tables")
        return formats
