"""DLRM split the way flexemr serves it: a dense part on the ranker, tables on embedding servers.

`DenseArch` is the bottom MLP, the interaction and the top MLP. `DLRM` adds the tables as
`nn.EmbeddingBag`s and is the monolithic model: its `state_dict` keys are those of Meta's reference
`DLRM_Net` (`emb_l.{t}.weight`, `bot_l.{2k}.weight`, `top_l.{2k}.bias`, ...), so a checkpoint of
one loads into the other. A table stored as fp16, int8 or int4 rows (`flexemr.model.rows`) is a
`StoredBag` holding those same bytes, pooled by the embedding servers' kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from flexemr.config.model import RowFormat
from flexemr.model import rows as stored_rows
from flexemr.model.spec import ModelSpec


def _mlp(sizes: tuple[int, ...], sigmoid_last: bool) -> nn.Sequential:
    """Linear layers with ReLU after each; the last gets a sigmoid instead when `sigmoid_last`."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        last = i == len(sizes) - 2
        layers.append(nn.Sigmoid() if last and sigmoid_last else nn.ReLU())
    return nn.Sequential(*layers)


def _lower_triangle(n: int, itself: bool) -> tuple[Tensor, Tensor]:
    """Row-major (i, j) pairs of the strict lower triangle, or with the diagonal when `itself`."""
    offset = 1 if itself else 0
    rows = [i for i in range(n) for _ in range(i + offset)]
    cols = [j for i in range(n) for j in range(i + offset)]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


class DenseArch(nn.Module):
    """Bottom MLP -> interaction with the pooled embeddings -> top MLP -> click probability."""

    _li: Tensor
    _lj: Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.bot_l = _mlp(spec.bottom_mlp, sigmoid_last=False)
        self.top_l = _mlp((spec.interaction_size, *spec.top_mlp), sigmoid_last=True)
        li, lj = _lower_triangle(spec.num_tables + 1, spec.interaction_itself)
        self.register_buffer("_li", li, persistent=False)
        self.register_buffer("_lj", lj, persistent=False)

    def interact(self, x: Tensor, pooled: Tensor) -> Tensor:
        """`x` [B, d] and `pooled` [B, T, D] -> [B, interaction_size], as the reference computes it."""
        if self.spec.interaction == "cat":
            return torch.cat([x, pooled.flatten(1)], dim=1)
        features = torch.cat([x.unsqueeze(1), pooled], dim=1)
        z = torch.bmm(features, features.transpose(1, 2))
        return torch.cat([x, z[:, self._li, self._lj]], dim=1)

    def forward(self, dense: Tensor, pooled: Tensor) -> Tensor:
        """`dense` [B, num_dense], `pooled` [B, T, D] -> scores [B]."""
        x = self.bot_l(dense)
        return self.top_l(self.interact(x, pooled)).squeeze(1)  # type: ignore[no-any-return]


class StoredBag(nn.Module):
    """An embedding bag over rows stored in `fmt` (its `weight` buffer holds the stored bytes)."""

    weight: Tensor

    def __init__(self, num_rows: int, dim: int, fmt: RowFormat, mode: str) -> None:
        super().__init__()
        self.fmt, self.mode = fmt, mode
        dtype, width = stored_rows.storage(fmt, dim)
        self.register_buffer("weight", torch.from_numpy(np.zeros((num_rows, width), dtype=dtype)))

    def forward(self, indices: Tensor, offsets: Tensor) -> Tensor:
        pooled = stored_rows.pool(self.weight, self.fmt, indices, offsets)
        if self.mode == "mean":
            ends = torch.cat([offsets[1:], torch.tensor([len(indices)])])
            pooled /= (ends - offsets).clamp(min=1).unsqueeze(1)
        return pooled


def _table(num_rows: int, spec: ModelSpec, fmt: RowFormat) -> nn.Module:
    if fmt == "fp32":
        return nn.EmbeddingBag(num_rows, spec.dim, mode=spec.pooling)
    return StoredBag(num_rows, spec.dim, fmt, spec.pooling)


class DLRM(DenseArch):
    """The monolithic model: the dense part plus every table, all in one process."""

    emb_l: nn.ModuleList

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.emb_l = nn.ModuleList(
            _table(n, spec, fmt) for n, fmt in zip(spec.table_rows, spec.formats, strict=True)
        )

    def pool(self, indices: Tensor, lengths: Tensor, batch_size: int) -> Tensor:
        """KeyedJaggedTensor-layout indices and table-major lengths -> pooled [B, T, D]."""
        per_table = lengths.view(self.spec.num_tables, batch_size).to(torch.long)
        rows_per_table = per_table.sum(dim=1).tolist()
        outputs = []
        for table, bag, lens in zip(self.emb_l, torch.split(indices, rows_per_table), per_table, strict=True):
            offsets = torch.cumsum(lens, 0) - lens
            outputs.append(table(bag, offsets))
        return torch.stack(outputs, dim=1)

    def forward_sparse(self, dense: Tensor, indices: Tensor, lengths: Tensor) -> Tensor:
        return self.forward(dense, self.pool(indices, lengths, dense.shape[0]))


def init_dense(model: nn.Module, seed: int) -> None:
    """Deterministic MLP initialisation from a seed (Xavier-normal weights, as the reference)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("emb_l"):
                continue
            if name.endswith("weight"):
                std = (2.0 / (param.shape[0] + param.shape[1])) ** 0.5
                param.normal_(0.0, std, generator=gen)
            else:
                param.normal_(0.0, (1.0 / param.shape[0]) ** 0.5, generator=gen)
