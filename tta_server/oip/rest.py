"""The Open Inference Protocol v2 over HTTP/REST, under `/v2` (docs/API.md, "Open Inference Protocol").

JSON tensors and the binary tensor data extension: a request whose JSON header is followed by raw tensor
bytes says the header's length in `Inference-Header-Content-Length`, and each binary input its byte size
in its `binary_data_size` parameter. Outputs are binary when the requested output's `binary_data`
parameter or the request's `binary_data_output` parameter says so; the answer then carries the same
header. Authentication, deadlines, admission and the body limits are the edge middleware's, as for `/v1`;
errors are rendered by the app's handlers (`{"error": ..., "error_type": ...}`, status from ERROR_TYPES).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from tta_server.admission import Admission
from tta_server.api.deps import EngineDep, NamespaceDep, SettingsDep
from tta_server.api.streams import _still_wanted
from tta_server.errors import InvalidImageError, ValidationError
from tta_server.oip import core

HEADER_LENGTH = "inference-header-content-length"

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])


@router.get("")
async def server_metadata() -> dict[str, Any]:
    """Server name, version and protocol extensions."""
    return core.server_metadata()


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 while the replica can serve (as /readyz), else 503."""
    engine = getattr(request.app.state, "engine", None)
    ok = engine is not None and (await engine.health())["ready"]
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(model: str, engine: EngineDep, version: str = "") -> dict[str, Any]:
    return core.model_metadata(core.model_handle(engine, model, version))


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, engine: EngineDep, version: str = "") -> dict[str, Any]:
    handle = core.model_handle(engine, model, version)
    return {"name": handle.model_id, "ready": True}


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(
    model: str,
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    ns: NamespaceDep,
    version: str = "",
) -> Response:
    """Inference on a batch of images (see docs/API.md for the inputs, outputs and parameters)."""
    body = await request.body()
    req = parse_request(model, version, body, request.headers.get(HEADER_LENGTH))
    req.stream_header = request.headers.get(core.STREAM_HEADER)
    deadline = request.state.deadline
    ticket = getattr(request.state, "ticket", None)  # the edge middleware admitted the request
    admission: Admission | None = None
    if ticket is None:  # a path the middleware's pattern did not see as infer (never, by construction)
        admission = request.app.state.admission
        ticket = admission.admit(deadline)
    try:
        out = await core.infer(
            engine, settings, ns, ticket, req, lambda stage: _still_wanted(request, deadline, stage)
        )
    finally:
        if admission is not None:
            ticket.close()
            admission.leave()
    return render_response(out, req)


def parse_request(model: str, version: str, body: bytes, header_length: str | None) -> core.InferRequest:
    """An infer body: JSON, or a JSON header of `header_length` bytes followed by binary tensor data."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ValidationError(f"{HEADER_LENGTH} must be a byte count within the body")
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidImageError(f"request header is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ValidationError("the request must be a JSON object with an `inputs` list")
    pos = 0
    inputs = []
    for item in doc["inputs"]:
        tensor, pos = _input(item, binary, pos)
        inputs.append(tensor)
    if pos != len(binary):
        raise InvalidImageError(f"{len(binary) - pos} bytes of binary data belong to no input")
    outputs = []
    for item in doc.get("outputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValidationError("each requested output must be an object with a `name`")
        outputs.append(core.RequestedOutput(item["name"], _params(item.get("parameters"))))
    rid = doc.get("id", "")
    return core.InferRequest(
        model, version, inputs, outputs, _params(doc.get("parameters")), rid if isinstance(rid, str) else ""
    )


def _input(item: Any, binary: bytes, pos: int) -> tuple[core.InputTensor, int]:
    """One input of the JSON header, its data inline or the next bytes of `binary` from `pos`."""
    if not isinstance(item, dict):
        raise ValidationError("each input must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not _is_shape(shape):
        raise ValidationError("each input needs a `name`, a `datatype` and a `shape` (list of integers)")
    dims: list[int] = list(shape or [])
    size = _params(item.get("parameters")).get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or pos + size > len(binary):
            raise InvalidImageError(f"input {name!r}: binary_data_size beyond the binary data")
        return core.InputTensor(
            name, datatype, dims, core.array_from_raw(datatype, dims, binary[pos : pos + size])
        ), pos + size
    if "data" not in item:
        raise ValidationError(f"input {name!r} has neither `data` nor a binary_data_size parameter")
    return core.InputTensor(name, datatype, dims, core.array_from_json(datatype, dims, item["data"])), pos


def _params(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError("`parameters` must be an object")
    return raw


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)


def render_response(out: core.InferResponse, req: core.InferRequest) -> Response:
    """JSON, or JSON header + binary outputs for those asked for in binary."""
    all_binary = req.parameters.get("binary_data_output") is True
    asked = {o.name: o.parameters for o in req.outputs}
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for t in out.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        binary = asked.get(t.name, {}).get("binary_data", all_binary)
        if binary is True:
            raw = core.raw_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(t.data, list):
            entry["data"] = [b.decode("utf-8", "replace") for b in t.data]
        else:
            entry["data"] = np.asarray(t.data).reshape(-1).tolist()
        tensors.append(entry)
    doc: dict[str, Any] = {
        "model_name": out.model,
        "model_version": core.MODEL_VERSION,
        "parameters": out.parameters,
        "outputs": tensors,
    }
    if out.id:
        doc["id"] = out.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
