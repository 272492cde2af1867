"""Column-sharded tables with replicas: a column block's subrequest fails over to another replica of
that block, scores stay exact, and a block with no replica left fails the request loudly."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable

import httpx
import pytest

from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import NoReplica
from tests.conftest import ServeProcess
from tests.core.helpers import assert_scores_like_the_monolith, random_batch
from tests.ranker.test_replicas import Load, _ready, _wait_until

pytestmark = pytest.mark.slow


def test_a_killed_column_replica_is_failed_over_exactly() -> None:
    """CW+RW (2 column blocks, one over 2 servers, one on 1), 2 copies, int8, fp16 and fp32 tables:
    with one server killed every score is still the monolith's, from partial sums and from raw rows
    into a cache of whole rows; with both copies of its rows killed the request fails, naming the
    rows and columns that no server can give."""
    source = ModelSource(preset="tiny", seed=9, row_dtype="int8,fp16,int4,fp32")
    spec = model_spec(source)
    plan = replicated(make_plan("column-row", spec.table_rows, spec.dim, 3, 2), 2)
    monolithic = build_monolithic(load_weights(source))
    with LocalCluster(ClusterSpec(source, plan, tuple(Endpoint() for _ in range(6)))) as cluster:
        cached = RankerConfig(lookup="raw", cache=CacheMode.parse("fixed:2KiB"))
        rankers = [build_ranker(cluster.spec), build_ranker(dataclasses.replace(cluster.spec, ranker=cached))]
        try:
            for ranker in rankers:
                assert_scores_like_the_monolith(ranker.score, monolithic, seeds=2)
            cluster.kill_server(0)
            for ranker in rankers:
                assert_scores_like_the_monolith(ranker.score, monolithic, seeds=4)
                assert ranker.failovers > 0 or not ranker.transport.connected()[0]
                assert ranker.replica_health()["every_shard_served"]
            cluster.kill_server(3)  # the other copy of server 0's rows
            batch = random_batch(spec, 32, 0, max_bag=8)  # rows of every range of every table
            for ranker in rankers:
                with pytest.raises(NoReplica, match=r"columns \[0, 4\) can answer: embedding server 0, 3"):
                    ranker.score(*batch)
                assert not ranker.replica_health()["every_shard_served"]
        finally:
            for ranker in rankers:
                ranker.close()


def test_flexemr_serve_column_sharding_survives_a_kill(serve: Callable[..., ServeProcess]) -> None:
    """`flexemr serve --sharding column --replicas 2`: kill -9 one server under steady load; every
    request is answered with the monolith's score."""
    server = serve(
        "--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--sharding", "column",
        "--column-shards", "2", "--replicas", "2", "--cache", "off",
    )  # fmt: skip
    children = server.children()
    assert len(children) == 4
    with httpx.Client(base_url=server.url, timeout=60) as client:
        load = Load(server.url, 60)
        load.wait_for(10)
        os.kill(children[0], signal.SIGKILL)
        load.join()
        assert load.statuses == [200] * 60 and load.wrong == 0, load.errors
        _wait_until(lambda: _ready(client)["status"] == 200, "the ranker is ready")
