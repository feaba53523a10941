"""One error taxonomy: every failure has a stable `error_type`, an HTTP status and a JSON body.

`ERROR_TYPES` is the one table of every error type the server sends (docs/API.md lists the same);
`to_http` maps the core's and the record decoder's exceptions onto it, so the layers below the API raise
their own errors and nothing else translates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import adapters

# error_type -> (HTTP status, when it is sent)
ERROR_TYPES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "malformed request (framework-level)"),
    "invalid_image": (400, "an image or array could not be parsed"),
    "unauthorized": (401, "missing or invalid API key"),
    "not_found": (404, "no such route"),
    "unknown_stream": (
        404,
        "the stream does not exist (or is not configured, when configuration is required)",
    ),
    "method_not_allowed": (405, "wrong HTTP method"),
    "state_mismatch": (409, "stored state does not fit the stream's policy or model; reset the stream"),
    "state_corrupt": (409, "a stored record cannot be decoded; reset (state) or DELETE (any record)"),
    "not_exportable": (409, "the stream's predictions depend on each batch: no static patch reproduces them"),
    "request_timeout": (408, "the request body did not arrive within the body read timeout"),
    "payload_too_large": (413, "body, image count or decoded pixels over the limits"),
    "unsupported_media_type": (415, "predict body is neither multipart nor npy"),
    "validation": (422, "request fields or strategy config invalid"),
    "unknown_strategy": (422, "no strategy of that name"),
    "unknown_model": (422, "no model of that id"),
    "incompatible_model": (422, "the strategy cannot run on the model (e.g. needs source data it lacks)"),
    "batch_too_small": (422, "the strategy needs more images per adapting batch"),
    "rate_limited": (429, "per-key request rate exceeded (Retry-After)"),
    "internal": (500, "a bug: logged with a request id"),
    "state_store_unavailable": (503, "the state store cannot be reached"),
    "state_store_full": (503, "the state store refuses writes (out of memory)"),
    "overloaded": (503, "the replica's or stream's queue is full (Retry-After)"),
    "deadline_exceeded": (503, "the request's deadline passed before it could be served"),
}


class TTAError(Exception):
    error_type = "internal"
    status_code = 500  # each kind's comes from ERROR_TYPES

    def __init__(self, message: str, detail: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: Mapping[str, str] | None = headers

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "error_type": self.error_type}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


_BY_TYPE: dict[str, type[TTAError]] = {}


def _kind(name: str, error_type: str) -> type[TTAError]:
    assert error_type in ERROR_TYPES, error_type
    cls = type(name, (TTAError,), {"error_type": error_type, "status_code": ERROR_TYPES[error_type][0]})
    _BY_TYPE[error_type] = cls
    return cls


ValidationError = _kind("ValidationError", "validation")
UnknownStrategyError = _kind("UnknownStrategyError", "unknown_strategy")
UnknownModelError = _kind("UnknownModelError", "unknown_model")
UnknownStreamError = _kind("UnknownStreamError", "unknown_stream")
InvalidImageError = _kind("InvalidImageError", "invalid_image")
UnsupportedMediaTypeError = _kind("UnsupportedMediaTypeError", "unsupported_media_type")
PayloadTooLargeError = _kind("PayloadTooLargeError", "payload_too_large")
BatchTooSmallError = _kind("BatchTooSmallError", "batch_too_small")
StateMismatchError = _kind("StateMismatchError", "state_mismatch")
StateCorruptError = _kind("StateCorruptError", "state_corrupt")
UnauthorizedError = _kind("UnauthorizedError", "unauthorized")
RateLimitedError = _kind("RateLimitedError", "rate_limited")
StoreUnavailableError = _kind("StoreUnavailableError", "state_store_unavailable")
StoreFullError = _kind("StoreFullError", "state_store_full")
IncompatibleModelError = _kind("IncompatibleModelError", "incompatible_model")
OverloadedError = _kind("OverloadedError", "overloaded")
DeadlineExceededError = _kind("DeadlineExceededError", "deadline_exceeded")
RequestTimeoutError = _kind("RequestTimeoutError", "request_timeout")
NotFoundError = _kind("NotFoundError", "not_found")
NotExportableError = _kind("NotExportableError", "not_exportable")


def to_http(exc: BaseException) -> TTAError | None:
    """The API error for an exception raised below the API, or None for a bug (-> 500)."""
    from tta_server.records import CorruptRecordError

    if isinstance(exc, TTAError):
        return exc
    if isinstance(exc, adapters.AdaptError):
        kind = _BY_TYPE.get(exc.error_type)
        return kind(str(exc)) if kind else None
    if isinstance(exc, CorruptRecordError):
        return StateCorruptError(
            f"{exc}; POST /reset repairs a corrupt state, PUT a policy or DELETE repairs any record",
            detail={"record": exc.record},
        )
    return None
