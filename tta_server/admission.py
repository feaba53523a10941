"""Admission control: bounded work per request and per replica.

* `Deadline`: when a request stops being worth answering. Every request gets one at arrival (the
  server's `request_timeout_seconds`, or less when the client says so in `X-Request-Timeout`); it is
  `request.state.deadline` and goes to `Engine.predict(deadline=...)`, which must not compute or commit
  a step for requests whose deadline has passed.
* `Admission`: per replica, at most `max_pending_requests` predict requests are admitted at once (the
  queue bound), and the images they decode add up to at most `max_replica_pixels` decoded pixels
  (one request: `max_request_pixels`), charged from the image headers before anything is decoded.
* `Ticket`: one admitted request's share. Its pixels are held until the request is over and every
  decode it started has finished, whichever is later, so the budget never leaks and never under-counts.

Everything here runs on the event loop: plain counters, no locks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tta_server.errors import (
    DeadlineExceededError,
    OverloadedError,
    PayloadTooLargeError,
    TTAError,
    ValidationError,
)

TIMEOUT_HEADER = "x-request-timeout"
T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock after which the request's answer is of no use to its client."""

    at: float
    seconds: float  # the time the request was given

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def check(self, stage: str) -> None:
        """Raise 503 `deadline_exceeded` when the deadline has passed (`stage`: where we were)."""
        if self.expired():
            raise DeadlineExceededError(
                f"request deadline of {self.seconds:g} s passed {stage}; nothing was computed",
                headers={"Retry-After": "1"},
            )


def request_timeout(header: str | None, cap: float) -> float:
    """Seconds a request may take: `X-Request-Timeout` (a positive number, capped at `cap`) or `cap`."""
    if header is None:
        return cap
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValidationError(
            "X-Request-Timeout must be a positive number of seconds",
            detail=[
                {
                    "loc": ["header", "X-Request-Timeout"],
                    "msg": "not a positive number",
                    "type": "value_error",
                }
            ],
        )
    return min(seconds, cap)


@dataclass(eq=False)
class Ticket:
    """What one admitted request holds: its deadline and the decoded pixels charged to it."""

    admission: Admission
    deadline: Deadline
    pixels: int = 0
    _work: set[asyncio.Future[Any]] = field(default_factory=set)
    _closed: bool = False

    def charge(self, pixels: int) -> None:
        """Charge `pixels` decoded pixels to this request before decoding them: 413 over the per-request
        budget, 503 `overloaded` while the replica's budget is taken by other requests."""
        self.admission.reserve(self, pixels)

    async def decode(self, pixels: int, work: Callable[[], Awaitable[T]]) -> T:
        """Charge `pixels`, then run `work()` (a decode in a thread) and hold them until it has finished,
        even if the request is cancelled meanwhile (the decode is shielded from the cancellation)."""
        self.charge(pixels)
        future = asyncio.ensure_future(work())
        self.hold_until(future)
        return await asyncio.shield(future)

    def hold_until(self, work: asyncio.Future[Any]) -> None:
        """Keep the pixels charged until `work` (a decode running in a thread) has finished, even if the
        request itself ends first (cancelled when its client went away)."""
        if not work.done():
            self._work.add(work)
            work.add_done_callback(self._work_done)

    def _work_done(self, work: asyncio.Future[Any]) -> None:
        self._work.discard(work)
        if self._closed and not self._work:
            self.admission.release(self)

    def close(self) -> None:
        """The request is over: give its pixels back now, or when its last decode finishes."""
        if self._closed:
            return
        self._closed = True
        if not self._work:
            self.admission.release(self)


class Admission:
    """Per-replica bounds on admitted predict requests and on the pixels they decode."""

    def __init__(
        self,
        max_pending: int,
        replica_pixels: int,
        request_pixels: int,
        retry_after: int = 1,
    ) -> None:
        self.max_pending = max_pending
        self.replica_pixels = replica_pixels
        self.request_pixels = request_pixels
        self.retry_after = retry_after
        self.pending = 0  # admitted predict requests not finished yet
        self.pixels = 0  # decoded pixels charged to them

    @classmethod
    def from_settings(cls, settings: Any) -> Admission:
        return cls(
            settings.max_pending_requests,
            settings.max_replica_pixels,
            settings.max_request_pixels,
            settings.retry_after_seconds,
        )

    def overloaded(self, why: str) -> TTAError:
        return OverloadedError(
            f"server overloaded: {why}; retry later", headers={"Retry-After": str(self.retry_after)}
        )

    def admit(self, deadline: Deadline) -> Ticket:
        """Admit one predict request (503 `overloaded` when `max_pending` are in already)."""
        if self.pending >= self.max_pending:
            raise self.overloaded(f"{self.max_pending} predict requests in progress")
        self.pending += 1
        return Ticket(self, deadline)

    def reserve(self, ticket: Ticket, pixels: int) -> None:
        total = ticket.pixels + pixels
        if total > self.request_pixels:
            raise PayloadTooLargeError(
                f"request decodes to {total} pixels, over the budget of {self.request_pixels} "
                "decoded pixels per request"
            )
        if self.pixels + pixels > self.replica_pixels:
            raise self.overloaded(f"the budget of {self.replica_pixels} decoded pixels is in use")
        self.pixels += pixels
        ticket.pixels = total

    def release(self, ticket: Ticket) -> None:
        self.pixels -= ticket.pixels
        ticket.pixels = 0

    def leave(self) -> None:
        self.pending -= 1
