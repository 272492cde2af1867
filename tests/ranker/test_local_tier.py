"""The local tier (every table in the ranker's process) pools a batch with one direct call."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.roles import build_ranker
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.ranker.turns import PROCESS_TURNS
from flexemr.sharding.plan import make_plan
from flexemr.transport.local import LocalTransport
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)


@pytest.mark.parametrize(("servers", "direct"), [(1, True), (2, False)])
def test_scores_equal_the_monolithic_models_with_empty_bags(servers: int, direct: bool) -> None:
    plan = make_plan("table", SPEC.table_rows, SPEC.dim, servers)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(servers)), ranker=RankerConfig())
    ranker = build_ranker(spec, transport=LocalTransport(plan, load_weights(SOURCE)))
    try:
        assert (ranker._whole_store is not None) is direct
        dense, indices, lengths = random_batch(SPEC, 32, seed=8)
        lengths = lengths.copy()
        lengths[::3] = 0  # empty bags pool to zeros
        offsets = np.concatenate([[0], np.cumsum(random_batch(SPEC, 32, seed=8)[2])])
        kept = np.concatenate(
            [indices[offsets[b] : offsets[b + 1]] for b in range(lengths.size) if lengths[b]]
        )
        expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, kept, lengths)
        np.testing.assert_array_equal(ranker.score(dense, kept, lengths), expected)
    finally:
        ranker.close()


@pytest.mark.parametrize("row_dtype", ["fp16", "int8", "int4", "int8,fp32,fp16,int4"])
def test_the_direct_call_scores_every_row_format_as_the_stores_lookup_does(row_dtype: str) -> None:
    """One row format: the local tier calls the pooling kernel itself (no store in between); mixed
    formats: the store's pooled call. Either way the scores equal, bit for bit, those of the same
    rows looked up from two stores (`ShardStore.pooled` per server, as an embedding server answers)."""
    source = ModelSource(preset="tiny", seed=4, row_dtype=row_dtype)
    spec, weights = model_spec(source), load_weights(source)
    dense, indices, lengths = random_batch(spec, 48, seed=5)
    scores = []
    for servers in (1, 2):
        plan = make_plan("table", spec.table_rows, spec.dim, servers)
        cluster = ClusterSpec(source, plan, tuple(Endpoint() for _ in range(servers)), ranker=RankerConfig())
        ranker = build_ranker(cluster, transport=LocalTransport(plan, weights))
        try:
            assert (ranker._whole_store is not None) is (servers == 1)
            scores.append(ranker.score(dense, indices, lengths))
        finally:
            ranker.close()
    np.testing.assert_array_equal(scores[0], scores[1])


def test_another_request_takes_its_turn_while_one_is_in_the_pooling_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The local tier's kernel runs with the turn given up: a second request's Python (here a thread
    that takes a turn) runs while the first pools, and the scores are unchanged."""
    plan = make_plan("table", SPEC.table_rows, SPEC.dim, 1)
    spec = ClusterSpec(SOURCE, plan, (Endpoint(),), ranker=RankerConfig())
    ranker = build_ranker(spec, transport=LocalTransport(plan, load_weights(SOURCE)))
    kernel = stored_rows.pool
    others_turn = threading.Event()
    turn_taken_during_the_kernel: list[bool] = []

    def pool_while_another_takes_a_turn(*args: Any) -> torch.Tensor:
        def take_a_turn() -> None:
            with PROCESS_TURNS.turn():
                others_turn.set()

        other = threading.Thread(target=take_a_turn)
        other.start()
        other.join(timeout=10)  # with the turn held here, it would wait until the dense forward
        turn_taken_during_the_kernel.append(others_turn.is_set())
        sums: torch.Tensor = kernel(*args)
        return sums

    monkeypatch.setattr(stored_rows, "pool", pool_while_another_takes_a_turn)
    try:
        dense, indices, lengths = random_batch(SPEC, 16, seed=2)
        with PROCESS_TURNS.turn():  # as the front door scores a request
            scores = ranker.score(dense, indices, lengths)
        assert turn_taken_during_the_kernel == [True]
        np.testing.assert_array_equal(
            scores, reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
        )
    finally:
        ranker.close()
