"""The shape of a DLRM model: what every other part (sharding, workload, planner) needs to know.

Layer strings follow Meta's reference `dlrm_s_pytorch.py`: the bottom MLP lists its input size
first (the number of dense features), the top MLP lists only its outputs (its input size follows
from the interaction).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from flexemr.config.model import Interaction, Pooling, RowFormat, check_format
from flexemr.model.rows import check_dim, row_bytes

DEFAULT_ZIPF_SKEW = 1.0
"""Zipf exponent of row popularity (0: uniform) wherever none is given: the synthetic workloads'
`alpha` and the planner's `Traffic.zipf_skew` are this one quantity (`--zipf-skew`, alias `--alpha`)."""


@dataclass(frozen=True)
class ModelSpec:
    """A DLRM's architecture. Tables all share `dim` (the `dot` interaction needs it)."""

    table_rows: tuple[int, ...]
    """Rows of each embedding table."""
    dim: int
    """Embedding dimension: floats per row."""
    bottom_mlp: tuple[int, ...]
    """Bottom MLP sizes, input first: (num_dense, hidden..., out). `out` must equal `dim` for `dot`."""
    top_mlp: tuple[int, ...]
    """Top MLP output sizes; the last must be 1 (the click probability)."""
    interaction: Interaction = "dot"
    """How the bottom output and the pooled vectors combine: pairwise dots or concatenation."""
    interaction_itself: bool = False
    """For `dot`: include each vector's dot with itself (the lower triangle with its diagonal)."""
    pooling: Pooling = "sum"
    """How a bag of rows becomes one vector."""
    pooling_factors: tuple[int, ...] = ()
    """Typical bag size per table (for workloads and the planner); empty means 1 each."""
    row_formats: tuple[RowFormat, ...] = ()
    """How each table's rows are stored (`flexemr.model.rows`): fp32, fp16, int8 or int4; empty means fp32."""

    def __post_init__(self) -> None:
        if not self.table_rows or min(self.table_rows) < 1:
            raise ValueError(f"every table needs at least one row, got table_rows={self.table_rows}")
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if len(self.bottom_mlp) < 2 or min(self.bottom_mlp) < 1:
            raise ValueError(f"bottom_mlp needs an input and an output size, got {self.bottom_mlp}")
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 output, got {self.top_mlp}")
        if self.interaction not in ("dot", "cat"):
            raise ValueError(f"interaction must be 'dot' or 'cat', got {self.interaction!r}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.interaction == "dot" and self.bottom_mlp[-1] != self.dim:
            raise ValueError(
                f"the 'dot' interaction needs bottom_mlp[-1] == dim, got {self.bottom_mlp[-1]} != {self.dim}"
            )
        if self.pooling_factors and len(self.pooling_factors) != len(self.table_rows):
            raise ValueError(
                f"pooling_factors has {len(self.pooling_factors)} entries for {len(self.table_rows)} tables"
            )
        if self.row_formats and len(self.row_formats) != len(self.table_rows):
            raise ValueError(
                f"row_formats has {len(self.row_formats)} entries for {len(self.table_rows)} tables"
            )
        for fmt in self.row_formats:
            check_dim(check_format(fmt), self.dim)

    @property
    def num_tables(self) -> int:
        return len(self.table_rows)

    @property
    def num_dense(self) -> int:
        return self.bottom_mlp[0]

    @property
    def bag_sizes(self) -> tuple[int, ...]:
        return self.pooling_factors or (1,) * self.num_tables

    @property
    def formats(self) -> tuple[RowFormat, ...]:
        fp32: RowFormat = "fp32"
        return self.row_formats or (fp32,) * self.num_tables

    @property
    def interaction_size(self) -> int:
        """Width of the interaction output, the top MLP's input."""
        n = self.num_tables + 1
        if self.interaction == "cat":
            return self.bottom_mlp[-1] + self.num_tables * self.dim
        pairs = n * (n + 1) // 2 if self.interaction_itself else n * (n - 1) // 2
        return self.bottom_mlp[-1] + pairs

    @property
    def embedding_bytes(self) -> int:
        return sum(
            rows * row_bytes(fmt, self.dim) for rows, fmt in zip(self.table_rows, self.formats, strict=True)
        )

    def with_overrides(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown model spec fields: {sorted(unknown)}")
        tuples = {"table_rows", "bottom_mlp", "top_mlp", "pooling_factors", "row_formats"}
        values: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data.items()}
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
