"""Retries with exponential backoff and jitter, and the client's settings from the environment.

Which requests are retried (``Retry.decide``):

* **Idempotent requests** (every GET, the PUT of a policy, DELETE, reset, and predictions with
  ``adapt=False``): after any transport error (connection refused, timeouts, a dropped connection), a
  429 or a 503.
* **Adapting predictions** (``adapt=True``) are not idempotent: a batch the server has stepped on must not
  be stepped on twice. They are retried only when the server certainly did not process them: the
  connection could not be made (``ConnectError``, ``ConnectTimeout``, no free connection in the pool), a
  429 (``rate_limited`` is answered before the request is looked at), or a 503 that says nothing ran:
  ``overloaded`` and ``deadline_exceeded`` (both documented "nothing was computed or committed") and a
  503 without an error type (the HTTP server's connection limit, answered before the app). Never after a
  read timeout, a dropped connection, ``state_store_unavailable`` (a timed-out final write may have
  committed) or any other answer.

The wait before retry ``k`` (0-based) is ``Retry-After`` when the server sent one (plus up to 10 % jitter;
no retry when it asks for more than ``max_retry_after``), else a random time in
``[0, min(max_backoff, backoff * 2**k)]`` ("full jitter").
"""

from __future__ import annotations

import enum
import os
import random
from dataclasses import dataclass, field

import httpx

__all__ = [
    "ENV_API_KEY",
    "ENV_MAX_RETRIES",
    "ENV_TIMEOUT",
    "ENV_URL",
    "Retry",
    "RetryKind",
    "env_float",
]

ENV_URL = "TTA_URL"
ENV_API_KEY = "TTA_API_KEY"
ENV_TIMEOUT = "TTA_TIMEOUT"
ENV_MAX_RETRIES = "TTA_MAX_RETRIES"

#: 503 error types that the server answers before any work on the request.
_NOT_PROCESSED_503 = frozenset({"overloaded", "deadline_exceeded", None})
#: Transport errors raised before the request left the client.
_UNSENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


class RetryKind(enum.Enum):
    """How a request may be retried: any failure (idempotent) or only when it was not processed."""

    IDEMPOTENT = "idempotent"
    UNPROCESSED = "unprocessed"


def env_float(name: str) -> float | None:
    """A number from environment variable ``name`` (None when unset or empty); ValueError naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Retry:
    """How many times and how long to wait. ``Retry(max_retries=0)`` never retries.

    The default number of retries is ``$TTA_MAX_RETRIES`` when set, else 2 (``Retry.from_env``).
    """

    max_retries: int = 2
    #: Base of the exponential backoff, seconds.
    backoff: float = 0.5
    #: Cap of one backoff wait, seconds.
    max_backoff: float = 8.0
    #: A ``Retry-After`` longer than this is not waited for: the error is raised.
    max_retry_after: float = 60.0
    #: HTTP statuses that are retried (within the rules above).
    statuses: frozenset[int] = frozenset({429, 503})
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff, max_backoff and max_retry_after must be >= 0")

    @classmethod
    def from_env(cls) -> Retry:
        value = env_float(ENV_MAX_RETRIES)
        if value is None:
            return cls()
        if value != int(value) or value < 0:
            raise ValueError(f"{ENV_MAX_RETRIES} must be a whole number >= 0, got {value:g}")
        return cls(max_retries=int(value))

    def should_retry_error(self, kind: RetryKind, exc: httpx.TransportError) -> bool:
        """Whether a transport error may be retried for a request of ``kind``."""
        return kind is RetryKind.IDEMPOTENT or isinstance(exc, _UNSENT_ERRORS)

    def should_retry_response(self, kind: RetryKind, response: httpx.Response) -> bool:
        """Whether an answer may be retried for a request of ``kind``."""
        status = response.status_code
        if status not in self.statuses:
            return False
        if kind is RetryKind.IDEMPOTENT or status == 429:
            return True
        return status == 503 and _error_type(response) in _NOT_PROCESSED_503

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (0-based); None: give up (out of retries, or the
        server asks for a longer wait than ``max_retry_after``)."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return retry_after * (1.0 + 0.1 * self.rng.random())
        return self.rng.uniform(0.0, min(self.max_backoff, self.backoff * 2.0**attempt))


def _error_type(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    value = body.get("error_type") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None
