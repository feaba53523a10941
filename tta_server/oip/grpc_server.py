"""The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService`, served by grpc.aio in the
server's process and event loop, on `TTA_GRPC_PORT` (unset: off).

The calls do what the `/v2` REST routes do, through the same functions (tta_server.oip.core): the same
engine, streams, admission (the replica's queue and pixel budgets), deadlines (the call's own gRPC
deadline, capped at `TTA_REQUEST_TIMEOUT_SECONDS`) and API keys (metadata `authorization: Bearer <key>`
or `x-api-key`; ServerLive and ServerReady need none, like /healthz and /readyz). A server error ends
the call with the gRPC status of its type (`core.GRPC_STATUS`), its message as the details and its type
in the `x-error-type` trailing metadata.

This module is imported only when the gRPC port is set: its generated protobuf module registers the
`inference.*` messages in protobuf's default descriptor pool, where another copy of the protocol's
definitions (a client library's, in a test process) would collide with it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np

from tta_server.admission import TIMEOUT_HEADER, Admission, Deadline, request_timeout
from tta_server.api.deps import DEFAULT_NAMESPACE, RateLimiter, authenticate, presents_credentials
from tta_server.engine import Engine
from tta_server.errors import InvalidImageError, TTAError
from tta_server.metrics import Metrics
from tta_server.oip import core
from tta_server.oip import grpc_predict_v2_pb2 as pb
from tta_server.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tta_server.settings import Settings

log = logging.getLogger("tta_server.oip")
T = TypeVar("T")
SERVICE = "/inference.GRPCInferenceService/"

# datatype -> the InferTensorContents field that carries it
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        admission: Admission,
        rate_limiter: RateLimiter,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.keys = settings.key_namespaces()
        self.admission = admission
        self.rate_limiter = rate_limiter
        self.metrics = metrics

    # ------------------------------------------------------------------ plumbing
    def namespace(self, context: grpc.aio.ServicerContext[Any, Any], public: bool = False) -> str:
        """The caller's namespace from its metadata (401 `unauthorized` without a valid key)."""
        if not self.keys:
            return DEFAULT_NAMESPACE
        headers = _metadata(context)
        if public and not presents_credentials(headers):
            return DEFAULT_NAMESPACE
        ns = authenticate(self.keys, headers)
        self.rate_limiter.check(ns)
        return ns

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one call; a server error ends it with its gRPC status, a bug with INTERNAL (logged)."""
        path = SERVICE + method
        t0 = time.perf_counter()
        try:
            result = await fn()
        except TTAError as exc:
            status, code = core.error_status(exc)
            self._count(path, status, exc.error_type)
            trailers = [("x-error-type", exc.error_type)]
            trailers += [(k.lower(), v) for k, v in (exc.headers or {}).items()]
            context.set_trailing_metadata(tuple(trailers))
            await context.abort(grpc.StatusCode[code], exc.message)
            raise  # abort raises; not reached
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            request_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error in %s (request %s)", method, request_id, exc_info=exc)
            self._count(path, 500, "internal")
            context.set_trailing_metadata((("x-error-type", "internal"),))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
            raise
        self.metrics.requests.labels(path, "200").inc()
        self.metrics.request_duration.labels(path).observe(time.perf_counter() - t0)
        return result

    def _count(self, path: str, status: int, error_type: str) -> None:
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.request_errors.labels(path, error_type).inc()

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        async def run() -> pb.ServerLiveResponse:
            self.namespace(context, public=True)
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, run)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        async def run() -> pb.ServerReadyResponse:
            self.namespace(context, public=True)
            return pb.ServerReadyResponse(ready=(await self.engine.health())["ready"])

        return await self._call("ServerReady", context, run)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        async def run() -> pb.ModelReadyResponse:
            self.namespace(context, public=self.settings.public_discovery)
            core.model_handle(self.engine, request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, run)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        async def run() -> pb.ServerMetadataResponse:
            self.namespace(context, public=self.settings.public_discovery)
            return pb.ServerMetadataResponse(**core.server_metadata())

        return await self._call("ServerMetadata", context, run)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        async def run() -> pb.ModelMetadataResponse:
            self.namespace(context, public=self.settings.public_discovery)
            meta = core.model_metadata(core.model_handle(self.engine, request.name, request.version))
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            )

        return await self._call("ModelMetadata", context, run)

    # ------------------------------------------------------------------ inference
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        async def run() -> pb.ModelInferResponse:
            ns = self.namespace(context)
            headers = _metadata(context)
            remaining = context.time_remaining()
            cap = self.settings.request_timeout_seconds
            seconds = request_timeout(headers.get(TIMEOUT_HEADER), cap)
            if remaining is not None:
                seconds = min(seconds, max(remaining, 0.0))
            deadline = Deadline.after(seconds)
            req = parse_request(request)
            req.stream_header = headers.get(core.STREAM_HEADER)
            ticket = self.admission.admit(deadline)
            try:

                async def still_wanted(stage: str) -> None:
                    deadline.check(stage)

                out = await core.infer(self.engine, self.settings, ns, ticket, req, still_wanted)
            finally:
                ticket.close()
                self.admission.leave()
            return render_response(out)

        return await self._call("ModelInfer", context, run)


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def to_param(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _params(raw: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: param_value(v) for k, v in raw.items()}


def parse_request(request: pb.ModelInferRequest) -> core.InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidImageError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: all or none"
        )
    inputs = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        data: np.ndarray[Any, Any] | list[bytes]
        if raw:
            data = core.array_from_raw(t.datatype, shape, raw[i])
        elif t.datatype == "BYTES":
            data = core.shaped_bytes(list(t.contents.bytes_contents), shape)
        elif t.datatype in _CONTENTS:
            data = core.array_from_json(t.datatype, shape, list(getattr(t.contents, _CONTENTS[t.datatype])))
        else:
            raise InvalidImageError(f"unsupported tensor datatype {t.datatype!r}")
        inputs.append(core.InputTensor(t.name, t.datatype, shape, data))
    outputs = [core.RequestedOutput(o.name, _params(o.parameters)) for o in request.outputs]
    return core.InferRequest(
        request.model_name, request.model_version, inputs, outputs, _params(request.parameters), request.id
    )


def render_response(out: core.InferResponse) -> pb.ModelInferResponse:
    """Every output's data in raw_output_contents (as Triton answers)."""
    return pb.ModelInferResponse(
        model_name=out.model,
        model_version=core.MODEL_VERSION,
        id=out.id,
        parameters={k: to_param(v) for k, v in out.parameters.items()},
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in out.outputs
        ],
        raw_output_contents=[core.raw_bytes(t) for t in out.outputs],
    )


async def start(
    engine: Engine,
    settings: Settings,
    admission: Admission,
    rate_limiter: RateLimiter,
    metrics: Metrics,
) -> grpc.aio.Server:
    """Start the gRPC server on `settings.host:grpc_port` (in the running event loop)."""
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        Service(engine, settings, admission, rate_limiter, metrics), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind the gRPC server to {address}")
    await server.start()
    log.info("Open Inference Protocol gRPC server on %s", address)
    return server


__all__ = ["Service", "start"]
