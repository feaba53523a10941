"""One error taxonomy: every failure has a stable `error_type`, an HTTP status and a JSON body."""

from __future__ import annotations

from typing import Any

import adapters


class TTAError(Exception):
    error_type = "internal"
    status_code = 500

    def __init__(self, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "error_type": self.error_type}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


def _kind(name: str, error_type: str, status: int) -> type[TTAError]:
    return type(name, (TTAError,), {"error_type": error_type, "status_code": status})


ValidationError = _kind("ValidationError", "validation", 422)
UnknownStrategyError = _kind("UnknownStrategyError", "unknown_strategy", 422)
UnknownModelError = _kind("UnknownModelError", "unknown_model", 422)
UnknownStreamError = _kind("UnknownStreamError", "unknown_stream", 404)
InvalidImageError = _kind("InvalidImageError", "invalid_image", 400)
UnsupportedMediaTypeError = _kind("UnsupportedMediaTypeError", "unsupported_media_type", 415)
PayloadTooLargeError = _kind("PayloadTooLargeError", "payload_too_large", 413)
BatchTooSmallError = _kind("BatchTooSmallError", "batch_too_small", 422)
StateMismatchError = _kind("StateMismatchError", "state_mismatch", 409)
StateCorruptError = _kind("StateCorruptError", "state_corrupt", 409)
UnauthorizedError = _kind("UnauthorizedError", "unauthorized", 401)
RateLimitedError = _kind("RateLimitedError", "rate_limited", 429)
StoreUnavailableError = _kind("StoreUnavailableError", "state_store_unavailable", 503)
IncompatibleModelError = _kind("IncompatibleModelError", "incompatible_model", 422)
NotReadyError = _kind("NotReadyError", "not_ready", 503)
OverloadedError = _kind("OverloadedError", "overloaded", 503)
DeadlineExceededError = _kind("DeadlineExceededError", "deadline_exceeded", 503)
RequestTimeoutError = _kind("RequestTimeoutError", "request_timeout", 408)

_FROM_CORE: dict[str, type[TTAError]] = {
    "unknown_strategy": UnknownStrategyError,
    "batch_too_small": BatchTooSmallError,
    "state_mismatch": StateMismatchError,
    "state_corrupt": StateCorruptError,
    "incompatible_model": IncompatibleModelError,
}


def from_core(exc: adapters.AdaptError) -> TTAError:
    """Translate an adaptation-core error into its HTTP twin."""
    return _FROM_CORE.get(exc.error_type, TTAError)(str(exc))
