"""Plans whose rows have different numbers of copies (hot ranges replicated more): the router, and
failover between the copies, in process."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import with_local_offsets
from flexemr.sharding.router import RangeRouter, Uncovered
from flexemr.transport.base import NoReplica
from tests.core.helpers import random_batch, reference_scores
from tests.ranker.test_replicas import FailingTransport

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)  # tables of 100, 50, 200, 30 rows


def hot_plan(replicas: int = 1) -> ShardingPlan:
    """Table 0 rows [0, 10) on servers 0, 1, 2 (hot); the rest of table 0 on server 1 (and 3 with
    two replicas); tables 1..3 on server 2 (and 3)."""
    shards = [Shard(0, 0, 10, s) for s in (0, 1, 2)] + [Shard(0, 10, 100, 1)]
    shards += [Shard(t, 0, SPEC.table_rows[t], 2) for t in (1, 2, 3)]
    if replicas == 2:
        shards += [Shard(0, 10, 100, 3)] + [Shard(t, 0, SPEC.table_rows[t], 3) for t in (1, 2, 3)]
        shards += [Shard(0, 0, 10, 3)]
    return ShardingPlan(4, SPEC.table_rows, SPEC.dim, with_local_offsets(shards), "hot-range", replicas)


def test_a_plan_with_more_copies_of_a_hot_range_round_trips_and_describes_its_copies() -> None:
    plan = hot_plan()
    assert plan.copies(0) == [(0, 10, 3), (10, 100, 1)] and plan.copies(1) == [(0, 50, 1)]
    assert ShardingPlan.from_dict(json.loads(plan.to_json())) == plan
    old: dict[str, Any] = json.loads(plan.to_json())
    del old["replicas"]  # a plan file from before replica counts per range: one copy
    assert ShardingPlan.from_dict(old).replicas == 1


def test_router_sends_hot_keys_to_any_of_their_copies_and_cold_keys_to_their_one_holder() -> None:
    router = RangeRouter(hot_plan())
    assert (router.replicas, router.max_copies) == (1, 3)
    keys = np.array([3, 4, 50, 120], dtype=np.int64)  # table 0 rows 3, 4 (hot), 50; table 1 row 20
    lengths = np.array([2, 1, 1])
    for preferred in range(3):
        rank = np.full(4, 5.0)
        rank[preferred] = 0.0
        subs = {s.server: s for s in router.route(keys, lengths, rank)}
        hot = subs.get(preferred)
        assert hot is not None and {3, 4} <= set(hot.keys.tolist())
        assert sum(s.rows.size for s in subs.values()) == keys.size
        assert 50 in subs[1].keys and 120 in subs[2].keys  # cold rows: their only holder
    # hot rows survive two of their three holders being unusable; a cold row's only holder is not
    rank = np.array([np.inf, np.inf, 0.0, 0.0])
    assert {s.server for s in router.route(keys[:2], np.array([2]), rank)} == {2}
    with pytest.raises(Uncovered, match=r"table 0 rows \[10, 100\).*embedding server 1 \("):
        list(router.route(keys, lengths, rank))
    assert router.coverable(np.array([False, True, True, False]))
    assert not router.coverable(np.array([True, False, True, True]))


def test_router_refuses_two_copies_of_a_row_on_one_server() -> None:
    shards = (Shard(0, 0, 100, 0), Shard(0, 0, 100, 1), Shard(0, 0, 100, 1, local_start=100))
    with pytest.raises(ValueError, match="twice"):
        ShardingPlan(2, (100,), 4, shards)


@pytest.mark.parametrize("replicas", [1, 2])
def test_failover_of_a_hot_ranges_copy_keeps_scores_exact(replicas: int) -> None:
    """Server 0 holds only a copy of the hot range: with it failing, hot rows are read from another
    copy, whatever the fewest copies of a row; with a cold row's only holder failing, the request
    fails loudly."""
    plan = hot_plan(replicas)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(4)))
    spec = ClusterSpec.from_dict({**spec.to_dict(), "ranker": {"request_timeout_s": 2.0}})
    transport = FailingTransport(plan, load_weights(SOURCE))
    ranker = build_ranker(spec, transport=transport)
    monolithic = build_monolithic(load_weights(SOURCE))
    try:
        dense, indices, lengths = random_batch(SPEC, 16, seed=7)
        indices[: lengths.reshape(4, -1)[0].sum()] %= 10  # every table 0 lookup in the hot range
        expected = reference_scores(monolithic, dense, indices, lengths)
        transport.failing = {0}
        for _ in range(60):  # each batch prefers one of the three copies at random (none is busy)
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), expected, atol=1e-5)
            if transport.sent[0] >= 3:
                break
        assert transport.sent[0] >= 3 and ranker.failovers >= 3  # asked, failed, routed around
        if replicas == 1:
            transport.failing = {2}  # tables 1..3 have one copy, on server 2
            with pytest.raises(NoReplica, match="embedding server 2"):
                ranker.score(dense, indices, lengths)
    finally:
        ranker.close()
