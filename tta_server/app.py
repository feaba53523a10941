"""`create_app(settings)`: builds the model pool, state store, engine and metrics in the lifespan,
installs the error handlers and body limit, and mounts the routers and /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import adapters
from tta_server import __version__
from tta_server.api import info, streams
from tta_server.api.deps import RateLimiter
from tta_server.engine import Engine
from tta_server.errors import PayloadTooLargeError, StoreUnavailableError, TTAError, to_http
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool, resolve_device
from tta_server.records import CorruptRecordError
from tta_server.settings import Settings, get_settings
from tta_server.state_store import InMemoryStateStore, RedisStateStore, StateStore

log = logging.getLogger("tta_server")


def build_store(settings: Settings) -> StateStore:
    if settings.redis_url:
        return RedisStateStore(settings.redis_url, settings.state_ttl_seconds, settings.store_timeout_seconds)
    return InMemoryStateStore(settings.state_ttl_seconds)


def create_app(settings: Settings | None = None, pool: ModelPool | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        models = pool or await asyncio.to_thread(
            ModelPool.load, settings.models_config, resolve_device(settings.device)
        )
        metrics.models_loaded.set(len(models.handles))
        metrics.init_labels(models.handles, adapters.list_strategies())
        store = build_store(settings)
        try:
            await store.ping()
            metrics.store_up.set(1)
        except StoreUnavailableError as exc:
            metrics.store_up.set(0)
            log.warning("state store not reachable at start-up (%s); /readyz reports it", exc)
        app.state.engine = Engine(settings, models, store, metrics)
        log.info("ready: models %s, store %s", list(models.handles), type(store).__name__)
        try:
            yield
        finally:
            app.state.engine.close()
            await store.close()

    app = FastAPI(
        title="TTA inference service",
        version=__version__,
        summary="Test-time adapted predictions per client stream",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.key_namespaces = settings.key_namespaces()
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    app.include_router(streams.router)
    app.include_router(info.router)
    _install_error_handlers(app, metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path != "/metrics":
            metrics.requests.labels(path, str(response.status_code)).inc()
            metrics.request_duration.labels(path).observe(time.perf_counter() - t0)
            error_type = response.headers.get("x-error-type")
            if error_type:
                metrics.request_errors.labels(path, error_type).inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    hdrs = {"x-error-type": body["error_type"], **(headers or {})}
    return JSONResponse(body, status_code=status, headers=hdrs)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(TTAError)
    async def tta_error(_: Request, exc: TTAError) -> JSONResponse:
        if isinstance(exc, StoreUnavailableError):
            metrics.store_up.set(0)
        return _error_response(exc.status_code, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return _error_response(
            422, {"error": "request validation failed", "error_type": "validation", "detail": detail}
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}
        error_type = kinds.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, {"error": str(exc.detail), "error_type": error_type})

    @app.exception_handler(adapters.AdaptError)
    @app.exception_handler(CorruptRecordError)
    async def lower_layer_error(request: Request, exc: Exception) -> JSONResponse:
        mapped = to_http(exc)  # errors of the core and the record decoder, mapped in one table
        if mapped is not None:
            return await tta_error(request, mapped)
        return await internal_error(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error (request %s)", request_id, exc_info=exc)
        body = {"error": f"internal error (request id {request_id})", "error_type": "internal"}
        return _error_response(500, body)


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` (413): by Content-Length, or while reading a chunked one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _error_response(413, too_large.body())(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)  # the server stops reading at Content-Length
            return
        # No Content-Length (chunked): read the body here, so an oversized one is a 413 whatever the
        # route (a body error raised inside a route's JSON parsing would surface as a 400).
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await _error_response(413, too_large.body())(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def buffered_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, buffered_receive, send)
