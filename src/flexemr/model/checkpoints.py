"""Reading the checkpoints users have into the reference `DLRM_Net` names flexemr serves.

Meta's reference (`dlrm_s_pytorch.py --save-model`) saves a dict: the model under `state_dict`,
beside it the optimizer's state and numpy scalars and 0-d arrays (losses, accuracies). Those are
loaded with torch's restricted unpickler (`weights_only=True`) with the numpy types allow-listed:
never a full unpickle, which would run whatever the file says.

TorchRec's `DLRM` (and a `DLRMTrain` wrapping it under `model.`) names its parameters

    sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight   -> emb_l.<t>.weight
    dense_arch.model._mlp.<i>._linear.{weight,bias}                      -> bot_l.<2i>.*
    over_arch.model.0._mlp.<i>._linear.{weight,bias}                     -> top_l.<2i>.*
    over_arch.model.1.{weight,bias}  (the last layer)                    -> top_l.<2n>.*

Tables keep their order in the state_dict (the EmbeddingBagCollection's config order, one feature
per table). TorchRec's interaction lists the pairwise dots of the upper triangle row by row
(`triu_indices(F + 1, F + 1, offset=1)`), the reference the lower triangle row by row: the same
dots in another order, so the over arch's first layer has its input columns permuted to match.
TorchRec's DLRM returns logits; flexemr's top MLP ends in a sigmoid, so it serves the probability.

Files are memory-mapped (rows are read on demand). PyTorch wrote another format before 1.6 (and
later with `_use_new_zipfile_serialization=False`), what 2019-20 DLRM runs saved: it cannot be
mapped, so it is read whole into memory, and the log says how much.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy._core import multiarray
from torch import Tensor

_NUMPY_SAFE: list[Any] = [
    np.ndarray,
    np.dtype,
    (multiarray.scalar, "numpy.core.multiarray.scalar"),  # numpy 1 wrote numpy.core
    multiarray.scalar,
    (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    multiarray._reconstruct,
    *(type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "?")),
]
"""What Meta's reference puts beside the weights: numpy scalars and 0-d arrays of plain dtypes."""


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _NUMPY_SAFE}


log = logging.getLogger(__name__)

_LEGACY_STARTS = [
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)
]
"""How a file in torch.save's pre-1.6 format begins: its magic number, pickled alone."""

_TORCHREC_TABLE = re.compile(r"^(.*)sparse_arch\.embedding_bag_collection\.embedding_bags\.(.+)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint flexemr cannot serve; the message says what is missing or not allowed."""


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """The model's tensors under the reference's names (memory-mapped: rows are read on demand)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            state = _load(path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects a safe load does not allow: {_unsafe_globals(path, exc)} (only tensors, "
            "plain containers and numpy scalars are; save the model's state_dict alone to serve it)"
        ) from None
    except RuntimeError as exc:  # not a torch.save file at all
        raise CheckpointError(f"{path} is not a torch.save checkpoint: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Meta's --save-model: epoch, losses, opt_state_dict beside it
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict (a dict of tensor names to tensors)")
    if any(_TORCHREC_TABLE.match(k) for k in state):
        return from_torchrec(state)
    return state


def _load(path: Path) -> Any:
    """The file's objects, memory-mapped unless it is in the pre-1.6 format."""
    if zipfile.is_zipfile(path):
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    with open(path, "rb") as f:
        start = f.read(max(len(h) for h in _LEGACY_STARTS))
    if not any(start.startswith(h) for h in _LEGACY_STARTS):
        raise CheckpointError(
            f"{path} is not a torch.save checkpoint (neither a zip archive nor the older format)"
        )
    log.warning(
        "%s is in torch.save's format from before PyTorch 1.6, which cannot be memory-mapped: reading "
        "all of it into memory (%.1f MiB); torch.save it again with a recent PyTorch to map it instead",
        path,
        Path(path).stat().st_size / 2**20,
    )
    return torch.load(path, weights_only=True, map_location="cpu")


def _unsafe_globals(path: Path, exc: pickle.UnpicklingError) -> str:
    """What the file holds that a safe load refuses: all of it from a zip archive's index, else the
    first, from the unpickler's message."""
    if zipfile.is_zipfile(path):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _allowed_names()
        return ", ".join(sorted(unsafe))
    first = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return first.group(1) if first else str(exc).splitlines()[-1]


def from_torchrec(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A TorchRec DLRM state_dict under the reference's names (see the module docstring)."""
    tables = [(m.group(1), v) for k, v in state.items() if (m := _TORCHREC_TABLE.match(k))]
    prefix = tables[0][0]
    if any(k.startswith(f"{prefix}inter_arch.") for k in state):
        raise CheckpointError(
            "this TorchRec model has interaction_arch parameters (DLRM_DCN or DLRM_Projection); "
            "only DLRM's parameter-free dot interaction is supported"
        )
    bottom = _mlp(state, f"{prefix}dense_arch.model._mlp.", "bot_l")
    top = _mlp(state, f"{prefix}over_arch.model.0._mlp.", "top_l")
    last = len(top) // 2
    for part in ("weight", "bias"):
        key = f"{prefix}over_arch.model.1.{part}"
        if key not in state:
            raise CheckpointError(f"the TorchRec checkpoint has no {key} (the over arch's last layer)")
        top[f"top_l.{2 * last}.{part}"] = state[key]
    dense = bottom[f"bot_l.{2 * (len(bottom) // 2 - 1)}.weight"].shape[0]
    top["top_l.0.weight"] = _reorder_interaction(top["top_l.0.weight"], dense, len(tables))
    return {f"emb_l.{t}.weight": w for t, (_, w) in enumerate(tables)} | bottom | top


def _mlp(state: dict[str, Tensor], prefix: str, name: str) -> dict[str, Tensor]:
    layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    if not layers:
        raise CheckpointError(f"the TorchRec checkpoint has no {prefix}<i>._linear.weight layers")
    out = {}
    for i in layers:
        for part in ("weight", "bias"):
            key = f"{prefix}{i}._linear.{part}"
            if key not in state:
                raise CheckpointError(f"the TorchRec checkpoint has no {key}")
            out[f"{name}.{2 * i}.{part}"] = state[key]
    return out


def _reorder_interaction(weight: Tensor, dense: int, tables: int) -> Tensor:
    """Columns of the over arch's first layer from TorchRec's upper-triangle order to the
    reference's lower-triangle order (the first `dense` columns are the dense vector itself)."""
    n = tables + 1
    upper = torch.triu_indices(n, n, offset=1)
    position = {(int(i), int(j)): k for k, (i, j) in enumerate(upper.T.tolist())}
    lower = [position[(j, i)] for i in range(n) for j in range(i)]
    if weight.shape[1] != dense + len(lower):
        raise CheckpointError(
            f"the over arch takes {weight.shape[1]} inputs but the dot interaction of {tables} tables "
            f"and a {dense}-wide dense arch gives {dense + len(lower)}"
        )
    columns = torch.cat([torch.arange(dense), dense + torch.tensor(lower, dtype=torch.long)])
    return weight[:, columns].contiguous()
