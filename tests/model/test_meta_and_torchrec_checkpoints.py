"""The checkpoints users have: Meta's `--save-model` files and TorchRec DLRM state_dicts, built here
with plain torch (no torchrec install), load and score as their own formulas say."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.checkpoints import CheckpointError
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores
from tests.model.test_reference_checkpoint import formula_forward, reference_state_dict

ROWS = (40, 25, 60)
DIM = 4


def test_meta_save_model_file_loads_safely(tmp_path: Path) -> None:
    state = reference_state_dict(itself=False)
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()  # momentum buffers in the optimizer state
    path = tmp_path / "dlrm.pt"
    torch.save(
        {
            "epoch": 0, "nepochs": 1, "nbatches": 100, "nbatches_test": 10, "iter": 100,
            "state_dict": state, "opt_state_dict": optimizer.state_dict(),
            "train_acc": np.float64(0.78), "train_loss": np.float32(0.46), "test_acc": np.array(0.77),
            "test_loss": np.array(0.47, dtype=np.float32), "total_loss": np.int64(0),
        },
        path,
    )  # fmt: skip
    source = ModelSource(checkpoint=str(path))
    dense, indices, lengths = random_batch(model_spec(source), 9, seed=4)
    got = reference_scores(build_monolithic(load_weights(source)), dense, indices, lengths)
    np.testing.assert_allclose(got, formula_forward(state, dense, indices, lengths, False), atol=1e-5)


class Payload:
    """Stands for anything a safe load must refuse to build."""


def test_a_file_with_other_objects_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": reference_state_dict(itself=False), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"safe load does not allow.*Payload"):
        model_spec(ModelSource(checkpoint=str(path)))


def torchrec_state_dict(prefix: str) -> dict[str, torch.Tensor]:
    """TorchRec DLRM(dense_in_features=5, dense_arch_layer_sizes=[6, 4], over_arch_layer_sizes=[8, 1])
    over an EmbeddingBagCollection of three tables, as its state_dict names them."""
    g = torch.Generator().manual_seed(9)
    tables = f"{prefix}sparse_arch.embedding_bag_collection.embedding_bags"
    state = {f"{tables}.t_cat_{t}.weight": torch.rand(r, DIM, generator=g) - 0.5 for t, r in enumerate(ROWS)}
    over_in = DIM + math.comb(len(ROWS) + 1, 2)
    layers = {
        "dense_arch.model._mlp.0._linear": (6, 5), "dense_arch.model._mlp.1._linear": (4, 6),
        "over_arch.model.0._mlp.0._linear": (8, over_in), "over_arch.model.1": (1, 8),
    }  # fmt: skip
    for name, (out, inp) in layers.items():
        state[f"{prefix}{name}.weight"] = torch.randn(out, inp, generator=g) * 0.3
        state[f"{prefix}{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def torchrec_formula(state: dict[str, torch.Tensor], prefix: str, dense: np.ndarray, indices: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray:  # fmt: skip
    """TorchRec's DLRM forward written out (upper-triangle interaction), then the sigmoid."""
    p = prefix
    x = torch.from_numpy(dense)
    x = torch.relu(
        x @ state[f"{p}dense_arch.model._mlp.0._linear.weight"].T
        + state[f"{p}dense_arch.model._mlp.0._linear.bias"]
    )
    x = torch.relu(
        x @ state[f"{p}dense_arch.model._mlp.1._linear.weight"].T
        + state[f"{p}dense_arch.model._mlp.1._linear.bias"]
    )
    tables = [
        state[f"{p}sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{t}.weight"]
        for t in range(len(ROWS))
    ]
    per_table = torch.from_numpy(lengths).view(len(ROWS), -1)
    bags = torch.split(torch.from_numpy(indices), per_table.sum(1).tolist())
    pooled = [
        torch.nn.functional.embedding_bag(b, w, torch.cumsum(n, 0) - n, mode="sum")
        for b, w, n in zip(bags, tables, per_table, strict=True)
    ]
    combined = torch.stack([x, *pooled], dim=1)
    z = torch.bmm(combined, combined.transpose(1, 2))
    i, j = torch.triu_indices(len(ROWS) + 1, len(ROWS) + 1, offset=1)
    h = torch.cat([x, z[:, i, j]], dim=1)
    h = torch.relu(
        h @ state[f"{p}over_arch.model.0._mlp.0._linear.weight"].T
        + state[f"{p}over_arch.model.0._mlp.0._linear.bias"]
    )
    logits = h @ state[f"{p}over_arch.model.1.weight"].T + state[f"{p}over_arch.model.1.bias"]
    return torch.sigmoid(logits).squeeze(1).numpy()  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "model."])  # DLRM, or DLRMTrain wrapping it
def test_torchrec_dlrm_state_dict_scores_as_torchrec_computes(tmp_path: Path, prefix: str) -> None:
    state = torchrec_state_dict(prefix)
    path = tmp_path / "torchrec.pt"
    torch.save(state, path)
    source = ModelSource(checkpoint=str(path))
    spec = model_spec(source)
    assert spec.table_rows == ROWS and spec.bottom_mlp == (5, 6, 4) and spec.top_mlp == (8, 1)
    dense, indices, lengths = random_batch(spec, 12, seed=2)
    expected = torchrec_formula(state, prefix, dense, indices, lengths)
    got = reference_scores(build_monolithic(load_weights(source)), dense, indices, lengths)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if prefix:
        return
    # served by real servers, rows stored as fp16: exact against the fp16 monolithic model
    fp16 = dataclasses.replace(source, row_dtype="fp16")
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    with LocalCluster(ClusterSpec(fp16, plan, (Endpoint(), Endpoint()))) as cluster:
        ranker = build_ranker(cluster.spec)
        try:
            want = reference_scores(build_monolithic(load_weights(fp16)), dense, indices, lengths)
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)
        finally:
            ranker.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("over_arch.model.1.bias"), "no over_arch.model.1.bias"),
        (
            lambda s: s.pop("dense_arch.model._mlp.1._linear.weight"),
            "no dense_arch.model._mlp.1._linear.weight",
        ),
        (lambda s: s.update({"inter_arch.crossnet.kernels.0": torch.zeros(1)}), "DLRM_DCN"),
    ],
)
def test_torchrec_checkpoint_errors_name_what_is_missing(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    state = torchrec_state_dict("")
    change(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        model_spec(ModelSource(checkpoint=str(tmp_path / "bad.pt")))
