"""Request dependencies: settings, engine, and the caller's stream namespace (auth + rate limit)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Path, Request

from tta_server.engine import Engine
from tta_server.errors import RateLimitedError, UnauthorizedError
from tta_server.schemas import STREAM_ID_PATTERN
from tta_server.settings import Settings

DEFAULT_NAMESPACE = "default"


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


class RateLimiter:
    """Token bucket per namespace (per replica): `per_minute` requests, bursts up to the same."""

    def __init__(self, per_minute: int | None) -> None:
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = float(per_minute or 0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, ns: str) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(ns, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[ns] = (tokens, now)
            retry = max(1, int((1.0 - tokens) / self.rate + 0.999))
            raise RateLimitedError(
                "rate limit exceeded for this API key", headers={"Retry-After": str(retry)}
            )
        self._buckets[ns] = (tokens - 1.0, now)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def presents_credentials(headers: Mapping[str, str]) -> bool:
    """Whether the request carries any credential at all (then it must be a valid one, on any path)."""
    return "authorization" in headers or "x-api-key" in headers


def match_secret(secrets: Mapping[str, str], presented: str | None) -> str | None:
    """The name `secrets` maps the presented key to, or None. Constant time in which key is close."""
    match = None
    if presented:
        for secret, name in secrets.items():
            # Compare against every key so timing reveals nothing about which one is close.
            if hmac.compare_digest(secret.encode(), presented.encode()):
                match = name
    return match


def authenticate(keys: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The caller's namespace from its headers alone (no body is needed): 401 without a valid key."""
    presented = presented_key(headers)
    if not presented:
        raise UnauthorizedError("missing API key (Authorization: Bearer <key> or X-API-Key)")
    ns = match_secret(keys, presented)
    if ns is None:
        raise UnauthorizedError("invalid API key")
    return ns


def get_namespace(request: Request) -> str:
    """Authenticate the caller; its key's name scopes every stream id it uses.

    The edge middleware has authenticated the request from its headers before any body was read and
    left the namespace in `request.state`; without it (an app mounted without the middleware), check here.
    """
    keys: dict[str, str] = request.app.state.key_namespaces
    ns = DEFAULT_NAMESPACE
    if keys:
        ns = getattr(request.state, "namespace", None) or authenticate(keys, request.headers)
    request.app.state.rate_limiter.check(ns)
    return ns


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
NamespaceDep = Annotated[str, Depends(get_namespace)]
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="client-chosen stream id")]
