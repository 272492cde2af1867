"""`--save-model` files in torch.save's format from before PyTorch 1.6 (what 2019-20 DLRM runs wrote):
they cannot be memory-mapped, so they are read whole (the log says how much) and served exactly."""

from __future__ import annotations

import logging
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
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch
from tests.model.test_reference_checkpoint import formula_forward, reference_state_dict


class Payload:
    """Stands for anything a safe load must refuse to build."""


def save_legacy(contents: object, path: Path) -> None:
    torch.save(contents, path, _use_new_zipfile_serialization=False)


def test_a_legacy_save_model_file_serves_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = reference_state_dict(itself=False)
    path = tmp_path / "dlrm-2019.pt"
    save_legacy(
        {"epoch": 0, "iter": 100, "state_dict": state, "train_acc": np.float64(0.78),
         "test_loss": np.array(0.47, dtype=np.float32), "total_loss": np.int64(0)},
        path,
    )  # fmt: skip
    source = ModelSource(checkpoint=str(path))
    with caplog.at_level(logging.WARNING, "flexemr.model.checkpoints"):
        spec = model_spec(source)
    size = f"{path.stat().st_size / 2**20:.1f} MiB"
    assert any("before PyTorch 1.6" in r.message and size in r.message for r in caplog.records)
    dense, indices, lengths = random_batch(spec, 9, seed=4)
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(), Endpoint()))) as cluster:
        ranker = build_ranker(cluster.spec)
        try:
            scores = ranker.score(dense, indices, lengths)
        finally:
            ranker.close()
    np.testing.assert_allclose(scores, formula_forward(state, dense, indices, lengths, False), atol=1e-5)


def test_a_legacy_file_with_other_objects_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    save_legacy({"state_dict": reference_state_dict(itself=False), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"safe load does not allow.*Payload"):
        model_spec(ModelSource(checkpoint=str(path)))


def test_a_file_in_neither_format_is_named_so(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"not a torch\.save checkpoint"):
        model_spec(ModelSource(checkpoint=str(path)))
