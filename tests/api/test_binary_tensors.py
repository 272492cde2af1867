"""Binary tensors are parsed as views of the request body, copied only where they must be."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from flexemr.api.kserve import TensorSpec, binary_tensor, model_inputs, parse_infer_request
from flexemr.client import binary_body
from flexemr.model.spec import ModelSpec
from tests.core.helpers import random_batch

INPUTS = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,), also_accepts=("INT32",))]


def body(header_pad: int) -> tuple[bytearray, str, np.ndarray, np.ndarray]:
    a = np.arange(6, dtype="<f4").reshape(3, 2)
    b = np.array([5, -1, 2**40], dtype="<i8")
    inputs = [
        {"name": "a", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": b.nbytes}},
    ]
    header = orjson.dumps({"inputs": inputs}) + b" " * header_pad
    return bytearray(header + a.tobytes() + b.tobytes()), str(len(header)), a, b


def test_aligned_binary_tensors_are_views_of_the_body() -> None:
    pad = -int(body(0)[1]) % 8  # the header padded to 8 bytes: both tensors aligned in the body
    raw, split, a, b = body(pad)
    tensors = parse_infer_request(raw, split, INPUTS).tensors
    assert np.array_equal(tensors["a"], a) and np.array_equal(tensors["b"], b)
    body_array = np.frombuffer(raw, dtype=np.uint8)
    assert np.shares_memory(tensors["a"], body_array) and np.shares_memory(tensors["b"], body_array)
    assert tensors["a"].flags.writeable and tensors["a"].dtype == np.float32
    with pytest.raises(BufferError):  # the views hold the body: it cannot be resized under them
        raw.clear()


def test_misaligned_binary_tensors_are_copied_with_the_same_values() -> None:
    raw, split, a, b = body(-int(body(0)[1]) % 8 + 1)  # one byte past alignment
    tensors = parse_infer_request(raw, split, INPUTS).tensors
    body_array = np.frombuffer(raw, dtype=np.uint8)
    for name, expected in (("a", a), ("b", b)):
        assert np.array_equal(tensors[name], expected)
        assert tensors[name].flags.aligned and not np.shares_memory(tensors[name], body_array)


def test_read_only_and_big_endian_data_is_copied_to_a_writable_native_array() -> None:
    data = np.array([1, 2, 3], dtype="<i4").tobytes()
    values = binary_tensor(data, np.dtype("<i4"))  # bytes (gRPC's raw contents) are read-only
    assert values.flags.writeable and values.tolist() == [1, 2, 3]
    swapped = binary_tensor(bytearray(np.array([1.5, -2.0], dtype=">f8").tobytes()), np.dtype(">f8"))
    assert swapped.dtype.isnative and swapped.tolist() == [1.5, -2.0]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_the_clients_bodies_are_parsed_without_copies(batch: int) -> None:
    spec = ModelSpec(table_rows=(50, 70), dim=4, bottom_mlp=(13, 4), top_mlp=(8, 1))
    dense, indices, lengths = random_batch(spec, batch, seed=batch)
    body, header_length = binary_body(
        [
            ("dense_features", "FP32", dense),
            ("sparse_indices", "INT64", indices.astype("<i8")),
            ("sparse_lengths", "INT32", lengths),
        ]
    )
    raw = bytearray(body)
    tensors = parse_infer_request(raw, str(header_length), model_inputs(spec)).tensors
    body_array = np.frombuffer(raw, dtype=np.uint8)
    assert all(np.shares_memory(t, body_array) for t in tensors.values())
    assert np.array_equal(tensors["dense_features"], dense)
    assert np.array_equal(tensors["sparse_indices"], indices)
    assert np.array_equal(tensors["sparse_lengths"], lengths)
