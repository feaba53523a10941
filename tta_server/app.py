"""`create_app(settings)`: builds the model pool, state store, engine and metrics in the lifespan,
installs the error handlers, the body limit and the edge middleware (authentication before any body
is read, deadlines, admission, body read timeout), and mounts the routers and /metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import adapters
from tta_server import __version__, docs_assets
from tta_server.admission import TIMEOUT_HEADER, Admission, Deadline, Ticket, request_timeout
from tta_server.api import info, streams
from tta_server.api.deps import RateLimiter, authenticate, match_secret, presented_key, presents_credentials
from tta_server.engine import Engine
from tta_server.errors import (
    PayloadTooLargeError,
    RequestTimeoutError,
    StoreUnavailableError,
    TTAError,
    UnauthorizedError,
    to_http,
)
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool, resolve_device
from tta_server.oip import rest as oip_rest
from tta_server.records import CorruptRecordError
from tta_server.settings import Settings, get_settings
from tta_server.state_store import InMemoryStateStore, RedisStateStore, StateStore

log = logging.getLogger("tta_server")


def build_store(settings: Settings) -> StateStore:
    if settings.redis_url:
        return RedisStateStore(
            settings.redis_url,
            settings.state_ttl_seconds,
            settings.store_timeout_seconds,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
    return InMemoryStateStore(settings.state_ttl_seconds)


def create_app(settings: Settings | None = None, pool: ModelPool | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        models = (
            pool
            if pool is not None
            else await asyncio.to_thread(
                ModelPool.load, settings.models_config, resolve_device(settings.device)
            )
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
        app.state.engine.start()
        grpc_server = None
        if settings.grpc_port is not None:
            # Imported here: its generated protobuf module is loaded only when the service is on.
            from tta_server.oip import grpc_server as oip_grpc

            grpc_server = await oip_grpc.start(
                app.state.engine, settings, app.state.admission, app.state.rate_limiter, metrics
            )
        log.info("ready: models %s, store %s", list(models.handles), type(store).__name__)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await app.state.engine.shutdown()
            app.state.engine.close()
            await store.close()

    app = FastAPI(
        title="TTA inference service",
        version=__version__,
        summary="Test-time adapted predictions per client stream",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc are docs_assets' pages, with their assets served here
        redoc_url=None,
    )
    docs_assets.install(app)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.key_namespaces = settings.key_namespaces()
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    app.include_router(streams.router)
    app.include_router(info.router)
    app.include_router(oip_rest.router)
    _install_error_handlers(app, metrics)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        read_timeout=settings.body_read_timeout_seconds,
    )

    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.state.admission = Admission.from_settings(settings)
    metrics.pending_requests.set_function(lambda: app.state.admission.pending)
    app.add_middleware(EdgeMiddleware, settings=settings, admission=app.state.admission, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error_response(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
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


class BodyError(TTAError, StarletteHTTPException):
    """A body that broke a limit while a route was reading it, raised from `receive`.

    An HTTPException, so FastAPI's JSON body parsing passes it on instead of answering 400; a TTAError,
    so the TTAError handler renders it (its MRO comes first).
    """

    def __init__(self, kind: type[TTAError], message: str) -> None:
        TTAError.__init__(self, message)
        self.status_code = kind.status_code
        self.error_type = kind.error_type


class ObserveMiddleware:
    """Requests, their duration (to the end of the answer) and error types, per route template.

    Plain ASGI: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) runs every request through
    a task group and a memory stream, which for small predicts cost about a third of the event loop's
    time per request.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        error_type: str | None = None

        async def observed_send(message: Message) -> None:
            nonlocal status, error_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-error-type":
                        error_type = value.decode("latin-1")
            await send(message)

        await self.app(scope, receive, observed_send)
        # The router has filled in the matched route by now (the scope is shared down the stack).
        path = getattr(scope.get("route"), "path", "unmatched")
        if path != "/metrics":
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_duration.labels(path).observe(time.perf_counter() - t0)
            if error_type:
                self.metrics.request_errors.labels(path, error_type).inc()


class BodyLimitMiddleware:
    """Bounds on reading a request body, in size and in time.

    Over `max_bytes`: 413, by Content-Length before a byte is read, or counted while the route reads a
    chunked body. Not in full `read_timeout` seconds after the headers (a slow or stalled upload): 408
    `request_timeout`, raised from the route's read. Nothing is buffered here: the route reads the body
    after the edge middleware has authenticated and admitted the request. (Inside the exception
    middleware's reach: the errors are raised in the route's read and reach the error handlers.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        message = f"request body exceeds {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _error_response(413, PayloadTooLargeError(message).body())(scope, receive, send)
            return
        read_by = None if self.read_timeout is None else time.monotonic() + self.read_timeout
        seen = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete or read_by is None:
                msg = await receive()
            else:
                try:
                    async with asyncio.timeout(max(0.0, read_by - time.monotonic())):
                        msg = await receive()
                except TimeoutError:
                    log.info("request body from %s not in after %g s: cut", _client(scope), self.read_timeout)
                    raise BodyError(
                        RequestTimeoutError, f"request body not received within {self.read_timeout:g} s"
                    ) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                complete = not msg.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyError(PayloadTooLargeError, message)
            return msg

        await self.app(scope, limited_receive, send)


# Admitted like predict: /v1 predict and Open Inference Protocol infer.
PREDICT_PATH = re.compile(r"/v1/streams/[^/]+/predict|/v2/models/[^/]+(/versions/[^/]+)?/infer")
PREDICT_ROUTE = "/v1/streams/{stream_id}/predict"
V2_INFER_ROUTE = "/v2/models/{model}/infer"
ALWAYS_PUBLIC = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
DISCOVERY = frozenset({"/v1/models", "/v1/strategies", "/openapi.json", "/v2"}) | docs_assets.DOCS_PATHS
DISCOVERY_PREFIXES = (docs_assets.ASSETS_PATH + "/",)  # the docs pages' scripts, styles and icon


class EdgeMiddleware:
    """The outermost layer: what is decided from the request headers, and bounds on reading the body.

    1. Authentication before any body byte is read: a protected path without a valid key is answered
       401. A credential that is presented must be valid on every path, public ones included (401).
       Public without a key: /healthz, /readyz; /metrics unless `metrics_token` is set (then it needs
       that token); the discovery paths (models, strategies, API docs and their assets) with `public_discovery`.
    2. The request's `Deadline` (`request.state.deadline`), from `X-Request-Timeout` (422 if invalid).
    3. Predict requests are admitted (at most `max_pending_requests`, else 503 `overloaded` with
       Retry-After) and get a `Ticket` (`request.state.ticket`) that is closed when the request is over,
       whatever happened to it.
    4. A client that goes away is logged at INFO without a traceback; a predict request whose client
       has gone is cancelled (an adaptation step it already joined runs on for the others in it).
    Answers sent before the body was read to its end say `Connection: close`.
    """

    def __init__(self, app: ASGIApp, settings: Settings, admission: Admission, metrics: Metrics) -> None:
        self.app = app
        self.keys = settings.key_namespaces()
        self.metrics_token = (
            {settings.metrics_token.get_secret_value(): "metrics"} if settings.metrics_token else {}
        )
        self.public = ALWAYS_PUBLIC | (DISCOVERY if settings.public_discovery else frozenset())
        self.public_prefixes: tuple[str, ...] = DISCOVERY_PREFIXES if settings.public_discovery else ()
        self.request_timeout = settings.request_timeout_seconds
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]  # the routes' view of it
        predict = scope["method"] == "POST" and PREDICT_PATH.fullmatch(path) is not None
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")
        ticket: Ticket | None = None
        try:
            ns = self._authenticate(path, headers)
            deadline = Deadline.after(request_timeout(headers.get(TIMEOUT_HEADER), self.request_timeout))
            if predict:
                ticket = self.admission.admit(deadline)
        except TTAError as exc:
            route = (V2_INFER_ROUTE if path.startswith("/v2/") else PREDICT_ROUTE) if predict else "unmatched"
            self._count(route, exc)
            extra = {"connection": "close"} if has_body else {}
            await _error_response(exc.status_code, exc.body(), {**(exc.headers or {}), **extra})(
                scope, receive, send
            )
            return
        state = scope.setdefault("state", {})
        state["deadline"] = deadline
        if ns is not None:
            state["namespace"] = ns
        if ticket is not None:
            state["ticket"] = ticket
        body = _BodyReader(receive, complete=not has_body, watch=predict)
        try:
            await body.run(self.app, scope, send)
        except ClientDisconnect:
            log.info("client %s went away while sending its request to %s", _client(scope), scope["path"])
        finally:
            if ticket is not None:
                ticket.close()
                self.admission.leave()

    def _authenticate(self, path: str, headers: Headers) -> str | None:
        """The caller's namespace (None: no keys configured, or a public path without credentials)."""
        if path == "/metrics" and self.metrics_token:
            if match_secret(self.metrics_token, presented_key(headers)) is None:
                raise UnauthorizedError("/metrics needs the metrics token (Authorization: Bearer <token>)")
            return None
        if not self.keys:
            return None
        public = (
            path in self.public
            or path.startswith(self.public_prefixes)
            or (path == "/metrics" and not self.metrics_token)
        )
        if public and not presents_credentials(headers):
            return None
        try:
            return authenticate(self.keys, headers)
        except UnauthorizedError as exc:
            exc.headers = {"WWW-Authenticate": "Bearer"}
            raise

    def _count(self, path: str, exc: TTAError) -> None:
        self.metrics.requests.labels(path, str(exc.status_code)).inc()
        self.metrics.request_errors.labels(path, exc.error_type).inc()


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class _BodyReader:
    """The `receive` the app sees: tracks whether the body has been read to its end, then (predict
    requests) watches for the client going away, which cancels the request."""

    def __init__(self, receive: Receive, *, complete: bool, watch: bool) -> None:
        self.receive = receive
        self.complete = complete  # every body byte has been handed to the app
        self.watch = watch
        self.gone = asyncio.Event()
        self.started = False  # the response has started
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._cancelled = False

    async def __call__(self) -> Message:
        if self.complete:
            if self._watcher is None:
                return await self.receive()
            await self.gone.wait()
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.gone.set()
        elif not message.get("more_body", False):
            self.complete = True
            if self.watch and self._task is not None:
                self._watcher = asyncio.ensure_future(self._watch())
        return message

    async def _watch(self) -> None:
        """After the body: wait for the client to go; cancel the request if it has not been answered."""
        while (await self.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # a server that answers with empty body messages: do not spin
        self.gone.set()
        if not self.started and self._task is not None:
            log.info("client went away before its answer: request cancelled")
            self._cancelled = True
            self._task.cancel()

    async def send(self, message: Message, send: Send) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.complete:  # the rest of the body is not read: the connection cannot be reused
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    async def run(self, app: ASGIApp, scope: Scope, send: Send) -> None:
        async def send_(message: Message) -> None:
            await self.send(message, send)

        if not self.watch:
            await app(scope, self, send_)
            return
        # In a task of its own, so that the watch can cancel it without cancelling the server's task.
        self._task = asyncio.ensure_future(app(scope, self, send_))
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._cancelled or (current is not None and current.cancelling()):
                raise  # the server cancelled us (shutdown): not the client's doing
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
