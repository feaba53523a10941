"""Stream policies, state inspection, resets and predictions."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from adapters import ModelHandle
from adapters.losses import softmax_entropy
from tta_server import codec
from tta_server.admission import Deadline, Ticket
from tta_server.api.deps import EngineDep, NamespaceDep, SettingsDep, StreamId
from tta_server.engine import Engine, PredictOutcome, StreamView
from tta_server.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError
from tta_server.schemas import (
    Drift,
    DriftTop,
    ErrorBody,
    Prediction,
    PredictResponse,
    PredictStats,
    StreamDrift,
    StreamPolicy,
    StreamPublic,
    TopK,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 408, 409, 413, 415, 422, 429, 503)
}
router = APIRouter(prefix="/v1", tags=["streams"], responses=ERRORS)

#: The predict body in the OpenAPI document. The route reads the body itself (`_read_body`: it must be
#: admitted and charged before anything is parsed), so FastAPI cannot infer it; this describes what
#: `_read_body` accepts, for generated clients and schema fuzzers.
PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "The batch: encoded images as multipart `files` parts (JPEG, PNG, WebP; one part per image), or "
            "one uint8 array of shape (N, H, W, 3) (or (H, W, 3) for one image) in NumPy's `.npy` format, "
            "RGB, without pickled objects. Encoded images are resized to the model's input size; arrays "
            "must have it (`input_size` in GET /v1/models)."
        ),
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "one encoded image per part",
                        }
                    },
                },
                "encoding": {"files": {"contentType": "image/jpeg, image/png, image/webp"}},
            },
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "`numpy.save` of a uint8 NHWC RGB array (`allow_pickle=False`); "
                "`application/octet-stream` is read the same way",
            },
        },
    }
}


def _public(stream: str, view: StreamView) -> StreamPublic:
    policy, meta = view.policy, view.meta
    return StreamPublic(
        stream_id=stream,
        model=policy.model,
        strategy=policy.strategy,
        config=policy.config,
        seed=policy.seed,
        incarnation=policy.incarnation,
        origin=policy.origin,
        steps=int(meta.get("steps", 0)),
        updates=int(meta.get("updates", 0)),
        samples_seen=int(meta.get("samples_seen", 0)),
        version=view.version,
        drift=_drift(meta),
    )


def _drift(meta: dict[str, Any]) -> Drift:
    raw = meta.get("drift")
    return Drift(**raw) if isinstance(raw, dict) else Drift()


async def _describe(engine: Engine, ns: str, stream: str) -> StreamPublic:
    return _public(stream, await engine.describe(ns, stream))


@router.put("/streams/{stream_id}", response_model=StreamPublic)
async def set_policy(
    stream_id: StreamId, body: StreamPolicy, engine: EngineDep, ns: NamespaceDep
) -> StreamPublic:
    """Set or change a stream's adaptation policy; a changed policy starts from the source state."""
    await engine.put_policy(ns, stream_id, body.model, body.strategy, body.config, body.seed)
    return await _describe(engine, ns, stream_id)


@router.get("/streams/{stream_id}", response_model=StreamPublic)
async def read_stream(stream_id: StreamId, engine: EngineDep, ns: NamespaceDep) -> StreamPublic:
    return await _describe(engine, ns, stream_id)


@router.delete("/streams/{stream_id}", status_code=204, response_class=Response)
async def delete_stream(stream_id: StreamId, engine: EngineDep, ns: NamespaceDep) -> Response:
    await engine.delete(ns, stream_id)
    return Response(status_code=204)


@router.post("/streams/{stream_id}/reset", response_model=StreamPublic)
async def reset_stream(stream_id: StreamId, engine: EngineDep, ns: NamespaceDep) -> StreamPublic:
    """Return the stream to the source state (its policy is kept)."""
    await engine.reset(ns, stream_id)
    return await _describe(engine, ns, stream_id)


#: The export's answer in the OpenAPI document: a safetensors file, not JSON.
EXPORT_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "safetensors file: the stream's adapted normalisation statistics and affine parameters under the "
            "model network's state_dict names, with a JSON manifest in its metadata (`tta_edge_manifest`)"
        ),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("/streams/{stream_id}/export", response_class=Response, responses=EXPORT_RESPONSE)
async def export_stream(stream_id: StreamId, engine: EngineDep, ns: NamespaceDep) -> Response:
    """The stream's state as a patch of the source model, which reproduces its adapt=false predictions
    when loaded into the source network in eval mode (409 `not_exportable` where they depend on the batch)."""
    blob = await engine.export(ns, stream_id)
    return Response(
        blob,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{stream_id}.safetensors"'},
    )


@router.get("/drift/top", response_model=DriftTop)
async def drift_top(
    engine: EngineDep, ns: NamespaceDep, n: Annotated[int, Query(ge=1, le=1000)] = 10
) -> DriftTop:
    """Streams of this namespace with the largest BN-statistics distance from the source."""
    rows = [
        StreamDrift(stream_id=stream, model=v.policy.model, strategy=v.policy.strategy, drift=_drift(v.meta))
        for stream, v in await engine.top_drift(ns, n)
    ]
    return DriftTop(streams=rows)


@dataclass(frozen=True)
class _Body:
    """A predict body whose framing and image headers have been read: how many pixels decoding it will
    charge, and how to decode it for a model."""

    pixels: int
    decode: Callable[[ModelHandle], torch.Tensor]


async def _read_body(request: Request, settings: SettingsDep) -> _Body:
    """The predict body's framing and image headers, read before the stream is looked up so that a body
    that cannot be served (415, 413, 400) creates no stream. Nothing is decoded yet."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=settings.max_batch + 1, max_fields=16) as form:
            files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            if not files:
                raise InvalidImageError("multipart body has no `files` parts")
            if len(files) > settings.max_batch:
                raise PayloadTooLargeError(f"at most {settings.max_batch} images per request")
            blobs = [await f.read() for f in files]
        # Headers only (format, size, JPEG scan lengths): off the event loop, but not queued behind decodes.
        infos = await asyncio.to_thread(codec.scan_files, blobs, settings.max_image_pixels)

        def decode_files(handle: ModelHandle) -> torch.Tensor:
            device = handle.device if settings.decode_on_device else None
            return codec.decode_files(blobs, handle.input_size, settings.max_image_pixels, device, infos)

        return _Body(sum(info.pixels for info in infos), decode_files)
    if ctype in ("application/x-npy", "application/octet-stream"):
        body = await request.body()
        images, pixels = codec.npy_images(codec.npy_shape(body))
        if images > settings.max_batch:
            raise PayloadTooLargeError(f"at most {settings.max_batch} images per request, got {images}")
        return _Body(pixels, lambda handle: codec.decode_npy(body, handle.input_size))
    raise UnsupportedMediaTypeError(
        f"unsupported content type {ctype or 'none'!r}; send multipart/form-data `files` or application/x-npy"
    )


async def _decode(request: Request, body: _Body, handle: ModelHandle, engine: Engine) -> torch.Tensor:
    """The body's images as a uint8 batch for `handle`'s model, decoded only once the request may still be
    answered and the pixels its headers declare are charged to its admission ticket (413 over the
    per-request budget, 503 while the replica's budget is in use). The ticket holds them until the request
    is over."""
    ticket: Ticket = request.state.ticket
    await _still_wanted(request, ticket.deadline, "before decoding")
    # A cancelled request still holds its pixels until the decode thread has finished.
    batch = await ticket.decode(body.pixels, lambda: engine.decode(functools.partial(body.decode, handle)))
    await _still_wanted(request, ticket.deadline, "after decoding")
    return batch


async def _still_wanted(request: Request, deadline: Deadline, stage: str) -> None:
    """503 `deadline_exceeded` past the request's deadline; a client that has gone cancels the request."""
    deadline.check(stage)
    if await request.is_disconnected():
        raise ClientDisconnect(f"client went away {stage}")


@router.post("/streams/{stream_id}/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY)
async def predict(
    stream_id: StreamId,
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    ns: NamespaceDep,
    adapt: Annotated[bool, Query(description="update the stream's state with this batch")] = True,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 3,
) -> PredictResponse:
    """Predict a batch of images for a stream, adapting its state unless adapt=false."""
    body = await _read_body(request, settings)
    resolved = await engine.resolve(ns, stream_id)
    handle = engine.pool.get(resolved.policy.model)
    batch = await _decode(request, body, handle, engine)
    outcome = await engine.predict(ns, stream_id, batch, adapt, resolved, deadline=request.state.deadline)
    return _response(stream_id, outcome, handle.classes, top_k)


def _response(stream: str, out: PredictOutcome, classes: tuple[str, ...], top_k: int) -> PredictResponse:
    logits = out.logits
    probs = logits.softmax(1)
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    entropy = softmax_entropy(logits)
    preds = [
        Prediction(
            top_k=[TopK(index=i, label=classes[i], probability=p) for i, p in zip(idx, ps, strict=True)],
            entropy=e,
        )
        for idx, ps, e in zip(top_i.tolist(), top_p.tolist(), entropy.tolist(), strict=True)
    ]
    s = out.result.stats
    return PredictResponse(
        stream_id=stream,
        model=out.policy.model,
        strategy=out.policy.strategy,
        incarnation=out.policy.incarnation,
        created=out.created,
        lost=out.lost,  # type: ignore[arg-type]
        adapted=out.adapted,
        durable=out.durable,
        not_adapted=out.not_adapted,
        conflict=out.conflict,
        version=out.version,
        predictions=preds,
        stats=PredictStats(
            samples=s.samples,
            used=s.used,
            filtered=s.filtered,
            mean_entropy=s.mean_entropy,
            mean_confidence=s.mean_confidence,
            bn_distance=s.bn_distance,
            requests=out.requests,
        ),
    )
