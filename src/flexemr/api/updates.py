"""Row updates pushed by trainers over HTTP, applied to the serving version as one row version.

    POST /v2/models/{name}/updates?source=trainer-3&sequence=118
    Authorization: Bearer TOKEN                       (the admin token, as for model load)
    body: KServe v2 inputs `table` INT64 [n], `row` INT64 [n], `values` FP32 [n, dim] (JSON or
          binary tensors), or an .npz holding arrays table, row, values
    -> {"model_name": "dlrm", "model_version": "2", "version": 17, "rows": n}

`version` is the row version committed on every server of the serving model version; a
(source, sequence) already applied is acknowledged and not applied again. The body is bounded
like an inference body (413); bad rows get 400 naming the field, and nothing changes.
"""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from flexemr.api.admin import check_admin, error_response
from flexemr.api.bodies import BodyTooLarge, read_body
from flexemr.api.front_door import ErrorKind, FrontDoor, Rejected
from flexemr.api.kserve import HEADER_LENGTH, TensorSpec, parse_decimal, parse_infer_request
from flexemr.batch import InvalidRequest
from flexemr.updates import RowUpdates
from flexemr.updates.metrics import UpdateMetrics

ARRAYS = ("table", "row", "values")
NPZ_MAGIC = b"PK\x03\x04"


def update_inputs(dim: int) -> list[TensorSpec]:
    return [
        TensorSpec("table", "INT64", (-1,), also_accepts=("INT32",)),
        TensorSpec("row", "INT64", (-1,), also_accepts=("INT32",)),
        TensorSpec("values", "FP32", (-1, dim)),
    ]


def read_npz(body: bytes | bytearray, limit: int) -> dict[str, np.ndarray]:
    """Arrays table, row, values of an .npz body; its arrays may unpack to at most `limit` bytes."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as data:
            missing = [f"{name}" for name in ARRAYS if name not in data.files]
            if missing:
                raise InvalidRequest(f"body: the npz lacks array(s) {missing} (needs {list(ARRAYS)})")
            unpacked = sum(data.zip.getinfo(f"{name}.npy").file_size for name in ARRAYS)
            if unpacked > limit:
                raise Rejected(
                    ErrorKind.TOO_LARGE, f"body: the npz arrays unpack to {unpacked} bytes, over {limit}"
                )
            return {name: data[name] for name in ARRAYS}
    except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        if isinstance(exc, InvalidRequest):
            raise
        raise InvalidRequest(f"body: not a readable npz of table, row, values: {exc}") from None


def parse_updates(
    body: bytearray, header_length: str | None, dim: int, limit: int, source: str, sequence: int | None
) -> RowUpdates:
    if body[:4] == NPZ_MAGIC:
        arrays = read_npz(body, limit)
    else:
        arrays = parse_infer_request(body, header_length, update_inputs(dim)).tensors
    return RowUpdates(arrays["table"], arrays["row"], arrays["values"], source, sequence)


def idempotency(request: Request) -> tuple[str, int | None]:
    """The (source, sequence) of the query string: who sends, and this batch's number from it."""
    source = request.query_params.get("source", "http")
    if not 0 < len(source) <= 200:
        raise InvalidRequest(f"query source must be 1 to 200 characters, got {len(source)}")
    sequence = request.query_params.get("sequence")
    if sequence is None:
        return source, None
    return source, parse_decimal(sequence, "query sequence")


def update_routes(door: FrontDoor, registry: CollectorRegistry) -> APIRouter:
    router = APIRouter()
    models, model_name = door.models, door.model_name
    metrics = UpdateMetrics(registry)

    @router.post("/v2/models/{name}/updates", response_model=None)
    async def push(name: str, request: Request) -> JSONResponse | dict[str, object]:
        arrived = time.time()
        limit = models.ranker.config.max_body_bytes
        try:
            check_admin(request, models.admin_token)
            door.check_model(name)
            source, sequence = idempotency(request)
            declared = request.headers.get("content-length")
            if declared is not None and parse_decimal(declared, "header Content-Length") > limit:
                raise Rejected(ErrorKind.TOO_LARGE, f"request body of {declared} bytes exceeds {limit}")
            try:
                body = await read_body(request, limit)
            except BodyTooLarge:
                raise Rejected(ErrorKind.TOO_LARGE, f"request body exceeds {limit} bytes") from None
            with models.use() as version:  # its servers stay up until the update is answered
                dim = version.ranker.spec.dim
                updates = parse_updates(
                    body, request.headers.get(HEADER_LENGTH), dim, limit, source, sequence
                )
                committed = await run_in_threadpool(version.apply, updates)
        except Exception as exc:  # every refusal has its status (`error_response`)
            metrics.refused.labels(type(exc).__name__).inc()
            return error_response(exc, "update not applied")
        metrics.committed(committed, int(updates.rows.size), [time.time() - arrived])
        return {"model_name": model_name, "model_version": version.name, "version": committed,
                "rows": int(updates.rows.size)}  # fmt: skip

    return router
