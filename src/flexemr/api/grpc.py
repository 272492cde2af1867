"""The ranker's gRPC front end: KServe v2 `inference.GRPCInferenceService` (grpc_predict_v2.proto,
as Triton serves it), so `tritonclient.grpc` talks to flexemr unmodified.

The service definitions are the generated stubs that ship with `tritonclient[grpc]` (Triton's
`grpc_service.proto`, a superset of KServe's `grpc_predict_v2.proto`): no proto is compiled here.
Inputs and validation are the HTTP front's (`flexemr.api.kserve`); scoring is the same
`Ranker.score` call. Client mistakes get INVALID_ARGUMENT naming the field, an unknown model
NOT_FOUND, a lookup that cannot complete UNAVAILABLE (nothing is scored from partial rows),
overload RESOURCE_EXHAUSTED; anything else is INTERNAL and logged. RPCs the service defines but
flexemr does not serve (repository control, shared memory, statistics) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import numpy as np

from flexemr.api.kserve import (
    OUTPUT,
    TensorSpec,
    check_header,
    model_config,
    model_inputs,
    model_metadata,
)
from flexemr.batch import InvalidRequest
from flexemr.extras import needs_extra
from flexemr.ranker.admission import Dropped, Refused
from flexemr.ranker.model_versions import ModelVersions, UnknownVersion
from flexemr.ranker.ranker import Ranker
from flexemr.transport.base import LookupFailed, ServerUnavailable

with needs_extra("grpc"):
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 2**20
"""Largest request message, the HTTP front's body limit."""

_TYPED_CONTENTS = {"FP32": "fp32_contents", "INT32": "int_contents", "INT64": "int64_contents"}
"""Where `InferTensorContents` keeps each datatype's values."""


def decode_inputs(request: Any, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The tensors of a `ModelInferRequest`, from `raw_input_contents` (little-endian bytes, one
    entry per input, in input order) or from each input's typed `contents`."""
    names = [t.name for t in inputs]
    given = [t.name for t in request.inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; expected {names}")
    missing = [n for n in names if n not in given]
    if missing or len(given) != len(names):
        raise InvalidRequest(f"inputs must be {names} once each, got {given}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(given):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(given)} inputs")
    tensors = {}
    for position, tensor in enumerate(request.inputs):
        expected = inputs[names.index(tensor.name)]
        dtype, shape = check_header(expected, tensor.datatype, list(tensor.shape))
        count = int(np.prod(shape, dtype=np.int64))
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {tensor.name}: contents and raw_input_contents both given")
            data = raw[position]
            if len(data) != count * dtype.itemsize:
                raise InvalidRequest(
                    f"input {tensor.name}: raw_input_contents[{position}] holds {len(data)} bytes, "
                    f"shape {shape} needs {count} x {dtype.itemsize}"
                )
            values = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
        else:
            field = _TYPED_CONTENTS[tensor.datatype]
            values = np.array(getattr(tensor.contents, field), dtype=dtype.newbyteorder("="))
            if values.size != count:
                raise InvalidRequest(
                    f"input {tensor.name}: contents.{field} holds {values.size} values, shape {shape} "
                    f"needs {count}"
                )
        tensors[tensor.name] = values.reshape(shape)
    return tensors


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, models: ModelVersions, model_name: str) -> None:
        self.models = models
        self.ranker = models.ranker  # admission, turns and config: shared by every version
        self.model_name = model_name
        self.inputs = model_inputs(self.ranker.spec)

    def _check_model(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        if name != self.model_name:
            _abort(context, grpc.StatusCode.NOT_FOUND,
                   f"model_name: unknown model {name!r}; this server serves {self.model_name!r}")  # fmt: skip
        loaded = self.models.names()
        if version and version not in loaded:
            _abort(context, grpc.StatusCode.NOT_FOUND,
                   f"model_version: model {name!r} has versions {loaded}, not {version!r}")  # fmt: skip

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.models.ranker.ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_model(request.name, request.version, context)
        return service_pb2.ModelReadyResponse(ready=self.models.ranker.ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(name="flexemr", version="0.1.0", extensions=[])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_model(request.name, request.version, context)
        meta = model_metadata(
            self.models.ranker.spec,
            self.model_name,
            self.ranker.config.max_batch,
            self.models.names(),
            self.models.serving.name,
        )
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_model(request.name, request.version, context)
        config = json_format.ParseDict(
            model_config(self.models.ranker.spec, self.model_name), model_config_pb2.ModelConfig()
        )
        return service_pb2.ModelConfigResponse(config=config)

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        index = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[index(**entry) for entry in self.models.index()])

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_model(request.model_name, request.model_version, context)
        try:
            with self.models.use(request.model_version) as chosen:  # in flight: finishes on its version
                return self._infer(chosen.ranker, chosen.name, request, context)
        except UnknownVersion as exc:  # unloaded since `_check_model` looked
            _abort(context, grpc.StatusCode.NOT_FOUND, f"model_version: {exc}")

    def _infer(self, scorer: Ranker, version: str, request: Any, context: grpc.ServicerContext) -> Any:
        admission = self.ranker.admission
        # The client's gRPC deadline is the request's deadline; without one, the configured default.
        remaining = context.time_remaining()
        timeout_s = self.ranker.config.deadline_s if remaining is None else min(remaining, 3600.0)
        try:
            ticket = admission.arrive(timeout_s)
        except Refused as exc:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        context.add_callback(ticket.client_gone)  # runs when the RPC ends: cancelled, or answered
        try:
            with self.ranker.turns.turn():
                ticket.check()
                tensors = decode_inputs(request, self.inputs)
                dense = tensors["dense_features"]
                admission.admit(ticket, dense.shape[0])
                scores = scorer.score(dense, tensors["sparse_indices"], tensors["sparse_lengths"], ticket)
        except InvalidRequest as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Refused as exc:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Dropped as exc:
            admission.dropped(exc)
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED if exc.reason == "deadline" else grpc.StatusCode.CANCELLED
            )
            _abort(context, code, f"{exc}; nothing was computed")
        except (ServerUnavailable, LookupFailed) as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"lookup failed, nothing was scored: {exc}")
        except Exception:
            log.exception("inference failed")
            _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the ranker's log")
        finally:
            admission.release(ticket)
        output = service_pb2.ModelInferResponse.InferOutputTensor(
            name=OUTPUT.name, datatype=OUTPUT.datatype, shape=list(scores.shape)
        )
        return service_pb2.ModelInferResponse(
            model_name=self.model_name,
            model_version=version,
            id=request.id,
            outputs=[output],
            raw_output_contents=[scores.astype("<f4").tobytes()],
        )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers informed


class GrpcServer:
    """A gRPC server for the ranker on `host:port` (0: any free port; `port` is the real one)."""

    def __init__(self, models: ModelVersions, host: str, port: int, workers: int = 16) -> None:
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            # RPCs beyond this many in flight are refused at once (RESOURCE_EXHAUSTED), not queued.
            maximum_concurrent_rpcs=4 * workers,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(models, models.ranker.config.model_name), self.server
        )
        self.host = host
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"gRPC could not bind {host}:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s).wait()
