"""End to end: real Criteo rows, preprocessed like Meta's reference, served from a reference-format
checkpoint by `flexemr serve`, every score equal to the monolithic model's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.client import Client
from flexemr.model.dlrm import DLRM, init_dense
from flexemr.workload.criteo import CriteoReplay, criteo_spec
from tests.conftest import SHARED_DATA, ServeProcess
from tests.core.helpers import reference_scores

pytestmark = pytest.mark.slow  # multi-process; `make test-fast` leaves it out


def test_criteo_sample_served_exactly(tmp_path: Path, serve: Callable[..., ServeProcess]) -> None:
    spec = criteo_spec(rows_per_table=1000, dim=16)
    model = DLRM(spec)
    init_dense(model, seed=11)
    with torch.no_grad():
        for table in model.emb_l:
            table.weight.uniform_(-0.05, 0.05)
    path = tmp_path / "criteo_dlrm.pt"
    torch.save(model.state_dict(), path)

    replay = CriteoReplay(SHARED_DATA / "criteo_kaggle_sample_1000.tsv", spec)
    assert len(replay) == 1000
    server = serve("--checkpoint", str(path), "--embedding-servers", "3", "--sharding", "row")
    served = []
    with Client(server.url) as client:
        for _ in range(0, 1000, 250):
            request = replay.generate(250)
            scores = client.infer(request.dense, request.indices, request.lengths)
            np.testing.assert_allclose(
                scores,
                reference_scores(model.eval(), request.dense, request.indices, request.lengths),
                atol=1e-5,
            )
            served.append(scores)
    scores = np.concatenate(served)
    assert scores.shape == (1000,)
    assert np.all((scores > 0) & (scores < 1))
    assert np.unique(scores).size > 100  # the rows really differ: features reached the model
