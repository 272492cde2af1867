"""A checkpoint in the reference `DLRM_Net` state_dict format loads and scores like the formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import CheckpointWeights, build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores

pytestmark = pytest.mark.slow  # multi-process; `make test-fast` leaves it out

ROWS = (40, 25, 60)
DIM = 4


def reference_state_dict(itself: bool) -> dict[str, torch.Tensor]:
    """What Meta's dlrm_s_pytorch.py saves for --arch-mlp-bot 5-6-4 --arch-mlp-top 8-1 (Sequential
    of Linear/ReLU, so Linear layers sit at even indices)."""
    g = torch.Generator().manual_seed(123)
    pairs = (len(ROWS) + 1) * (len(ROWS) + (2 if itself else 0)) // 2
    top_in = DIM + pairs
    shapes = {
        "bot_l.0": (6, 5), "bot_l.2": (4, 6),
        "top_l.0": (8, top_in), "top_l.2": (1, 8),
    }  # fmt: skip
    state = {f"emb_l.{t}.weight": torch.rand(r, DIM, generator=g) - 0.5 for t, r in enumerate(ROWS)}
    for name, (out, inp) in shapes.items():
        state[f"{name}.weight"] = torch.randn(out, inp, generator=g) * 0.3
        state[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def formula_forward(state: dict[str, torch.Tensor], dense: np.ndarray, indices: np.ndarray,
                    lengths: np.ndarray, itself: bool) -> np.ndarray:  # fmt: skip
    """DLRM written out from the formulas: no flexemr code involved."""
    batch = dense.shape[0]
    x = torch.from_numpy(dense)
    x = torch.relu(x @ state["bot_l.0.weight"].T + state["bot_l.0.bias"])
    x = torch.relu(x @ state["bot_l.2.weight"].T + state["bot_l.2.bias"])
    vectors = [x]
    pos = 0
    lens = lengths.reshape(len(ROWS), batch)
    for t in range(len(ROWS)):
        pooled = torch.zeros(batch, DIM)
        for b in range(batch):
            rows = indices[pos : pos + lens[t, b]]
            pos += lens[t, b]
            pooled[b] = state[f"emb_l.{t}.weight"][torch.from_numpy(rows)].sum(0)
        vectors.append(pooled)
    feats = []
    for i in range(len(vectors)):
        for j in range(i + 1 if itself else i):
            feats.append((vectors[i] * vectors[j]).sum(1, keepdim=True))
    z = torch.cat([x, *feats], dim=1)
    z = torch.relu(z @ state["top_l.0.weight"].T + state["top_l.0.bias"])
    return torch.sigmoid(z @ state["top_l.2.weight"].T + state["top_l.2.bias"]).squeeze(1).numpy()


@pytest.mark.parametrize("itself", [False, True])
def test_reference_checkpoint_serves_formula_scores(tmp_path: Path, itself: bool) -> None:
    state = reference_state_dict(itself)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    source = ModelSource(checkpoint=str(path), interaction="dot", interaction_itself=itself)
    spec = model_spec(source)
    assert spec.table_rows == ROWS and spec.bottom_mlp == (5, 6, 4) and spec.top_mlp == (8, 1)
    dense, indices, lengths = random_batch(spec, 6, seed=1)
    expected = formula_forward(state, dense, indices, lengths, itself)
    monolithic = build_monolithic(load_weights(source))
    np.testing.assert_allclose(reference_scores(monolithic, dense, indices, lengths), expected, atol=1e-5)
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(), Endpoint()), RankerConfig())) as cluster:
        ranker = build_ranker(cluster.spec)
        try:
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), expected, atol=1e-5)
        finally:
            ranker.close()


def test_checkpoint_with_wrong_interaction_flag_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(reference_state_dict(itself=False), path)
    with pytest.raises(ValueError, match="check --interaction"):
        CheckpointWeights(path, interaction="dot", interaction_itself=True)
