"""Row formats: how a table's rows are stored, and the kernels that pool them.

    fp32   float32 [rows, dim]          4 * dim bytes a row
    fp16   float16 [rows, dim]          2 * dim bytes a row
    int8   uint8   [rows, dim + 8]      dim + 8 bytes a row, FBGEMM's (and TorchRec's) 8-bit row-wise layout:
           | q_0 .. q_{dim-1} | scale: fp32 | bias: fp32 |     value_i = scale * q_i + bias
    int4   uint8   [rows, dim / 2 + 4]  dim / 2 + 4 bytes a row, FBGEMM's fused 4-bit row-wise layout:
           | q_1 q_0 | q_3 q_2 | .. | scale: fp16 | bias: fp16 |  two values a byte, q_{2k} in the low
           nibble; q_i in 0..15, value_i = scale * q_i + bias (scale = (max - min) / 15, bias = min)

Rows are encoded once, row by row, from float32 (so any chunking gives the same bytes), and every
process that holds a table (embedding server, monolithic model) holds these same bytes. Pooling
always yields float32: int8 and int4 rows through FBGEMM's fused `embedding_bag_byte_rowwise_offsets`
and `embedding_bag_4bit_rowwise_offsets`, which dequantise as they sum; fp16 rows gathered, widened
to float32 and summed by `embedding_bag`, so sums accumulate in float32 as FBGEMM's fp16 kernels do.
`decode` gives the float32 values of stored rows (raw lookups, the ranker's cache).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexemr.config.model import RowFormat

_INT8_TAIL = 8
"""Bytes after an int8 row's values: its fp32 scale and bias."""
_INT4_TAIL = 4
"""Bytes after an int4 row's values: its fp16 scale and bias."""
FP16_MAX = float(np.finfo(np.float16).max)
"""fp16 rows, and int4 rows' scale and bias, hold values up to this magnitude (65504)."""


def row_bytes(fmt: RowFormat, dim: int) -> int:
    """Bytes one stored row takes."""
    dtype, width = storage(fmt, dim)
    return dtype.itemsize * width


def storage(fmt: RowFormat, dim: int) -> tuple[np.dtype, int]:
    """The numpy dtype and the row width (elements) a table of `fmt` rows is stored as."""
    if fmt == "int8":
        return np.dtype(np.uint8), dim + _INT8_TAIL
    if fmt == "int4":
        return np.dtype(np.uint8), dim // 2 + _INT4_TAIL
    return np.dtype(np.float16 if fmt == "fp16" else np.float32), dim


def check_dim(fmt: RowFormat, dim: int) -> None:
    """Raise ValueError unless `fmt` can store rows of `dim` values (int4 packs two a byte)."""
    if fmt == "int4" and dim % 2:
        raise ValueError(f"int4 rows pack two values a byte: dim must be even, got {dim}")


def overflowing(values: np.ndarray, fmt: RowFormat) -> np.ndarray:
    """Which float32 rows `values` [n, dim] `fmt` cannot store (bool [n]): fp16 values, and an int4
    row's fp16 scale and bias, overflow beyond 65504 (the row would read as infinity or NaN)."""
    if fmt not in ("fp16", "int4") or values.size == 0:
        return np.zeros(len(values), dtype=bool)
    if fmt == "fp16":
        return np.abs(values).max(axis=1) > FP16_MAX  # type: ignore[no-any-return]
    low, high = values.min(axis=1), values.max(axis=1)
    return (np.abs(low) > FP16_MAX) | ((high - low) / 15 > FP16_MAX)  # type: ignore[no-any-return]


OVERFLOW_HINT = (
    "fp16 rows hold values within +-65504; int4 rows need per row |min| and (max - min) / 15 within it"
)


def encode(rows: np.ndarray, fmt: RowFormat, out: np.ndarray) -> None:
    """Write float32 `rows` [n, dim] into `out` [n, width] in `fmt`."""
    if fmt == "int8":
        out[:] = torch.ops.quantized.embedding_bag_byte_prepack(torch.from_numpy(rows)).numpy()
    elif fmt == "int4":
        out[:] = torch.ops.quantized.embedding_bag_4bit_prepack(torch.from_numpy(rows)).numpy()
    else:
        out[:] = rows  # numpy rounds to nearest for fp16


def decode(stored: Tensor, fmt: RowFormat) -> Tensor:
    """The float32 values [n, dim] of stored rows [n, width]."""
    if fmt == "int8":
        return torch.ops.quantized.embedding_bag_byte_unpack(stored)  # type: ignore[no-any-return]
    if fmt == "int4":
        return torch.ops.quantized.embedding_bag_4bit_unpack(stored)  # type: ignore[no-any-return]
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
    if fmt == "int4":
        return torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(  # type: ignore[no-any-return]
            table, rows, offsets, False, 0, False, weights, None, False
        )
    if fmt == "fp16":
        gathered = table.index_select(0, rows).to(torch.float32)
        rows = torch.arange(len(rows), dtype=rows.dtype)
        table = gathered
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
