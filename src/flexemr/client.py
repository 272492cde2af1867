"""A small Python client for flexemr's KServe v2 endpoint (binary tensors by default).

from flexemr.client import Client
with Client("http://127.0.0.1:8000") as client:
    scores = client.infer(dense, indices, lengths)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx
import numpy as np
import orjson


class InferenceError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


ALIGNMENT = 8
"""The widest tensor element (int64): the server parses aligned binary tensors as views, not copies."""


def binary_body(arrays: list[tuple[str, str, np.ndarray]]) -> tuple[bytes, int]:
    """A KServe binary-tensor request body of (name, datatype, little-endian array) inputs, and the
    length of its JSON header. The header is padded with spaces (JSON whitespace) to a multiple of
    8 bytes and the tensors follow widest element first, so every tensor lies aligned in the body."""
    arrays = sorted(arrays, key=lambda entry: -entry[2].itemsize)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": d,
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, d, a in arrays
            ],
            "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
        }
    )
    header += b" " * (-len(header) % ALIGNMENT)
    return b"".join([header, *(a.tobytes() for _, _, a in arrays)]), len(header)


class Client:
    def __init__(self, url: str, model: str = "dlrm", binary: bool = True, timeout: float = 30.0) -> None:
        self.model = model
        self.binary = binary
        self._http = httpx.Client(base_url=url, timeout=timeout)

    def ready(self) -> bool:
        return self._http.get("/v2/health/ready").status_code == 200

    def metadata(self) -> dict[str, Any]:
        response = self._http.get(f"/v2/models/{self.model}")
        if response.status_code != 200:
            raise InferenceError(response.status_code, response.json().get("error", response.text))
        result: dict[str, Any] = response.json()
        return result

    def infer(
        self, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray, min_row_version: int | None = None
    ) -> np.ndarray:
        """Scores float32 [B] for a batch in the KeyedJaggedTensor layout; with `min_row_version`
        (the `version` a row update answered), scored with rows at that version or later."""
        arrays = infer_inputs(dense, indices, lengths)
        url = f"/v2/models/{self.model}/infer"
        headers = {} if min_row_version is None else {"Flexemr-Min-Row-Version": str(min_row_version)}
        if self.binary:
            body, header_length = binary_body(arrays)
            headers["Inference-Header-Content-Length"] = str(header_length)
            response = self._http.post(url, content=body, headers=headers)
        else:
            inputs = [
                {"name": n, "datatype": d, "shape": list(a.shape), "data": a.ravel().tolist()}
                for n, d, a in arrays
            ]
            response = self._http.post(url, content=orjson.dumps({"inputs": inputs}), headers=headers)
        if response.status_code != 200:
            raise InferenceError(response.status_code, response.json().get("error", response.text))
        split = response.headers.get("inference-header-content-length")
        if split is not None:
            return np.frombuffer(response.content[int(split) :], dtype="<f4").astype(np.float32)
        return np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def infer_inputs(
    dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray
) -> list[tuple[str, str, np.ndarray]]:
    """The (name, datatype, little-endian array) inputs of an infer request, as this client sends
    them: indices as INT32 when every one fits (half the bytes of INT64), else INT64."""
    indices = np.asarray(indices)
    small = indices.size == 0 or (indices.min() >= 0 and indices.max() <= np.iinfo(np.int32).max)
    return [
        ("dense_features", "FP32", np.ascontiguousarray(dense, dtype="<f4")),
        ("sparse_indices", "INT32", np.ascontiguousarray(indices, dtype="<i4"))
        if small
        else ("sparse_indices", "INT64", np.ascontiguousarray(indices, dtype="<i8")),
        ("sparse_lengths", "INT32", np.ascontiguousarray(lengths, dtype="<i4")),
    ]
