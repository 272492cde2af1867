"""Where a model's weights come from: a seeded preset or a reference checkpoint.

Both give the same two things: the dense part's `state_dict`, and any row range of any table
written straight into a caller's buffer. An embedding server asks only for its shards, so no
process ever holds a table it does not serve, nor two copies of one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from flexemr.config.model import Interaction, Pooling
from flexemr.memory import SERVING_ADVICE, check_memory
from flexemr.model import rows as stored_rows
from flexemr.model.checkpoints import load_checkpoint
from flexemr.model.dlrm import DLRM, DenseArch, init_dense
from flexemr.model.spec import ModelSpec

_BLOCK_ROWS = 1 << 16


class WeightSource(Protocol):
    spec: ModelSpec

    def dense_state(self) -> dict[str, Tensor]:
        """The `bot_l.*` and `top_l.*` tensors."""
        ...

    def fill_rows(self, table: int, start: int, out: np.ndarray) -> None:
        """Write rows `start : start + len(out)` of `table` into `out` (float32 [n, dim])."""
        ...


class PresetWeights:
    """Random weights from a seed. Table rows come in fixed blocks, each from its own seeded stream,
    so any row range is generated without generating the rest of the table."""

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed

    def dense_state(self) -> dict[str, Tensor]:
        dense = DenseArch(self.spec)
        init_dense(dense, self.seed)
        return dense.state_dict()

    def fill_rows(self, table: int, start: int, out: np.ndarray) -> None:
        end = start + len(out)
        bound = np.float32(1.0 / math.sqrt(self.spec.table_rows[table]))
        for block in range(start // _BLOCK_ROWS, math.ceil(end / _BLOCK_ROWS)):
            b_start = block * _BLOCK_ROWS
            b_end = min(b_start + _BLOCK_ROWS, self.spec.table_rows[table])
            rng = np.random.default_rng([self.seed, table, block])
            rows = rng.random((b_end - b_start, self.spec.dim), dtype=np.float32)
            lo, hi = max(start, b_start), min(end, b_end)
            chunk = rows[lo - b_start : hi - b_start]
            out[lo - start : hi - start] = (chunk * 2 - 1) * bound


class CheckpointWeights:
    """A `torch.save`d `state_dict` of Meta's reference `DLRM_Net` (or its `--save-model` file), or
    of TorchRec's DLRM (`flexemr.model.checkpoints`), memory-mapped: tables are read from the file
    only as rows are asked for."""

    def __init__(
        self,
        path: str | Path,
        interaction: Interaction = "dot",
        interaction_itself: bool = False,
        pooling: Pooling = "sum",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        self._state = load_checkpoint(self.path)
        state = self._state
        self.spec = spec_from_state_dict(state, interaction, interaction_itself, pooling)

    def dense_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._state.items() if k.startswith(("bot_l.", "top_l."))}

    def fill_rows(self, table: int, start: int, out: np.ndarray) -> None:
        weight = self._state[f"emb_l.{table}.weight"]
        out[:] = weight[start : start + len(out)].to(torch.float32).numpy()


def spec_from_state_dict(
    state: dict[str, Tensor], interaction: Interaction, interaction_itself: bool, pooling: Pooling
) -> ModelSpec:
    """Read the architecture off the reference's parameter names and shapes."""
    tables = sorted(
        (int(k.split(".")[1]), v) for k, v in state.items() if k.startswith("emb_l.") and k.endswith("weight")
    )
    if not tables or [t for t, _ in tables] != list(range(len(tables))):
        raise ValueError(
            "checkpoint has no tables: neither emb_l.<t>.weight numbered 0..T-1 (Meta's reference) nor "
            "sparse_arch.embedding_bag_collection.embedding_bags.<name>.weight (TorchRec)"
        )
    dims = {v.shape[1] for _, v in tables}
    if len(dims) != 1:
        raise ValueError(f"tables of different dims {sorted(dims)} are not supported")

    def layer_sizes(prefix: str) -> list[tuple[int, int]]:
        keys = sorted(
            (int(k.split(".")[1]), v.shape)
            for k, v in state.items()
            if k.startswith(prefix) and k.endswith(".weight")
        )
        if not keys:
            raise ValueError(f"checkpoint has no {prefix}*.weight layers")
        return [(shape[1], shape[0]) for _, shape in keys]

    bottom = layer_sizes("bot_l.")
    top = layer_sizes("top_l.")
    spec = ModelSpec(
        table_rows=tuple(v.shape[0] for _, v in tables),
        dim=dims.pop(),
        bottom_mlp=(bottom[0][0], *(out for _, out in bottom)),
        top_mlp=tuple(out for _, out in top),
        interaction=interaction,
        interaction_itself=interaction_itself,
        pooling=pooling,
        row_formats=tuple("fp16" if v.dtype == torch.float16 else "fp32" for _, v in tables),
    )
    if top[0][0] != spec.interaction_size:
        raise ValueError(
            f"top_l.0 takes {top[0][0]} inputs but interaction={interaction!r}"
            f"{' with --interaction-itself' if interaction_itself else ''} gives {spec.interaction_size}; "
            "check --interaction and --interaction-itself"
        )
    return spec


def fill_stored(source: WeightSource, table: int, start: int, out: np.ndarray) -> None:
    """Write rows `start : start + len(out)` of `table` into `out`, stored in the table's format."""
    fmt = source.spec.formats[table]
    if fmt == "fp32":
        source.fill_rows(table, start, out)
        return
    for at in range(0, len(out), _BLOCK_ROWS):
        chunk = np.empty((min(_BLOCK_ROWS, len(out) - at), source.spec.dim), dtype=np.float32)
        source.fill_rows(table, start + at, chunk)
        bad = np.flatnonzero(stored_rows.overflowing(chunk, fmt))
        if bad.size:
            raise ValueError(
                f"row {start + at + int(bad[0])} of table {table} cannot be stored as {fmt}: "
                f"{stored_rows.OVERFLOW_HINT}; choose another --row-dtype for this table"
            )
        stored_rows.encode(chunk, fmt, out[at : at + len(chunk)])


def build_monolithic(source: WeightSource) -> DLRM:
    """The whole model in this process, with the same stored rows as the embedding servers: the
    reference against which served scores are checked."""
    check_memory(
        source.spec.embedding_bytes, "the monolithic model (all tables in this process)", SERVING_ADVICE
    )
    model = DLRM(source.spec)
    model.load_state_dict(source.dense_state(), strict=False)
    with torch.no_grad():
        for t, bag in enumerate(model.emb_l):
            assert isinstance(bag.weight, Tensor)
            fill_stored(source, t, 0, bag.weight.numpy())
    return model.eval()


def build_dense(source: WeightSource) -> DenseArch:
    dense = DenseArch(source.spec)
    dense.load_state_dict(source.dense_state())
    return dense.eval()
