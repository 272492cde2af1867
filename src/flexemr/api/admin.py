"""The ranker's admin API: load and unload whole-model versions, in Triton's repository shape.

    POST /v2/repository/models/{name}/load    {"parameters": {"checkpoint": "/path/model.pt"}}
                                              or {"parameters": {"seed": 7}} (a preset's weights)
                                              or {"parameters": {"version": "1"}} (serve it again)
    POST /v2/repository/models/{name}/unload  {"parameters": {"version": "2"}} (default: the serving
                                              one, which rolls back to the other)

Every admin request carries `Authorization: Bearer TOKEN`, the token derived from the cluster
secret (`flexemr.config.security.admin_token`); without a secret the admin API is off (403).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flexemr.api.bodies import BodyTooLarge, read_body
from flexemr.api.front_door import ErrorKind, FrontDoor, Rejected, classify
from flexemr.config.model import ModelSource
from flexemr.ranker.model_versions import ModelVersion, ModelVersionConflict

log = logging.getLogger(__name__)

MAX_ADMIN_BODY = 64 * 2**10
"""Admin request bodies are a few parameters."""

_SOURCE_PARAMETERS = {"checkpoint": str, "preset": str, "seed": int, "row_scale": float}


STATUS = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.UNKNOWN_MODEL: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
}
"""HTTP status of each kind of admin failure; any other is a logged 503 and nothing changed."""


def check_admin(request: Request, token: str | None) -> None:
    """`Rejected` (401/403) unless the request carries the admin bearer token."""
    if token is None:
        raise Rejected(
            ErrorKind.FORBIDDEN, "the admin API is off: this ranker has no cluster secret (--secret-file)"
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Rejected(
            ErrorKind.UNAUTHORIZED, "header Authorization: needs 'Bearer <admin token of the cluster secret>'"
        )


def error_response(exc: Exception, failed: str) -> JSONResponse:
    """The status and message of an admin request's failure; what broke inside (`failed`: what
    did not happen) is a logged 503, and nothing changed."""
    # Parameters are checked by the dataclasses they build: their ValueError names the field.
    kind = ErrorKind.INVALID_INPUT if isinstance(exc, ValueError) else classify(exc)
    status = STATUS.get(kind, 503)
    if status == 503:
        log.error("%s", failed, exc_info=exc)
    response = JSONResponse({"error": str(exc) if status < 503 else f"{failed}: {exc}"}, status_code=status)
    if status == 401:
        response.headers["www-authenticate"] = "Bearer"
    return response


async def admin_parameters(request: Request) -> dict[str, Any]:
    """The `parameters` object of a small JSON body (which may be empty)."""
    try:
        body = await read_body(request, MAX_ADMIN_BODY)
    except BodyTooLarge:
        raise Rejected(ErrorKind.TOO_LARGE, f"admin request body exceeds {MAX_ADMIN_BODY} bytes") from None
    if not body.strip():
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejected(ErrorKind.INVALID_INPUT, f"malformed JSON: {exc}") from None
    params = parsed.get("parameters", {}) if isinstance(parsed, dict) else None
    if not isinstance(params, dict):
        raise Rejected(ErrorKind.INVALID_INPUT, "the body must be a JSON object with a 'parameters' object")
    return params


def new_source(current: ModelSource, params: dict[str, Any]) -> ModelSource:
    """The served model's source with the weights `params` name (same model options otherwise)."""
    unknown = sorted(set(params) - set(_SOURCE_PARAMETERS))
    if unknown:
        raise Rejected(
            ErrorKind.INVALID_INPUT,
            f"parameters: unknown {unknown}; give version, or {sorted(_SOURCE_PARAMETERS)}",
        )
    for key, kind in _SOURCE_PARAMETERS.items():
        value = params.get(key)
        if value is not None and (type(value) is not kind and not (kind is float and type(value) is int)):
            raise Rejected(
                ErrorKind.INVALID_INPUT, f"parameters.{key} must be a {kind.__name__}, got {value!r}"
            )
    changes: dict[str, Any] = {k: v for k, v in params.items() if k in ("seed", "row_scale")}
    if "checkpoint" in params:
        if not Path(params["checkpoint"]).is_file():
            raise Rejected(
                ErrorKind.INVALID_INPUT,
                f"parameters.checkpoint: no such file {params['checkpoint']!r} on the ranker",
            )
        changes.update(checkpoint=params["checkpoint"], preset=None)
    elif "preset" in params:
        changes.update(preset=params["preset"], checkpoint=None)
    if not changes:
        raise Rejected(
            ErrorKind.INVALID_INPUT, "parameters: give checkpoint (or preset, seed, row_scale), or version"
        )
    try:
        return dataclasses.replace(current, **changes)
    except ValueError as exc:
        raise Rejected(ErrorKind.INVALID_INPUT, f"parameters: {exc}") from None


def admin_routes(door: FrontDoor) -> APIRouter:
    router = APIRouter()
    models, model_name = door.models, door.model_name

    def answer(version: ModelVersion) -> dict[str, str]:
        return {"name": model_name, "version": version.name, "serving": models.serving.name}

    async def admin(request: Request, name: str) -> dict[str, Any]:
        check_admin(request, models.admin_token)
        door.check_model(name)
        params = await admin_parameters(request)
        version = params.pop("version", None)
        if version is not None and (not isinstance(version, str) or params):
            raise Rejected(ErrorKind.INVALID_INPUT, "parameters.version must be a string, given alone")
        return {"version": version, **params}

    def refused(exc: Exception) -> JSONResponse:  # e.g. the new version's servers did not start
        return error_response(exc, f"loading failed, version {models.serving.name} keeps serving")

    @router.post("/v2/repository/models/{name}/load", response_model=None)
    async def load(name: str, request: Request) -> JSONResponse | dict[str, str]:
        try:
            params = await admin(request, name)
            version = params.pop("version")
            if version is not None:
                return answer(models.serve(version))
            if models.serving.source is None:
                raise ModelVersionConflict(
                    "this ranker cannot load versions (it does not know its model's source)"
                )
            source = new_source(models.serving.source, params)
            return answer(await run_in_threadpool(models.load, source))
        except Exception as exc:  # every refusal has its status; see `refused`
            return refused(exc)

    @router.post("/v2/repository/models/{name}/unload", response_model=None)
    async def unload(name: str, request: Request) -> JSONResponse | dict[str, str]:
        try:
            params = await admin(request, name)
            if len(params) > 1:
                raise Rejected(
                    ErrorKind.INVALID_INPUT, f"parameters: unload takes version only, got {sorted(params)}"
                )
            return answer(await run_in_threadpool(models.unload, params["version"] or ""))
        except Exception as exc:
            return refused(exc)

    return router
