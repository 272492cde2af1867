"""The ranker's gRPC front end: KServe v2 `inference.GRPCInferenceService` (grpc_predict_v2.proto,
as Triton serves it), so `tritonclient.grpc` talks to flexemr unmodified.

The service definitions are the generated stubs that ship with `tritonclient[grpc]` (Triton's
`grpc_service.proto`, a superset of KServe's `grpc_predict_v2.proto`): no proto is compiled here.
Inputs and validation are the HTTP front's (`flexemr.api.kserve`); scoring is the same
front door (`flexemr.api.front_door`); each error kind has its status code (`CODE`): client
mistakes get INVALID_ARGUMENT naming the field, an unknown model NOT_FOUND, a lookup that cannot
complete UNAVAILABLE (nothing is scored from partial rows), overload RESOURCE_EXHAUSTED; anything
else is INTERNAL and logged. RPCs the service defines but
flexemr does not serve (repository control, shared memory, statistics) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import numpy as np

from flexemr.api.front_door import MIN_ROW_VERSION, ErrorKind, FrontDoor, min_row_version_of
from flexemr.api.kserve import (
    OUTPUT,
    InferRequest,
    TensorSpec,
    binary_tensor,
    check_header,
    model_config,
    model_inputs,
    model_metadata,
)
from flexemr.batch import InvalidRequest
from flexemr.extras import needs_extra

with needs_extra("grpc"):
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

log = logging.getLogger(__name__)

CODE = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.REFUSED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.DISCONNECTED: grpc.StatusCode.CANCELLED,
    ErrorKind.SERVER_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.LOOKUP_FAILED: grpc.StatusCode.UNAVAILABLE,
}
"""gRPC status of each kind of failure; any other is INTERNAL."""

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
            values = binary_tensor(data, dtype)
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
    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.models = door.models
        self.model_name = door.model_name
        self.inputs = model_inputs(self.models.ranker.spec)  # every version takes the same inputs

    def _check_model(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        try:
            self.door.check_model(name, version)
        except Exception as exc:
            self._fail(exc, context)

    def _fail(self, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
        failed = self.door.failure(exc)
        _abort(context, CODE.get(failed.kind, grpc.StatusCode.INTERNAL), failed.message)

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
            self.door.config.max_batch,
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
        # The client's gRPC deadline is the request's deadline; without one, the configured default.
        remaining = context.time_remaining()
        try:
            self.door.check_model(request.model_name, request.model_version)
            with self.door.request(None if remaining is None else min(remaining, 3600.0)) as ticket:
                context.add_callback(ticket.client_gone)  # runs when the RPC ends: cancelled, or answered
                needs = dict(context.invocation_metadata()).get(MIN_ROW_VERSION)
                scored = self.door.score(
                    ticket, request.model_version, lambda: self._decode(request), min_row_version_of(needs)
                )
        except Exception as exc:  # every failure gets its code; internal ones are logged
            self._fail(exc, context)
        output = service_pb2.ModelInferResponse.InferOutputTensor(
            name=OUTPUT.name, datatype=OUTPUT.datatype, shape=list(scored.scores.shape)
        )
        return service_pb2.ModelInferResponse(
            model_name=self.model_name,
            model_version=scored.version,
            id=request.id,
            outputs=[output],
            raw_output_contents=[scored.scores.astype("<f4").tobytes()],
        )

    def _decode(self, request: Any) -> InferRequest:
        return InferRequest(request.id, decode_inputs(request, self.inputs), binary_output=True)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers informed


class GrpcServer:
    """A gRPC server for the ranker on `host:port` (0: any free port; `port` is the real one)."""

    def __init__(self, door: FrontDoor, host: str, port: int, workers: int = 16) -> None:
        max_message = door.config.max_body_bytes  # the HTTP front's body limit too
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            # RPCs beyond this many in flight are refused at once (RESOURCE_EXHAUSTED), not queued.
            maximum_concurrent_rpcs=4 * workers,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(door), self.server)
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
