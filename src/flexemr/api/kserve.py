"""KServe v2 / Open Inference Protocol tensors: JSON, and the binary tensor data extension.

A binary request carries a JSON header of `Inference-Header-Content-Length` bytes, then the raw
little-endian bytes of every input whose `parameters.binary_data_size` is set, in input order.
A response is binary when the request asks for it (`binary_data` on an output, or
`binary_data_output` in the request parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from flexemr.batch import InvalidRequest
from flexemr.model.spec import ModelSpec

DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
HEADER_LENGTH = "inference-header-content-length"
MAX_DECIMAL_DIGITS = 18
"""Every number a request states in text fits 18 digits (< 2^63)."""


def parse_decimal(text: str, what: str) -> int:
    """A number a request states in a header or query (a length, a timeout, a sequence): ASCII
    digits only. `str.isdigit` and `int` also take '²', '٣' or '１' (and `int` then fails on '²')."""
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_DECIMAL_DIGITS):
        raise InvalidRequest(
            f"{what} must be a decimal integer of at most {MAX_DECIMAL_DIGITS} digits, got {text!r}"
        )
    return int(text)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 marks a free dimension."""
    also_accepts: tuple[str, ...] = ()
    """Datatypes taken besides the advertised one (INT32 indices: half the bytes of INT64)."""


@dataclass
class InferRequest:
    id: str | None
    tensors: dict[str, np.ndarray]
    binary_output: bool


def _object(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a JSON object or absent (then {}); a 400 naming `where` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _leaf_types(data: list[Any], depth: int, name: str) -> set[type]:
    """The types of the values in (nested) `data`, at most `depth` lists deep."""
    types = set(map(type, data))
    if list in types:
        if depth <= 1:
            raise InvalidRequest(f"input {name}: data is nested deeper than its shape")
        types.discard(list)
        for row in data:
            if isinstance(row, list):
                types |= _leaf_types(row, depth - 1, name)
    return types


def _json_values(entry: dict[str, Any], spec: TensorSpec, datatype: str) -> np.ndarray:
    name = spec.name
    data = entry.get("data")
    if not isinstance(data, list):
        raise InvalidRequest(f"input {name}: data must be a list of numbers, got {type(data).__name__}")
    allowed = {int, float} if DATATYPES[datatype].kind == "f" else {int}
    wrong = _leaf_types(data, len(spec.shape), name) - allowed
    if wrong:  # JSON booleans are Python bools, which numpy would take as 0 and 1
        kinds = ", ".join(sorted("boolean" if t is bool else t.__name__ for t in wrong))
        raise InvalidRequest(f"input {name}: data must hold {datatype} numbers, got {kinds} values")
    try:
        values = np.asarray(data)
    except ValueError as exc:
        raise InvalidRequest(f"input {name}: data is not a rectangular array: {exc}") from None
    if values.dtype == object:
        raise InvalidRequest(f"input {name}: a value does not fit {datatype}")
    return values


def model_inputs(spec: ModelSpec) -> list[TensorSpec]:
    """The inputs every front end (HTTP, gRPC) takes: a batch in TorchRec's KJT layout."""
    return [
        TensorSpec("dense_features", "FP32", (-1, spec.num_dense)),
        TensorSpec("sparse_indices", "INT64", (-1,), also_accepts=("INT32",)),
        TensorSpec("sparse_lengths", "INT32", (-1,)),
    ]


OUTPUT = TensorSpec("scores", "FP32", (-1,))


def model_metadata(
    spec: ModelSpec, model_name: str, max_batch: int, versions: list[str], serving: str
) -> dict[str, Any]:
    """KServe v2 model metadata (`GET /v2/models/{name}`; gRPC `ModelMetadata` takes the same fields):
    the loaded `versions`, and the one `serving` new requests."""
    return {
        "name": model_name,
        "versions": versions,
        "platform": "flexemr-dlrm",
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model_inputs(spec)
        ],
        "outputs": [{"name": OUTPUT.name, "datatype": OUTPUT.datatype, "shape": list(OUTPUT.shape)}],
        "parameters": {
            "num_tables": spec.num_tables,
            "table_rows": list(spec.table_rows),
            "dim": spec.dim,
            "max_batch": max_batch,
            "serving_version": serving,
        },
    }


def model_config(spec: ModelSpec, model_name: str) -> dict[str, Any]:
    """The model in Triton's model-configuration shape (`tritonclient`'s `get_model_config`).
    `max_batch_size` 0: the batch is not a leading dimension of every input (the sparse inputs are
    flat), so every dimension is listed, -1 where it varies."""

    def tensor(t: TensorSpec) -> dict[str, Any]:
        return {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.shape)}

    return {
        "name": model_name,
        "platform": "flexemr-dlrm",
        "backend": "flexemr",
        "max_batch_size": 0,
        "input": [tensor(t) for t in model_inputs(spec)],
        "output": [tensor(OUTPUT)],
    }


def check_header(expected: TensorSpec, datatype: Any, shape: Any) -> tuple[np.dtype[Any], list[int]]:
    """The dtype and shape of an input whose header says `datatype` and `shape`, if they fit
    `expected`; otherwise `InvalidRequest` naming the input."""
    name = expected.name
    allowed = (expected.datatype, *expected.also_accepts)
    if not isinstance(datatype, str) or datatype not in allowed:
        raise InvalidRequest(f"input {name} must have datatype {' or '.join(allowed)}, got {datatype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidRequest(f"input {name} has an invalid shape {shape!r}")
    if len(shape) != len(expected.shape) or any(
        e not in (-1, d) for e, d in zip(expected.shape, shape, strict=True)
    ):
        raise InvalidRequest(f"input {name} must have shape {list(expected.shape)}, got {shape}")
    return DATATYPES[datatype], shape


def binary_tensor(data: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """Little-endian `data` (a buffer of whole values) as a flat array of `dtype` in native byte
    order: a view of the bytes, not a copy, unless they are read-only (`bytes`: the model's tensors
    must be writable), misaligned for `dtype` (a JSON header of any length sits before them) or not
    in native order."""
    array = np.frombuffer(data, dtype=dtype)
    if array.dtype.isnative and array.flags.aligned and array.flags.writeable:
        return array
    return array.astype(dtype.newbyteorder("="))


def _decode_tensor(entry: Any, binary: memoryview, pos: int, expected: TensorSpec) -> tuple[np.ndarray, int]:
    name = expected.name
    datatype = entry.get("datatype")
    dtype, shape = check_header(expected, datatype, entry.get("shape"))
    count = math.prod(shape)  # Python ints: a huge shape cannot overflow
    size = _object(entry.get("parameters"), f"input {name}: parameters").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize:
            raise InvalidRequest(
                f"input {name}: binary_data_size {size!r} != {count} x {dtype.itemsize} bytes"
            )
        if pos + size > binary.nbytes:
            raise InvalidRequest(f"input {name}: the body holds fewer binary bytes than declared")
        return binary_tensor(binary[pos : pos + size], dtype).reshape(shape), pos + size
    if "data" not in entry:
        raise InvalidRequest(f"input {name} has neither data nor binary_data_size")
    values = _json_values(entry, expected, datatype)
    if values.size != count:
        raise InvalidRequest(f"input {name}: shape {shape} needs {count} values, data has {values.size}")
    if (
        dtype.kind == "i"
        and values.size
        and (values.min() < np.iinfo(dtype).min or values.max() > np.iinfo(dtype).max)
    ):
        raise InvalidRequest(f"input {name}: a value does not fit {datatype}")
    return values.astype(dtype.newbyteorder("=")).reshape(shape), pos


def parse_infer_request(
    body: bytes | bytearray | memoryview, header_length: str | None, inputs: list[TensorSpec]
) -> InferRequest:
    """Parse a request body without copying it: JSON is read from a view of the header, binary
    tensors are views of the body where `binary_tensor` can (the body then cannot be resized while
    they live)."""
    view = memoryview(body)
    if header_length is not None:
        split = parse_decimal(header_length, "header Inference-Header-Content-Length")
        if not 0 < split <= len(view):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {split} outside the body's {len(view)} bytes"
            )
    else:
        split = len(view)
    try:
        request = orjson.loads(view[:split])
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidRequest("the request must be a JSON object with an 'inputs' list")
    by_name: dict[str, dict[str, Any]] = {}
    for entry in request["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("every input must be an object with a 'name'")
        if entry["name"] in by_name:
            raise InvalidRequest(f"input {entry['name']} is given twice")
        by_name[entry["name"]] = entry
    unknown = sorted(set(by_name) - {spec.name for spec in inputs})
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; expected {[spec.name for spec in inputs]}")
    params = _object(request.get("parameters"), "parameters")
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequest("outputs must be a list of objects")
    binary_output = bool(params.get("binary_data_output")) or any(
        _object(o.get("parameters"), "outputs[].parameters").get("binary_data") for o in outputs
    )
    binary = view[split:]
    pos = 0
    tensors = {}
    for entry in request["inputs"]:
        spec = next(s for s in inputs if s.name == entry["name"])
        tensors[spec.name], pos = _decode_tensor(entry, binary, pos, spec)
        entry.pop("data", None)  # its Python numbers can go as soon as they are an array
    missing = [spec.name for spec in inputs if spec.name not in tensors]
    if missing:
        raise InvalidRequest(f"missing input(s) {missing}")
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, tensors, binary_output)


def encode_infer_response(
    model_name: str, request_id: str | None, name: str, values: np.ndarray, binary: bool, version: str
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers; `version` is the model version that scored."""
    output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
    raw = b""
    if binary:
        raw = values.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = values.tolist()
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": [output]}
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response)
    if not binary:
        return header, {"content-type": "application/json"}
    return header + raw, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
