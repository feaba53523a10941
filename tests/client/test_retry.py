"""Client settings from the environment, and retries: which requests, after what, and how long the waits."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable

import httpx
import numpy as np
import pytest

import tta_client
from tta_client import AsyncClient, Client, Retry

from .fakes import FakeServer, error_response, parse_multipart, predict_json, stream_json

PREDICT = "/v1/streams/cam-1/predict"
STREAM = "/v1/streams/cam-1"


def scripted(server: FakeServer, method: str, path: str, *outcomes: httpx.Response | Exception) -> None:
    """Answer `method path` with `outcomes` in turn (an exception is raised as the transport's), then 200."""
    queue = list(outcomes)

    def handler(request: httpx.Request) -> httpx.Response:
        if queue:
            outcome = queue.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        body = predict_json([1]) if path.endswith("/predict") else stream_json()
        return httpx.Response(200, json=body)

    server.handle(method, path, handler)


def overloaded(retry_after: str | None = "1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return error_response(503, "overloaded", "server overloaded", headers=headers)


def client_for(server: FakeServer, **kwargs) -> Client:
    return Client("http://tta.test", transport=server.transport, **kwargs)


# ------------------------------------------------------------------ environment
def test_url_key_timeout_and_retries_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TTA_URL", "http://from-env:9000/")
    monkeypatch.setenv("TTA_API_KEY", "env-key")
    monkeypatch.setenv("TTA_TIMEOUT", "2.5")
    monkeypatch.setenv("TTA_MAX_RETRIES", "5")
    server = FakeServer()
    server.route("GET", "/healthz", json={"status": "ok"})
    with Client(transport=server.transport) as c:
        assert c.health() == {"status": "ok"}
        assert c._http.timeout == httpx.Timeout(2.5)
        assert c.retry.max_retries == 5
    assert str(server.last.url) == "http://from-env:9000/healthz"
    assert server.last.headers["authorization"] == "Bearer env-key"


def test_arguments_win_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TTA_URL", "http://from-env:9000")
    monkeypatch.setenv("TTA_API_KEY", "env-key")
    monkeypatch.setenv("TTA_TIMEOUT", "2.5")
    monkeypatch.setenv("TTA_MAX_RETRIES", "5")
    server = FakeServer()
    server.route("GET", "/healthz", json={"status": "ok"})
    with Client("http://arg:1", api_key="arg-key", timeout=None, retry=1, transport=server.transport) as c:
        c.health()
        assert c._http.timeout == httpx.Timeout(None)
        assert c.retry.max_retries == 1
    assert str(server.last.url) == "http://arg:1/healthz"
    assert server.last.headers["authorization"] == "Bearer arg-key"


def test_defaults_without_environment() -> None:
    c = Client()
    assert c.base_url == tta_client.DEFAULT_URL
    assert c.api_key is None and "Authorization" not in c.headers
    assert c._http.timeout == httpx.Timeout(tta_client.DEFAULT_TIMEOUT)
    assert c.retry == Retry()
    c.close()


@pytest.mark.parametrize(("name", "value"), [("TTA_TIMEOUT", "soon"), ("TTA_MAX_RETRIES", "1.5")])
def test_bad_environment_values_name_the_variable(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Client()


def test_the_cli_reads_tta_timeout(monkeypatch) -> None:
    from tta_client import _cli

    monkeypatch.setenv("TTA_TIMEOUT", "4")
    args = _cli.build_parser().parse_args(["models"])
    ctx = _cli._context(args, None, None)  # type: ignore[arg-type]
    assert ctx.timeout == 4.0


# ------------------------------------------------------------------ idempotent requests
@pytest.mark.parametrize(
    "failure",
    [
        overloaded(),
        error_response(503, "state_store_unavailable", "store down", headers={"Retry-After": "1"}),
        error_response(429, "rate_limited", "slow down", headers={"Retry-After": "2"}),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ConnectError("refused"),
    ],
    ids=["503-overloaded", "503-store", "429", "read-timeout", "dropped", "connect"],
)
def test_idempotent_requests_are_retried_after_any_transient_failure(failure, waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, failure, failure)
    with client_for(server) as c:
        assert c.get_stream("cam-1").stream_id == "cam-1"
    assert len(server.requests) == 3
    assert len(waits) == 2


def test_retry_after_is_honoured_with_a_little_jitter(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, overloaded("3"), overloaded("1"))
    with client_for(server) as c:
        c.get_stream("cam-1")
    assert 3.0 <= waits[0] <= 3.3 and 1.0 <= waits[1] <= 1.1


def test_without_retry_after_the_backoff_is_exponential_with_full_jitter(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, *[overloaded(None)] * 6)
    retry = Retry(max_retries=6, backoff=0.5, max_backoff=4.0, rng=random.Random(7))
    with client_for(server, retry=retry) as c:
        c.get_stream("cam-1")
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(waits) == 6
    assert all(0.0 <= w <= cap for w, cap in zip(waits, caps, strict=True)), waits
    assert len(set(waits)) == 6  # jittered, not a fixed schedule
    assert max(waits[3:]) > 0.5  # the cap grows past the base


def test_retries_stop_after_max_retries_and_raise_the_last_error(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, *[overloaded()] * 10)
    with client_for(server, retry=3) as c, pytest.raises(tta_client.OverloadedError) as info:
        c.get_stream("cam-1")
    assert len(server.requests) == 4 and len(waits) == 3
    assert info.value.retry_after == 1.0


def test_a_transport_error_after_the_last_retry_is_a_transport_error(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", "/healthz", *[httpx.ConnectError("refused")] * 5)
    with client_for(server, retry=2) as c, pytest.raises(tta_client.TransportError, match="refused"):
        c.health()
    assert len(server.requests) == 3


def test_a_long_retry_after_is_not_waited_for(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, overloaded("600"))
    with client_for(server, retry=Retry(max_retry_after=30)) as c, pytest.raises(tta_client.OverloadedError):
        c.get_stream("cam-1")
    assert len(server.requests) == 1 and waits == []


def test_retry_zero_never_retries(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "GET", STREAM, overloaded())
    with client_for(server, retry=0) as c, pytest.raises(tta_client.OverloadedError):
        c.get_stream("cam-1")
    assert len(server.requests) == 1 and waits == []


@pytest.mark.parametrize(
    "answer", [error_response(500, "internal", "bug"), error_response(422, "validation", "bad")]
)
def test_other_errors_are_not_retried(answer, waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "PUT", STREAM, answer)
    with client_for(server) as c, pytest.raises(tta_client.APIError):
        c.set_policy("cam-1", "tent")
    assert len(server.requests) == 1


# ------------------------------------------------------------------ predictions
RETRIED_FOR_ADAPTING = [
    error_response(429, "rate_limited", "slow down", headers={"Retry-After": "1"}),
    overloaded(),
    error_response(503, "deadline_exceeded", "deadline passed; nothing was computed"),
    httpx.Response(503, text="Service Unavailable"),  # uvicorn's connection limit, before the app
    httpx.ConnectError("refused"),
    httpx.ConnectTimeout("connect timed out"),
]
NOT_RETRIED_FOR_ADAPTING = [
    httpx.ReadTimeout("read timed out"),  # the server may have stepped on the batch
    httpx.RemoteProtocolError("server disconnected"),
    error_response(503, "state_store_unavailable", "a final write may have committed"),
    error_response(503, "state_store_full", "store refuses writes"),
    error_response(500, "internal", "bug"),
]


def _predict(c: Client, adapt: bool, kind: str) -> tta_client.PredictResponse:
    if kind == "files":
        return c.predict_files("cam-1", [b"\xff\xd8\xff-jpeg-bytes"], adapt=adapt)
    return c.predict_array("cam-1", np.zeros((2, 4, 4, 3), np.uint8), adapt=adapt)


@pytest.mark.parametrize("kind", ["files", "array"])
@pytest.mark.parametrize("failure", RETRIED_FOR_ADAPTING, ids=lambda f: repr(f)[:40])
def test_adapting_predicts_are_retried_when_the_server_did_not_process_them(failure, kind: str) -> None:
    server = FakeServer()
    scripted(server, "POST", PREDICT, failure)
    with client_for(server) as c:
        assert _predict(c, True, kind).predictions[0].top_k[0].index == 1
    assert len(server.requests) == 2
    first, second = server.requests
    if kind == "files":  # the same parts (a new multipart boundary each time)
        assert parse_multipart(first) == parse_multipart(second)
        assert parse_multipart(second)[0][3] == b"\xff\xd8\xff-jpeg-bytes"
    else:
        assert first.content == second.content
        assert first.headers["content-type"] == second.headers["content-type"] == "application/x-npy"


@pytest.mark.parametrize("failure", NOT_RETRIED_FOR_ADAPTING, ids=lambda f: repr(f)[:40])
def test_adapting_predicts_are_not_retried_when_the_server_may_have_stepped(failure) -> None:
    server = FakeServer()
    scripted(server, "POST", PREDICT, failure)
    with client_for(server) as c, pytest.raises(tta_client.TTAError):
        _predict(c, True, "array")
    assert len(server.requests) == 1


@pytest.mark.parametrize("failure", NOT_RETRIED_FOR_ADAPTING[:3], ids=lambda f: repr(f)[:40])
def test_non_adapting_predicts_are_idempotent_and_retried(failure) -> None:
    server = FakeServer()
    scripted(server, "POST", PREDICT, failure)
    with client_for(server) as c:
        _predict(c, False, "files")
    assert len(server.requests) == 2
    assert server.last.url.params["adapt"] == "false"


def test_a_refused_connection_to_a_real_port_is_retried(waits: list[float]) -> None:
    with socket.socket() as s:  # a free loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retry=2) as c, pytest.raises(tta_client.TransportError):
        c.predict_array("cam-1", np.zeros((1, 4, 4, 3), np.uint8))
    assert len(waits) == 2  # two retries of an adapting predict: the request never reached a server


# ------------------------------------------------------------------ async client
def test_the_async_client_retries_the_same_way(waits: list[float]) -> None:
    server = FakeServer()
    scripted(server, "POST", PREDICT, overloaded("2"), httpx.ReadTimeout("read timed out"))

    async def main(run: Callable[[AsyncClient], object]) -> object:
        async with AsyncClient("http://tta.test", transport=httpx.MockTransport(server)) as c:
            return await run(c)  # type: ignore[misc]

    with pytest.raises(tta_client.TransportError, match="read timed out"):
        asyncio.run(main(lambda c: c.predict_array("cam-1", np.zeros((1, 4, 4, 3), np.uint8))))
    assert len(server.requests) == 2 and 2.0 <= waits[0] <= 2.2
    scripted(server, "GET", STREAM, httpx.ReadTimeout("read timed out"))
    stream = asyncio.run(main(lambda c: c.get_stream("cam-1")))
    assert isinstance(stream, tta_client.StreamPublic)
