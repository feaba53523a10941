"""Errors raised by the TTA client.

    TTAError
    ├── TransportError                 the server could not be reached (connect, read, timeout)
    └── APIError(status, error_type, message, detail, retry_after)
        ├── BadRequestError            400 bad_request
        ├── InvalidImageError          400 invalid_image
        ├── UnauthorizedError          401 unauthorized
        ├── NotFoundError              404 not_found (no such route)
        ├── StreamNotFoundError        404 unknown_stream
        ├── MethodNotAllowedError      405 method_not_allowed
        ├── RequestTimeoutError        408 request_timeout (the body arrived too slowly)
        ├── StateMismatchError         409 state_mismatch
        ├── StateCorruptError          409 state_corrupt
        ├── NotExportableError         409 not_exportable
        ├── PayloadTooLargeError       413 payload_too_large
        ├── UnsupportedMediaTypeError  415 unsupported_media_type
        ├── ValidationError            422 validation
        ├── UnknownStrategyError       422 unknown_strategy
        ├── UnknownModelError          422 unknown_model
        ├── IncompatibleModelError     422 incompatible_model
        ├── BatchTooSmallError         422 batch_too_small
        ├── RateLimitedError           429 rate_limited
        ├── ServerError                500 internal (and any other 5xx)
        └── UnavailableError           503 (any 503: retry later)
            ├── StoreUnavailableError  503 state_store_unavailable
            ├── StoreFullError         503 state_store_full
            ├── OverloadedError        503 overloaded
            └── DeadlineExceededError  503 deadline_exceeded

``retry_after`` is the server's ``Retry-After`` header in seconds (``None`` when absent).

``raise_for_error`` picks the class by the body's ``error_type`` first; when the type is missing or
unknown (a newer server, a proxy in between) it falls back on the HTTP status.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, ClassVar

import httpx

__all__ = [
    "APIError",
    "BadRequestError",
    "BatchTooSmallError",
    "DeadlineExceededError",
    "IncompatibleModelError",
    "InvalidImageError",
    "MethodNotAllowedError",
    "NotExportableError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RequestTimeoutError",
    "ServerError",
    "StateCorruptError",
    "StateMismatchError",
    "StoreFullError",
    "StoreUnavailableError",
    "StreamNotFoundError",
    "TTAError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownModelError",
    "UnknownStrategyError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "raise_for_error",
]


class TTAError(Exception):
    """Base of every error raised by ``tta_client``."""


class TransportError(TTAError):
    """The request did not get an HTTP answer (connection refused, DNS failure, timeout)."""


class APIError(TTAError):
    """The server answered with an error status."""

    #: The ``error_type`` this class stands for (``None`` on the base class).
    ERROR_TYPE: ClassVar[str | None] = None
    #: The HTTP status the contract assigns to ``ERROR_TYPE``.
    STATUS: ClassVar[int | None] = None

    def __init__(
        self,
        status: int,
        error_type: str | None,
        message: str,
        detail: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.detail = detail
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} ({self.error_type or 'error'}, HTTP {self.status})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, error_type={self.error_type!r}, message={self.message!r})"


class ValidationError(APIError):
    """Malformed body, bad query value or bad config value; ``detail`` lists the errors."""

    ERROR_TYPE, STATUS = "validation", 422


class UnknownStrategyError(APIError):
    """The strategy name is not registered; the message lists the valid names."""

    ERROR_TYPE, STATUS = "unknown_strategy", 422


class UnknownModelError(APIError):
    """The model id is not served; the message lists the valid ids."""

    ERROR_TYPE, STATUS = "unknown_model", 422


class BatchTooSmallError(APIError):
    """The stream's strategy needs more images per adapting batch."""

    ERROR_TYPE, STATUS = "batch_too_small", 422


class StreamNotFoundError(APIError):
    """The stream has neither a policy nor a state."""

    ERROR_TYPE, STATUS = "unknown_stream", 404


class InvalidImageError(APIError):
    """Corrupt or non-image bytes, wrong array shape or dtype, or an empty batch."""

    ERROR_TYPE, STATUS = "invalid_image", 400


class UnsupportedMediaTypeError(APIError):
    """The body was neither multipart nor ``application/x-npy``."""

    ERROR_TYPE, STATUS = "unsupported_media_type", 415


class PayloadTooLargeError(APIError):
    """Body, batch or image dimensions exceed the server's limits."""

    ERROR_TYPE, STATUS = "payload_too_large", 413


class StateMismatchError(APIError):
    """The stored state belongs to another model, strategy, config or schema; reset the stream."""

    ERROR_TYPE, STATUS = "state_mismatch", 409


class StateCorruptError(APIError):
    """The stored state cannot be decoded; reset the stream."""

    ERROR_TYPE, STATUS = "state_corrupt", 409


class NotExportableError(APIError):
    """The stream's predictions depend on each batch: no static export reproduces them (the message says why)."""

    ERROR_TYPE, STATUS = "not_exportable", 409


class UnauthorizedError(APIError):
    """Missing or wrong API key."""

    ERROR_TYPE, STATUS = "unauthorized", 401


class RateLimitedError(APIError):
    """The key's request rate was exceeded; wait ``retry_after`` seconds (``None`` if not given)."""

    ERROR_TYPE, STATUS = "rate_limited", 429


class IncompatibleModelError(APIError):
    """The strategy cannot run on the model (e.g. it needs source data the model lacks)."""

    ERROR_TYPE, STATUS = "incompatible_model", 422


class BadRequestError(APIError):
    """The request is malformed at the HTTP level."""

    ERROR_TYPE, STATUS = "bad_request", 400


class NotFoundError(APIError):
    """No such route (a stream that does not exist is ``StreamNotFoundError``)."""

    ERROR_TYPE, STATUS = "not_found", 404


class MethodNotAllowedError(APIError):
    """The route does not take this HTTP method."""

    ERROR_TYPE, STATUS = "method_not_allowed", 405


class RequestTimeoutError(APIError):
    """The request body did not reach the server within its body read timeout."""

    ERROR_TYPE, STATUS = "request_timeout", 408


class UnavailableError(APIError):
    """The server cannot serve the request now; nothing was written. Retry after ``retry_after``."""

    ERROR_TYPE: ClassVar[str | None] = None
    STATUS: ClassVar[int | None] = 503


class StoreUnavailableError(UnavailableError):
    """The server's state store is unreachable; nothing was written."""

    ERROR_TYPE, STATUS = "state_store_unavailable", 503


class StoreFullError(UnavailableError):
    """The server's state store refuses writes (out of memory)."""

    ERROR_TYPE, STATUS = "state_store_full", 503


class OverloadedError(UnavailableError):
    """The replica's or the stream's queue is full; retry after ``retry_after`` seconds."""

    ERROR_TYPE, STATUS = "overloaded", 503


class DeadlineExceededError(UnavailableError):
    """The request's deadline passed before the server could serve it; nothing was committed."""

    ERROR_TYPE, STATUS = "deadline_exceeded", 503


class ServerError(APIError):
    """An internal server error (a bug on the server, logged there with a request id)."""

    ERROR_TYPE, STATUS = "internal", 500


_BY_TYPE: dict[str, type[APIError]] = {
    cls.ERROR_TYPE: cls
    for cls in (
        ValidationError,
        UnknownStrategyError,
        UnknownModelError,
        BatchTooSmallError,
        StreamNotFoundError,
        InvalidImageError,
        UnsupportedMediaTypeError,
        PayloadTooLargeError,
        StateMismatchError,
        StateCorruptError,
        NotExportableError,
        UnauthorizedError,
        RateLimitedError,
        StoreUnavailableError,
        ServerError,
        IncompatibleModelError,
        BadRequestError,
        NotFoundError,
        MethodNotAllowedError,
        RequestTimeoutError,
        StoreFullError,
        OverloadedError,
        DeadlineExceededError,
    )
    if cls.ERROR_TYPE is not None
}

# Status fallback: the most general class for each status the contract uses.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidImageError,
    401: UnauthorizedError,
    404: StreamNotFoundError,
    409: StateMismatchError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitedError,
    500: ServerError,
    405: MethodNotAllowedError,
    408: RequestTimeoutError,
    503: UnavailableError,
}


def error_class(error_type: str | None, status: int) -> type[APIError]:
    """The exception class for ``error_type``, else for ``status``, else ``ServerError``/``APIError``."""
    if error_type is not None and error_type in _BY_TYPE:
        return _BY_TYPE[error_type]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else APIError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_body(response: httpx.Response) -> tuple[str | None, str, Any]:
    """``(error_type, message, detail)`` from an error response, whatever its body looks like."""
    fallback = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return None, text[:500] or fallback, None
    if not isinstance(body, dict):
        return None, fallback, body
    error_type = body.get("error_type")
    message = body.get("error")
    detail = body.get("detail")
    if not isinstance(message, str):
        # FastAPI's own answers (e.g. an unknown route) carry only "detail".
        message = detail if isinstance(detail, str) else fallback
    return (error_type if isinstance(error_type, str) else None), message, detail


def raise_for_error(response: httpx.Response) -> None:
    """Raise the ``APIError`` subclass matching an error response; do nothing for a 2xx."""
    if response.is_success:
        return
    error_type, message, detail = _error_body(response)
    cls = error_class(error_type, response.status_code)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    raise cls(response.status_code, error_type, message, detail, retry_after=retry_after)
