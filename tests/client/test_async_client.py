"""AsyncClient sends the same requests as Client and parses the same answers."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

import tta_client
from tta_client import AsyncClient, Client

from .fakes import (
    MODEL_JSON,
    STRATEGY_JSON,
    FakeServer,
    json_body,
    parse_multipart,
    predict_json,
    stream_json,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16

# (method name, args, kwargs, HTTP method, path, query)
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str, str, dict[str, str]]] = [
    ("set_policy", ("s1", "tent"), {"config": {"lr": 0.001}, "seed": 2}, "PUT", "/v1/streams/s1", {}),
    ("get_stream", ("s1",), {}, "GET", "/v1/streams/s1", {}),
    ("reset_stream", ("s1",), {}, "POST", "/v1/streams/s1/reset", {}),
    ("delete_stream", ("s1",), {}, "DELETE", "/v1/streams/s1", {}),
    ("predict_files", ("s1", [PNG]), {"adapt": False}, "POST", "/v1/streams/s1/predict", {"adapt": "false", "top_k": "3"}),
    ("predict_array", ("s1", np.zeros((1, 8, 8, 3), np.uint8)), {"top_k": 2}, "POST", "/v1/streams/s1/predict", {"adapt": "true", "top_k": "2"}),
    ("models", (), {}, "GET", "/v1/models", {}),
    ("strategies", (), {}, "GET", "/v1/strategies", {}),
    ("drift_top", (), {}, "GET", "/v1/drift/top", {"n": "10"}),
    ("health", (), {}, "GET", "/healthz", {}),
    ("ready", (), {}, "GET", "/readyz", {}),
]  # fmt: skip


def full_server() -> FakeServer:
    server = FakeServer()
    for method, path in [
        ("PUT", "/v1/streams/s1"),
        ("GET", "/v1/streams/s1"),
        ("POST", "/v1/streams/s1/reset"),
    ]:
        server.route(method, path, json=stream_json("s1"))
    server.route("DELETE", "/v1/streams/s1", status=204)
    server.route("POST", "/v1/streams/s1/predict", json=predict_json([4], "s1"))
    server.route("GET", "/v1/models", json={"models": [MODEL_JSON]})
    server.route("GET", "/v1/strategies", json={"strategies": [STRATEGY_JSON]})
    server.route("GET", "/v1/drift/top", json={"streams": []})
    server.route("GET", "/healthz", json={"status": "ok"})
    server.route("GET", "/readyz", json={"status": "ready"})
    return server


def run_sync(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, FakeServer]:
    server = full_server()
    with Client("http://tta.test", api_key="k", transport=server.transport) as client:
        return getattr(client, name)(*args, **kwargs), server


def run_async(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, FakeServer]:
    server = full_server()

    async def go() -> Any:
        async with AsyncClient("http://tta.test", api_key="k", transport=server.transport) as client:
            return await getattr(client, name)(*args, **kwargs)

    return asyncio.run(go()), server


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("name", "args", "kwargs", "method", "path", "query"), CALLS, ids=[c[0] for c in CALLS]
)
def test_both_clients_send_the_contract_request(
    runner: Callable[..., tuple[Any, FakeServer]], name, args, kwargs, method, path, query
) -> None:
    result, server = runner(name, args, kwargs)
    (request,) = server.requests
    assert (request.method, request.url.path, dict(request.url.params)) == (method, path, query)
    assert request.headers["authorization"] == "Bearer k"
    if name == "delete_stream":
        assert result is None
    else:
        assert result is not None


def test_async_and_sync_results_are_equal() -> None:
    for name, args, kwargs, *_ in CALLS:
        assert run_sync(name, args, kwargs)[0] == run_async(name, args, kwargs)[0], name


def test_async_request_bodies() -> None:
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    _, server = run_async("predict_array", ("s1", images), {})
    np.testing.assert_array_equal(np.load(io.BytesIO(server.last.content)), images)
    assert server.last.headers["content-type"] == "application/x-npy"

    _, server = run_async("predict_files", ("s1", [PNG, PNG]), {})
    assert [(p[0], p[2]) for p in parse_multipart(server.last)] == [("files", "image/png")] * 2

    _, server = run_async("set_policy", ("s1", "alpha_bn"), {"config": {"alpha": 0.2}, "model": "m"})
    assert json_body(server.last) == {
        "model": "m",
        "strategy": "alpha_bn",
        "config": {"alpha": 0.2},
        "seed": 0,
    }


def test_async_errors_map_like_sync() -> None:
    server = FakeServer()
    server.route(
        "GET", "/v1/streams/s1", status=404, json={"error": "no such stream", "error_type": "unknown_stream"}
    )

    async def go() -> None:
        async with AsyncClient("http://tta.test", transport=server.transport) as client:
            await client.get_stream("s1")

    with pytest.raises(tta_client.StreamNotFoundError, match="no such stream"):
        asyncio.run(go())


def test_async_connection_failure_raises_transport_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    async def go() -> None:
        async with AsyncClient(
            "http://tta.test", timeout=1.0, transport=httpx.MockTransport(refuse)
        ) as client:
            await client.health()

    with pytest.raises(tta_client.TransportError, match="timed out"):
        asyncio.run(go())


def test_async_client_closes_on_exit() -> None:
    async def go() -> AsyncClient:
        async with AsyncClient("http://tta.test", transport=FakeServer().transport) as client:
            return client

    assert asyncio.run(go())._http.is_closed
