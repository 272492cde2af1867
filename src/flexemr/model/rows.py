"""Row formats: how a table's rows are stored, and the kernels that pool them.

    fp32   float32 [rows, dim]        4 * dim bytes a row
    fp16   float16 [rows, dim]        2 * dim bytes a row
    int8   uint8   [rows, dim + 8]    dim + 8 bytes a row, FBGEMM's (and TorchRec's) 8-bit row-wise layout:
           | q_0 .. q_{dim-1} | scale: fp32 | bias: fp32 |     value_i = scale * q_i + bias

Rows are encoded once, row by row, from float32 (so any chunking gives the same bytes), and every
process that holds a table (embedding server, monolithic model) holds these same bytes. Pooling
always yields float32: int8 rows through FBGEMM's fused `embedding_bag_byte_rowwise_offsets`,
which dequantises as it sums; fp16 rows gathered, widened to float32 and summed by
`embedding_bag`, so sums accumulate in float32 as FBGEMM's fp16 kernels do. `decode` gives the
float32 values of stored rows (raw lookups, the ranker's cache).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexemr.config.model import RowFormat

_INT8_TAIL = 8
"""Bytes after an int8 row's values: its fp32 scale and bias."""


def row_bytes(fmt: RowFormat, dim: int) -> int:
    """Bytes one stored row takes."""
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + _INT8_TAIL}[fmt]


def storage(fmt: RowFormat, dim: int) -> tuple[np.dtype, int]:
    """The numpy dtype and the row width (elements) a table of `fmt` rows is stored as."""
    if fmt == "int8":
        return np.dtype(np.uint8), dim + _INT8_TAIL
    return np.dtype(np.float16 if fmt == "fp16" else np.float32), dim


def encode(rows: np.ndarray, fmt: RowFormat, out: np.ndarray) -> None:
    """Write float32 `rows` [n, dim] into `out` [n, width] in `fmt`."""
    if fmt == "int8":
        out[:] = torch.ops.quantized.embedding_bag_byte_prepack(torch.from_numpy(rows)).numpy()
    else:
        out[:] = rows  # numpy rounds to nearest for fp16


def columns(stored: np.ndarray, fmt: RowFormat, start: int, end: int) -> np.ndarray:
    """Stored rows [n, width] cut to their columns `[start, end)`, still in `fmt`. An int8 row keeps
    its own scale and bias, so the slice holds exactly the whole row's values in those columns."""
    if fmt == "int8":
        return np.concatenate([stored[:, start:end], stored[:, stored.shape[1] - _INT8_TAIL :]], axis=1)
    return stored[:, start:end]


def decode(stored: Tensor, fmt: RowFormat) -> Tensor:
    """The float32 values [n, dim] of stored rows [n, width]."""
    if fmt == "int8":
        return torch.ops.quantized.embedding_bag_byte_unpack(stored)  # type: ignore[no-any-return]
    return stored.to(torch.float32)


def pool(
    table: Tensor, fmt: RowFormat, rows: Tensor, offsets: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Per-bag (weighted) sums [len(offsets), dim] in float32 of `table[rows]`; bag b holds
    `rows[offsets[b] : offsets[b + 1]]`."""
    if fmt == "int8":
        if rows.numel() == 0:  # the kernel refuses bags over no rows at all
            return torch.zeros(len(offsets), table.shape[1] - _INT8_TAIL)
        return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(  # type: ignore[no-any-return]
            table, rows, offsets, False, 0, False, weights, None, False
        )
    if fmt == "fp16":
        gathered = table.index_select(0, rows).to(torch.float32)
        rows = torch.arange(len(rows), dtype=rows.dtype)
        table = gathered
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
