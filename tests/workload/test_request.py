from __future__ import annotations

import numpy as np
import pytest

from flexemr.model.presets import preset
from flexemr.workload import Request, SyntheticConfig, SyntheticWorkload


def _bags(request: Request) -> list[list[list[int]]]:
    """[table][sample] -> row ids, the slow obvious way."""
    ends = np.cumsum(request.lengths)
    flat = [request.indices[e - n : e].tolist() for e, n in zip(ends, request.lengths, strict=True)]
    b = request.batch_size
    return [flat[t * b : (t + 1) * b] for t in range(request.num_tables)]


def test_take_and_concat_keep_bags_with_their_samples() -> None:
    spec = preset("tiny")
    request = SyntheticWorkload(spec, SyntheticConfig(empty_prob=0.3), seed=3).generate(9)
    picked = [4, 0, 4, 8]
    taken = request.take(picked)
    assert np.array_equal(taken.dense, request.dense[picked])
    assert _bags(taken) == [[bags[i] for i in picked] for bags in _bags(request)]

    joined = Request.concat([request.slice(0, 5), request.slice(5, 9)])
    assert np.array_equal(joined.indices, request.indices)
    assert np.array_equal(joined.lengths, request.lengths)
    assert np.array_equal(joined.dense, request.dense)


def test_bad_layouts_are_refused() -> None:
    dense = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="lengths sum"):
        Request(dense, np.zeros(3, dtype=np.int64), np.ones(8, dtype=np.int32))
    with pytest.raises(ValueError, match="int64"):
        Request(dense, np.zeros(8, dtype=np.int32), np.ones(8, dtype=np.int32))
    request = Request(dense, np.full(8, 500, dtype=np.int64), np.ones(8, dtype=np.int32))
    with pytest.raises(ValueError, match="table 0 has 100 rows"):
        request.check(preset("tiny"))
