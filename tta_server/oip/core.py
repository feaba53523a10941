"""The Open Inference Protocol's inference, apart from its transports: what the REST routes (rest.py) and
the gRPC service (grpc_server.py) both parse into, run, and render from.

A request names a model and carries one image input:

* `images`: UINT8 `[N, H, W, 3]` (NHWC, the model's input size; what `/v1` predict takes as npy), or
* `image_bytes`: BYTES `[N]` (or `[N, 1]`), each element one encoded JPEG/PNG/WebP file, decoded with the
  server's codec (`tta_server.codec`) exactly as `/v1` multipart uploads are.

Its stream is Triton's `sequence_id` request parameter (an integer or a string: `sequence_id` 42 is the
`/v1` stream `42` of the caller's namespace) or the `X-Stream-Id` header / metadata; `sequence_start`
true resets the stream first; the `adapt` parameter (default true) is `/v1`'s `adapt`. Without a
stream the request is answered by the model's source weights and statistics (strategy `source`):
nothing adapts, nothing is stored, and each image's answer depends on that image alone, as a plain
model server's would.

Errors are the server's own (`tta_server.errors`); `grpc_status` maps their types to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adapters import ModelHandle
from tta_server import __version__, codec
from tta_server.admission import Ticket
from tta_server.engine import Engine
from tta_server.engine.streams import parse_config, strategy
from tta_server.errors import (
    ERROR_TYPES,
    InvalidImageError,
    NotFoundError,
    PayloadTooLargeError,
    TTAError,
    UnknownStreamError,
    ValidationError,
)
from tta_server.schemas import STREAM_ID_PATTERN
from tta_server.settings import Settings

SERVER_NAME = "tta-service"
EXTENSIONS = ["binary_tensor_data", "classification", "sequence"]
PLATFORM = "pytorch"
MODEL_VERSION = "1"
STREAM_HEADER = "x-stream-id"
IMAGES, IMAGE_BYTES = "images", "image_bytes"
DEFAULT_TOP_K = 3

# output name -> (datatype, documentation)
OUTPUTS: dict[str, tuple[str, str]] = {
    "probabilities": ("FP32", "[N, C] softmax class probabilities"),
    "predicted_class": ("INT64", "[N] index of the most probable class"),
    "predicted_label": ("BYTES", "[N] label of the most probable class"),
    "top_k_indices": ("INT64", "[N, k] class indices, most probable first (k: request parameter top_k)"),
    "top_k_probabilities": ("FP32", "[N, k] their probabilities"),
    "entropy": ("FP32", "[N] prediction entropy in nats"),
}

# error_type -> gRPC status code name (grpc.StatusCode[name]); every type of ERROR_TYPES has one.
GRPC_STATUS: dict[str, str] = {
    "bad_request": "INVALID_ARGUMENT",
    "invalid_image": "INVALID_ARGUMENT",
    "unauthorized": "UNAUTHENTICATED",
    "not_found": "NOT_FOUND",
    "unknown_stream": "NOT_FOUND",
    "method_not_allowed": "UNIMPLEMENTED",
    "state_mismatch": "FAILED_PRECONDITION",
    "state_corrupt": "FAILED_PRECONDITION",
    "not_exportable": "FAILED_PRECONDITION",
    "request_timeout": "DEADLINE_EXCEEDED",
    "payload_too_large": "RESOURCE_EXHAUSTED",
    "unsupported_media_type": "INVALID_ARGUMENT",
    "validation": "INVALID_ARGUMENT",
    "unknown_strategy": "INVALID_ARGUMENT",
    "unknown_model": "INVALID_ARGUMENT",
    "incompatible_model": "FAILED_PRECONDITION",
    "batch_too_small": "INVALID_ARGUMENT",
    "rate_limited": "RESOURCE_EXHAUSTED",
    "internal": "INTERNAL",
    "state_store_unavailable": "UNAVAILABLE",
    "state_store_full": "UNAVAILABLE",
    "overloaded": "UNAVAILABLE",
    "deadline_exceeded": "DEADLINE_EXCEEDED",
}
assert set(GRPC_STATUS) == set(ERROR_TYPES), set(ERROR_TYPES) ^ set(GRPC_STATUS)

_STREAM_ID = re.compile(STREAM_ID_PATTERN)
_NP_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass
class InputTensor:
    """One input as the transport read it: `data` is an array (fixed-size types) or a list of bytes (BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray[Any, Any] | list[bytes]


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    version: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]  # empty: all
    parameters: dict[str, Any]
    id: str = ""
    stream_header: str | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray[Any, Any] | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    model: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, Any]


# ------------------------------------------------------------------ metadata
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_handle(engine: Engine, model: str, version: str = "") -> ModelHandle:
    """The served model of that name (404 `not_found` otherwise: the model is part of the path)."""
    handle = engine.pool.handles.get(model)
    if handle is None:
        raise NotFoundError(f"unknown model {model!r}; served models: {', '.join(engine.pool.handles)}")
    if version not in ("", MODEL_VERSION):
        raise NotFoundError(
            f"model {model!r} has no version {version!r}; its only version is {MODEL_VERSION}"
        )
    return handle


def model_metadata(handle: ModelHandle) -> dict[str, Any]:
    h, w = handle.input_size
    c = handle.num_classes
    shapes = {
        "probabilities": [-1, c],
        "predicted_class": [-1],
        "predicted_label": [-1],
        "top_k_indices": [-1, -1],
        "top_k_probabilities": [-1, -1],
        "entropy": [-1],
    }
    return {
        "name": handle.model_id,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGES, "datatype": "UINT8", "shape": [-1, h, w, 3]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": n, "datatype": dt, "shape": shapes[n]} for n, (dt, _) in OUTPUTS.items()],
    }


# ------------------------------------------------------------------ tensors
def element_count(shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidImageError(f"tensor shape {shape} has a negative dimension")
    return math.prod(shape)


def array_from_json(datatype: str, shape: list[int], data: Any) -> np.ndarray[Any, Any] | list[bytes]:
    """A JSON tensor's `data` (flat or nested, row-major). BYTES elements are base64 strings for
    `image_bytes` (JSON cannot carry raw bytes); they are decoded when the input is read."""
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1).tolist()
        out = []
        for item in flat:
            if not isinstance(item, str):
                raise InvalidImageError("BYTES elements in JSON must be strings (base64 for image_bytes)")
            out.append(item.encode())
        return shaped_bytes(out, shape, base64=True)
    dtype = _np_dtype(datatype)
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidImageError(f"tensor data is not {datatype}: {exc}") from exc
    return _reshaped(arr.reshape(-1), shape)


def array_from_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray[Any, Any] | list[bytes]:
    """A tensor from its raw little-endian bytes (binary extension, gRPC raw_input_contents)."""
    if datatype == "BYTES":
        return shaped_bytes(split_bytes(raw), shape)
    dtype = np.dtype(_np_dtype(datatype)).newbyteorder("<")
    count = element_count(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidImageError(
            f"tensor of shape {shape} and type {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def split_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements in their binary form: each a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidImageError("truncated BYTES tensor: a length prefix is cut off")
        n = int.from_bytes(raw[pos : pos + 4], "little")
        if pos + 4 + n > len(raw):
            raise InvalidImageError("truncated BYTES tensor: an element is shorter than its length prefix")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def shaped_bytes(items: list[bytes], shape: list[int], base64: bool = False) -> list[bytes]:
    if len(items) != element_count(shape):
        raise InvalidImageError(f"BYTES tensor of shape {shape} has {len(items)} elements")
    if base64:
        import binascii

        try:
            return [binascii.a2b_base64(b) for b in items]
        except binascii.Error as exc:
            raise InvalidImageError(f"image_bytes elements in JSON must be base64: {exc}") from exc
    return items


def _reshaped(flat: np.ndarray[Any, Any], shape: list[int]) -> np.ndarray[Any, Any]:
    if flat.size != element_count(shape):
        raise InvalidImageError(f"tensor of shape {shape} has {flat.size} elements")
    return flat.reshape(shape)


def _np_dtype(datatype: str) -> Any:
    try:
        return _NP_DTYPES[datatype]
    except KeyError:
        raise InvalidImageError(f"unsupported tensor datatype {datatype!r}") from None


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class StreamRequest:
    stream: str | None
    start: bool
    adapt: bool
    top_k: int


def stream_request(req: InferRequest) -> StreamRequest:
    """The request's stream (None: no stream), whether it starts the sequence, adapt, and top_k."""
    params = req.parameters
    raw = params.get("sequence_id")
    stream: str | None
    if raw is None or raw == 0 or raw == "":  # Triton: 0 means "not part of a sequence"
        stream = req.stream_header or None
    elif isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValidationError("parameter sequence_id must be an integer or a string")
    else:
        stream = str(raw)
    if stream is not None and not _STREAM_ID.fullmatch(stream):
        raise ValidationError(f"stream id {stream!r} must match {STREAM_ID_PATTERN}")
    start = _bool_param(params, "sequence_start", False)
    adapt = _bool_param(params, "adapt", True)
    top_k = params.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 1000:
        raise ValidationError("parameter top_k must be an integer from 1 to 1000")
    return StreamRequest(stream, start, adapt, top_k)


def _bool_param(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise ValidationError(f"parameter {name} must be a boolean")
    return value


# ------------------------------------------------------------------ inference
@dataclass
class _Images:
    pixels: int
    decode: Callable[[], torch.Tensor]


def _images(req: InferRequest, handle: ModelHandle, settings: Settings) -> _Images:
    """The request's one image input, checked from its shape or image headers (no pixel decoded yet)."""
    if len(req.inputs) != 1:
        raise InvalidImageError(f"expected one input ({IMAGES!r} or {IMAGE_BYTES!r}), got {len(req.inputs)}")
    inp = req.inputs[0]
    h, w = handle.input_size
    if inp.name == IMAGES:
        if inp.datatype != "UINT8" or not isinstance(inp.data, np.ndarray):
            raise InvalidImageError(f"input {IMAGES!r} must be UINT8, got {inp.datatype}")
        arr = inp.data
        if arr.ndim != 4 or tuple(arr.shape[1:]) != (h, w, 3):
            raise InvalidImageError(
                f"input {IMAGES!r} must have shape [N, {h}, {w}, 3], got {list(arr.shape)}"
            )
        n = arr.shape[0]
        _check_count(n, settings)
        return _Images(n * h * w, lambda: _nchw(arr))
    if inp.name == IMAGE_BYTES:
        if inp.datatype != "BYTES" or not isinstance(inp.data, list):
            raise InvalidImageError(f"input {IMAGE_BYTES!r} must be BYTES, got {inp.datatype}")
        if not (len(inp.shape) == 1 or (len(inp.shape) == 2 and inp.shape[1] == 1)):
            raise InvalidImageError(f"input {IMAGE_BYTES!r} must have shape [N] or [N, 1], got {inp.shape}")
        files = inp.data
        _check_count(len(files), settings)
        infos = codec.scan_files(files, settings.max_image_pixels)
        device = handle.device if settings.decode_on_device else None
        return _Images(
            sum(i.pixels for i in infos),
            lambda: codec.decode_files(files, (h, w), settings.max_image_pixels, device, infos),
        )
    raise InvalidImageError(f"unknown input {inp.name!r}; this model takes {IMAGES!r} or {IMAGE_BYTES!r}")


def _nchw(arr: np.ndarray[Any, Any]) -> torch.Tensor:
    """uint8 NHWC -> NCHW view (channels-last memory, as /v1's npy uploads); a read-only buffer is copied."""
    return torch.from_numpy(np.array(arr, copy=not arr.flags.writeable, order="C")).permute(0, 3, 1, 2)


def _check_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise InvalidImageError("empty batch")
    if n > settings.max_batch:
        raise PayloadTooLargeError(f"at most {settings.max_batch} images per request, got {n}")


async def infer(
    engine: Engine,
    settings: Settings,
    ns: str,
    ticket: Ticket,
    req: InferRequest,
    still_wanted: Callable[[str], Awaitable[None]],
) -> InferResponse:
    """Run one inference request: the same engine, admission and codec as `/v1` predict.

    `still_wanted(stage)` raises when the request should not go on (its deadline passed, its client left).
    """
    handle = model_handle(engine, req.model, req.version)
    sreq = stream_request(req)
    wanted = _requested(req)
    # The input tensor is checked before the stream is touched: a request that cannot be served neither
    # creates nor restarts a stream.
    images = await asyncio.to_thread(_images, req, handle, settings)
    resolved = None
    if sreq.stream is not None:
        if sreq.start:
            with contextlib.suppress(UnknownStreamError):  # a new stream starts from the source state
                await engine.reset(ns, sreq.stream)
        resolved = await engine.resolve(ns, sreq.stream)
        if resolved.policy.model != handle.model_id:
            raise ValidationError(
                f"stream {sreq.stream!r} serves model {resolved.policy.model!r}, not {handle.model_id!r}; "
                f"PUT /v1/streams/{sreq.stream} with model {handle.model_id!r} to move it"
            )
    await still_wanted("before decoding")
    batch = await ticket.decode(images.pixels, lambda: engine.decode(images.decode))
    await still_wanted("after decoding")
    params: dict[str, Any] = {}
    if sreq.stream is None:
        logits = await engine.scheduler.run(_source_forward, handle, batch)
        params |= {"adapted": False, "strategy": "source"}
    else:
        out = await engine.predict(ns, sreq.stream, batch, sreq.adapt, resolved, deadline=ticket.deadline)
        logits = out.logits
        params |= {
            "stream_id": sreq.stream,
            "strategy": out.policy.strategy,
            "incarnation": out.policy.incarnation,
            "adapted": out.adapted,
            "version": out.version,
            "steps": int(out.result.state.meta.get("steps", 0)),
            "created": out.created,
        }
        if out.not_adapted is not None:
            params["not_adapted"] = out.not_adapted
        if not out.durable:
            params["durable"] = False
        if "sequence_id" in req.parameters:
            params["sequence_id"] = req.parameters["sequence_id"]
    return InferResponse(handle.model_id, req.id, _outputs(logits, handle, wanted, sreq.top_k), params)


def _source_forward(handle: ModelHandle, batch: torch.Tensor) -> torch.Tensor:
    """Compute thread: the model with its source statistics, no state (requests without a stream)."""
    strat = strategy("source")
    cfg = parse_config(strat, None)
    x = batch.to(handle.device).float().div_(255.0)
    return strat.step(handle, x, strat.init_state(handle, cfg, 0), cfg, False).logits


def _requested(req: InferRequest) -> list[RequestedOutput]:
    if not req.outputs:
        return [RequestedOutput(name) for name in OUTPUTS]
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise ValidationError(f"unknown output {o.name!r}; outputs: {', '.join(OUTPUTS)}")
        count = o.parameters.get("classification")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValidationError("output parameter classification must be a positive integer")
    return req.outputs


def _outputs(
    logits: torch.Tensor, handle: ModelHandle, wanted: list[RequestedOutput], top_k: int
) -> list[OutputTensor]:
    logits = logits.float().cpu()
    probs = logits.softmax(1)
    n, c = probs.shape
    k = min(top_k, c)
    top_p, top_i = probs.topk(k, dim=1)
    entropy = -(probs * logits.log_softmax(1)).sum(1)
    pred = probs.argmax(1)
    labels = handle.classes or tuple(str(i) for i in range(c))
    values: dict[str, np.ndarray[Any, Any] | list[bytes]] = {
        "probabilities": probs.numpy(),
        "predicted_class": pred.numpy().astype(np.int64),
        "predicted_label": [labels[i].encode() for i in pred.tolist()],
        "top_k_indices": top_i.numpy().astype(np.int64),
        "top_k_probabilities": top_p.numpy(),
        "entropy": entropy.numpy(),
    }
    out = []
    for o in wanted:
        classes = o.parameters.get("classification")
        if classes is not None:  # Triton's classification extension: "<score>:<index>:<label>" strings
            cp, ci = probs.topk(min(int(classes), c), dim=1)
            items = [
                f"{p:f}:{i}:{labels[i]}".encode()
                for row_p, row_i in zip(cp.tolist(), ci.tolist(), strict=True)
                for p, i in zip(row_p, row_i, strict=True)
            ]
            out.append(OutputTensor(o.name, "BYTES", [n, cp.shape[1]], items))
            continue
        data = values[o.name]
        shape = [len(data)] if isinstance(data, list) else list(data.shape)
        out.append(OutputTensor(o.name, OUTPUTS[o.name][0], shape, data))
    return out


def raw_bytes(t: OutputTensor) -> bytes:
    """An output's binary form (little-endian; BYTES: length-prefixed)."""
    if isinstance(t.data, list):
        return join_bytes(t.data)
    return np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<")).tobytes()


def error_status(exc: TTAError) -> tuple[int, str]:
    """(HTTP status, gRPC status code name) of a server error: its type's row of ERROR_TYPES."""
    return exc.status_code, GRPC_STATUS.get(exc.error_type, "INTERNAL")
