"""int4 rows: FBGEMM's fused 4-bit row-wise layout, held as the same bytes and pooled by the same
kernel in the embedding servers and in the monolithic model, so served scores equal the monolithic
int4 model's whatever the sharding, cache or lookup mode; and an int4 row takes half an int8 row's
memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model import rows as stored_rows
from flexemr.model.presets import preset
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores, wait_for_cached_rows
from tests.model.test_row_formats import _rss_anon


def test_int4_rows_pack_two_values_a_byte_then_an_fp16_scale_and_bias() -> None:
    values = np.array([[0, 15, 1, 2, 3, 4, 5, 6], [-1, 1, -1, 1, 0, 0, 0, 0.5]], dtype=np.float32)
    stored = np.empty((2, stored_rows.row_bytes("int4", 8)), dtype=np.uint8)
    stored_rows.encode(values, "int4", stored)
    assert stored.shape == (2, 8 // 2 + 4)
    # row 0 spans 0..15: scale 1, bias 0, so its codes are its values, the even ones in the low nibble
    assert stored[0, :4].tolist() == [0 | 15 << 4, 1 | 2 << 4, 3 | 4 << 4, 5 | 6 << 4]
    assert stored[0, 4:].view(np.float16).tolist() == [1.0, 0.0]
    scale, bias = stored[1, 4:].view(np.float16).astype(np.float32)
    assert (scale, bias) == (np.float32(np.float16(2 / 15)), -1.0)
    decoded = stored_rows.decode(torch.from_numpy(stored), "int4").numpy()
    np.testing.assert_array_equal(decoded[0], values[0])
    np.testing.assert_array_less(np.abs(decoded[1] - values[1]), scale / 2 + 1e-3)  # to the nearest code


def test_int4_needs_an_even_dim() -> None:
    spec = preset("tiny")
    odd = dataclasses.replace(spec, dim=7, bottom_mlp=(4, 7), interaction="cat", row_formats=())
    with pytest.raises(ValueError, match="int4 rows pack two values a byte: dim must be even, got 7"):
        odd.with_overrides(row_formats=("int4",) * odd.num_tables)
    odd.with_overrides(row_formats=("int8",) * odd.num_tables)  # the other formats take any dim


def _checkpoint(tmp_path: Path) -> str:
    """Meta's reference state_dict of the tiny preset's fp32 model, saved as a checkpoint file."""
    model = build_monolithic(load_weights(ModelSource(preset="tiny", seed=9)))
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_checkpoint_row_int4_cannot_hold_is_refused_at_load(tmp_path: Path) -> None:
    state = build_monolithic(load_weights(ModelSource(preset="tiny", seed=9))).state_dict()
    state["emb_l.2.weight"][17, 3] = 1e6  # (max - min) / 15 beyond fp16's 65504
    torch.save(state, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="row 17 of table 2 cannot be stored as int4"):
        build_monolithic(load_weights(ModelSource(checkpoint=str(tmp_path / "big.pt"), row_dtype="int4")))
    build_monolithic(load_weights(ModelSource(checkpoint=str(tmp_path / "big.pt"), row_dtype="int8")))


@pytest.mark.parametrize(
    ("sharding", "row_dtype", "pooling"),
    [("row", "int4", "mean"), ("table", "int4,fp16,int4,int8", "sum")],
)
def test_served_int4_scores_equal_the_monolithic_int4_model(
    tmp_path: Path, sharding: str, row_dtype: str, pooling: str
) -> None:
    """A checkpoint's float tables stored as int4 (with --row-dtype) on 2 servers, row- or
    table-wise, with and without the cache, pooled on the servers or from raw rows."""
    source = ModelSource(checkpoint=_checkpoint(tmp_path), row_dtype=row_dtype, pooling=pooling)
    spec = model_spec(source)
    plan = make_plan(sharding, spec.table_rows, spec.dim, 2)
    monolithic = build_monolithic(load_weights(source))
    assert isinstance(monolithic.emb_l[0].weight, torch.Tensor)
    assert monolithic.emb_l[0].weight.shape == (spec.table_rows[0], spec.dim // 2 + 4)
    fp32 = build_monolithic(load_weights(dataclasses.replace(source, row_dtype=None)))
    cache = CacheMode.parse("fixed:64KiB")
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(), Endpoint()))) as cluster:
        for config in (
            RankerConfig(),
            RankerConfig(cache=cache),
            RankerConfig(lookup="raw"),
            RankerConfig(lookup="raw", cache=cache),
        ):
            ranker = build_ranker(dataclasses.replace(cluster.spec, ranker=config))
            try:
                for seed, batch in enumerate([1, 7, 64, 64, 64]):  # the repeats hit the cache
                    if seed == 3 and config.cache.kind != "off":
                        wait_for_cached_rows(ranker.stats)
                    dense, indices, lengths = random_batch(
                        spec, batch, min(seed, 2), empty_tables=(1,) * (seed % 2)
                    )
                    want = reference_scores(monolithic, dense, indices, lengths)
                    np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)
                    assert np.abs(reference_scores(fp32, dense, indices, lengths) - want).max() > 0
                if config.cache.kind != "off":
                    assert ranker.stats()["cache"]["hits"] > 0
            finally:
                ranker.close()


def test_an_int4_server_holds_half_the_bytes_of_an_int8_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same four tables, int8 on server 0 and int4 on server 1: the servers' anonymous memory
    differs by the rows' bytes (dim + 8 against dim / 2 + 4 a row)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # freed load buffers go back to the kernel
    source = ModelSource(preset="rmc1", row_scale=0.25, row_dtype="int8,int8,int8,int8,int4,int4,int4,int4")
    spec = model_spec(source)
    rows = spec.table_rows[0]
    shards = [Shard(t, 0, rows, t // 4, rows * (t % 4)) for t in range(spec.num_tables)]
    plan = ShardingPlan(2, spec.table_rows, spec.dim, tuple(shards))
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(),) * 2)) as cluster:
        rss8, rss4 = (_rss_anon(pid) for pid in cluster.pids)
    int8_bytes, int4_bytes = 4 * rows * (spec.dim + 8), 4 * rows * (spec.dim // 2 + 4)
    assert int4_bytes * 2 == int8_bytes
    assert abs((rss8 - rss4) - (int8_bytes - int4_bytes)) < 0.1 * int8_bytes, (rss8, rss4)
