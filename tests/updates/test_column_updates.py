"""Row updates on a column-sharded cluster (real processes, 2 column blocks, 2 copies, int8, fp32
and fp16 tables): an update of a row reaches every column shard of it, on every copy, at one
version; each slice reads back exactly as the monolith's updated row in those columns; scores stay
exact, with a cache of whole rows invalidated."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.engine.link import links
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model import rows as stored_rows
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol.frames import MessageType
from flexemr.sharding.plan import make_plan, replicated
from flexemr.updates import RowUpdates, Updater
from tests.core.helpers import random_batch, wait_for_cached_rows
from tests.updates.helpers import rows_of
from tests.updates.test_cluster_updates import Live

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    source = ModelSource(preset="tiny", seed=13, row_dtype="int8,fp32,fp16,int4")
    model = model_spec(source)
    plan = replicated(make_plan("column", model.table_rows, model.dim, 2, column_shards=2), 2)
    with LocalCluster(ClusterSpec(source, plan, tuple(Endpoint() for _ in range(4)))) as cluster:
        spec = cluster.spec
        cached = RankerConfig(lookup="raw", cache=CacheMode.parse("fixed:1MiB"))
        rankers = [build_ranker(spec), build_ranker(dataclasses.replace(spec, ranker=cached))]
        state = Live(
            spec, cluster, rankers, build_monolithic(load_weights(source)), Updater(spec), links(spec)
        )
        yield state
        state.updater.close()
        for link in state.links:
            link.close()
        for ranker in rankers:
            ranker.close()


def test_an_update_reaches_every_column_shard_at_one_version(live: Live) -> None:
    live.check_scores(seed=1)
    wait_for_cached_rows(live.rankers[1].stats)
    live.check_scores(seed=1)  # the cache now holds whole rows of this batch
    _, indices, lengths = random_batch(live.mono.spec, 16, 1)
    tables, rows = rows_of(live.mono.spec, indices, lengths)
    values = np.random.default_rng(3).standard_normal((tables.size, live.mono.spec.dim)).astype(np.float32)
    version = live.apply(RowUpdates(tables, rows, values))
    live.wait_for(version)
    live.check_scores(seed=1)  # no cached whole row serves its old value
    cache = live.rankers[1].stats()["cache"]
    assert cache["hits"] > 0 and cache["invalidated"] > 0
    assert all(link.changes(0).version == version for link in live.links)
    plan, spec = live.spec.sharding, live.mono.spec
    for t, r in list(zip(tables.tolist(), rows.tolist(), strict=True))[:12]:
        weight = live.mono.emb_l[t].weight.detach()[r : r + 1]
        want = stored_rows.decode(weight, spec.formats[t]).numpy()[0]
        holders = [s for s in plan.shards if s.table == t and s.row_start <= r < s.row_end]
        assert len(holders) == 2 * 2  # 2 column blocks, 2 copies of each
        for shard in holders:  # each column slice is the updated row's columns, exactly
            first, last = shard.columns(plan.dim)
            local = np.array([r - shard.row_start + shard.local_start], dtype=np.int64)
            answer = live.links[shard.server].request(
                MessageType.LOOKUP, [local, np.zeros(1, dtype=np.int64)]
            )
            np.testing.assert_array_equal(answer.buffers[0][0][: last - first], want[first:last])
