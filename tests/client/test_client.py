"""The synchronous client against a MockTransport: request shapes and response parsing."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

import tta_client
from tta_client import Client, PredictResponse, StreamPublic

from .fakes import (
    MODEL_JSON,
    STRATEGY_JSON,
    FakeServer,
    drift_json,
    json_body,
    parse_multipart,
    predict_json,
    stream_json,
)


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    with Client("http://tta.test/", api_key="secret", timeout=7.5, transport=server.transport) as c:
        yield c


def test_set_policy_puts_policy_json_with_bearer_key(server: FakeServer, client: Client) -> None:
    server.route("PUT", "/v1/streams/cam-1", json=stream_json(config={"alpha": 0.1, "eps": 1e-5}, seed=3))

    stream = client.set_policy("cam-1", "alpha_bn", {"alpha": 0.1}, seed=3)

    request = server.last
    assert request.method == "PUT"
    assert str(request.url) == "http://tta.test/v1/streams/cam-1"
    assert request.headers["authorization"] == "Bearer secret"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"tta-client/{tta_client.__version__}"
    assert json_body(request) == {"model": None, "strategy": "alpha_bn", "config": {"alpha": 0.1}, "seed": 3}
    assert isinstance(stream, StreamPublic)
    assert stream.config == {"alpha": 0.1, "eps": 1e-5}
    assert stream.seed == 3
    assert stream.drift.bn_distance == pytest.approx(0.12)


def test_set_policy_sends_model_when_given(server: FakeServer, client: Client) -> None:
    server.route("PUT", "/v1/streams/cam-1", json=stream_json(model="r18"))
    assert client.set_policy("cam-1", "tent", model="r18").model == "r18"
    assert json_body(server.last) == {"model": "r18", "strategy": "tent", "config": {}, "seed": 0}


def test_no_authorization_header_without_api_key(server: FakeServer) -> None:
    server.route("GET", "/healthz", json={"status": "ok"})
    with Client("http://tta.test", transport=server.transport) as c:
        assert c.health() == {"status": "ok"}
    assert "authorization" not in server.last.headers


def test_timeout_is_passed_to_httpx(client: Client) -> None:
    assert client._http.timeout == httpx.Timeout(7.5)


@pytest.mark.parametrize(
    ("call", "method", "path"),
    [
        (lambda c: c.get_stream("cam-1"), "GET", "/v1/streams/cam-1"),
        (lambda c: c.reset_stream("cam-1"), "POST", "/v1/streams/cam-1/reset"),
    ],
)
def test_stream_reads_parse_stream_public(server: FakeServer, client: Client, call, method, path) -> None:
    server.route(method, path, json=stream_json(steps=9, version=11))
    stream = call(client)
    assert (server.last.method, server.last.url.path) == (method, path)
    assert (stream.steps, stream.version) == (9, 11)


def test_delete_stream_accepts_204(server: FakeServer, client: Client) -> None:
    server.route("DELETE", "/v1/streams/cam-1", status=204)
    client.delete_stream("cam-1")
    assert server.last.method == "DELETE"


def test_predict_files_sends_one_files_part_per_image(server: FakeServer, client: Client, tmp_path) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([3, 5, 7]))
    jpeg_path = tmp_path / "cat.jpg"
    jpeg_path.write_bytes(image_bytes("JPEG"))
    png_bytes = image_bytes("PNG")
    webp_bytes = image_bytes("WEBP")

    response = client.predict_files(
        "cam-1", [jpeg_path, png_bytes, io.BytesIO(webp_bytes)], adapt=False, top_k=5
    )

    request = server.last
    assert request.url.path == "/v1/streams/cam-1/predict"
    assert dict(request.url.params) == {"adapt": "false", "top_k": "5"}
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    parts = parse_multipart(request)
    assert [p[0] for p in parts] == ["files", "files", "files"]
    assert [p[2] for p in parts] == ["image/jpeg", "image/png", "image/webp"]
    assert parts[0][1] == "cat.jpg"
    assert parts[1][1] == "image-1.png"
    assert parts[0][3] == jpeg_path.read_bytes()
    assert parts[1][3] == png_bytes
    assert isinstance(response, PredictResponse)
    assert [p.top_k[0].index for p in response.predictions] == [3, 5, 7]
    assert response.predictions[0].top1.label == "class3"
    assert response.stats.used == 3


def test_predict_files_accepts_a_single_path_and_defaults(
    server: FakeServer, client: Client, tmp_path
) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([1]))
    path = tmp_path / "x.png"
    path.write_bytes(image_bytes("PNG"))
    client.predict_files("cam-1", str(path))
    assert dict(server.last.url.params) == {"adapt": "true", "top_k": "3"}
    assert [(p[0], p[1], p[2]) for p in parse_multipart(server.last)] == [("files", "x.png", "image/png")]


def test_content_type_falls_back_on_extension_then_octet_stream(
    server: FakeServer, client: Client, tmp_path
) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([1, 2]))
    odd = tmp_path / "odd.jpeg"
    odd.write_bytes(b"not really an image")
    client.predict_files("cam-1", [odd, b"unknown bytes"])
    assert [p[2] for p in parse_multipart(server.last)] == ["image/jpeg", "application/octet-stream"]


def test_predict_files_without_images_is_refused_before_sending(server: FakeServer, client: Client) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        client.predict_files("cam-1", [])
    assert server.requests == []


def test_predict_array_sends_npy_that_decodes_to_the_same_array(server: FakeServer, client: Client) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([0, 1]))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    images = images[:, ::-1]  # not contiguous: the client must still send the right values

    client.predict_array("cam-1", images, top_k=1)

    request = server.last
    assert request.headers["content-type"] == "application/x-npy"
    assert dict(request.url.params) == {"adapt": "true", "top_k": "1"}
    decoded = np.load(io.BytesIO(request.content), allow_pickle=False)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((1, 32, 32, 3), dtype=np.float32), "uint8"),
        (np.zeros((32, 32, 3), dtype=np.uint8), "NHWC"),
    ],
)
def test_predict_array_refuses_wrong_dtype_or_rank(server: FakeServer, client: Client, array, match) -> None:
    with pytest.raises(ValueError, match=match):
        client.predict_array("cam-1", array)
    assert server.requests == []


def test_listings_parse_models_strategies_and_drift(server: FakeServer, client: Client) -> None:
    server.route("GET", "/v1/models", json={"models": [MODEL_JSON]})
    server.route("GET", "/v1/strategies", json={"strategies": [STRATEGY_JSON]})
    server.route(
        "GET",
        "/v1/drift/top",
        json={
            "streams": [
                {"stream_id": "a", "model": "m", "strategy": "s", "drift": drift_json(bn_distance=0.9)}
            ]
        },
    )

    (model,) = client.models()
    (strategy,) = client.strategies()
    (top,) = client.drift_top(3)

    assert (model.id, model.input_size, model.default) == ("wrn40_2", (32, 32), True)
    assert strategy.config_schema["properties"]["alpha"] == {"type": "number"}
    assert top.drift.bn_distance == pytest.approx(0.9)
    assert dict(server.last.url.params) == {"n": "3"}


def test_unknown_response_fields_are_ignored(server: FakeServer, client: Client) -> None:
    server.route(
        "GET", "/v1/streams/cam-1", json=stream_json(future_field=1, drift=drift_json(new_metric=2.0))
    )
    stream = client.get_stream("cam-1")
    assert not hasattr(stream, "future_field")
    assert stream.drift.entropy == pytest.approx(0.5)


def test_ready_returns_the_body_of_a_503(server: FakeServer, client: Client) -> None:
    server.route("GET", "/readyz", status=503, json={"status": "starting", "models": False})
    assert client.ready() == {"status": "starting", "models": False}
    server.route("GET", "/readyz", json={"status": "ready"})
    assert client.ready()["status"] == "ready"


def test_malformed_success_body_raises_api_error(server: FakeServer, client: Client) -> None:
    server.route("GET", "/v1/streams/cam-1", json={"unexpected": True})
    with pytest.raises(tta_client.APIError) as info:
        client.get_stream("cam-1")
    assert info.value.error_type == "invalid_response"
    server.route("GET", "/healthz", content=b"<html>")
    with pytest.raises(tta_client.APIError, match="not JSON"):
        client.health()


@pytest.mark.parametrize("stream_id", ["", "-leading-dash", "has/slash", "has space", "x" * 129])
def test_invalid_stream_id_is_refused_before_sending(
    server: FakeServer, client: Client, stream_id: str
) -> None:
    with pytest.raises(ValueError, match="invalid stream id"):
        client.get_stream(stream_id)
    assert server.requests == []


def test_stream_id_with_allowed_punctuation_is_sent_verbatim(server: FakeServer, client: Client) -> None:
    server.route("GET", "/v1/streams/site.A:cam_1-b", json=stream_json("site.A:cam_1-b"))
    assert client.get_stream("site.A:cam_1-b").stream_id == "site.A:cam_1-b"


def test_connection_failure_raises_transport_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        Client("http://tta.test", transport=httpx.MockTransport(refuse)) as c,
        pytest.raises(tta_client.TransportError, match="connection refused") as info,
    ):
        c.health()
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_error_response_raises_mapped_exception(server: FakeServer, client: Client) -> None:
    server.route(
        "PUT",
        "/v1/streams/cam-1",
        status=422,
        json={"error": "unknown strategy 'nope'; valid: alpha_bn, tent", "error_type": "unknown_strategy"},
    )
    with pytest.raises(tta_client.UnknownStrategyError, match="valid: alpha_bn, tent"):
        client.set_policy("cam-1", "nope")


def test_context_manager_closes_the_connection_pool(server: FakeServer) -> None:
    with Client("http://tta.test", transport=server.transport) as c:
        pass
    assert c._http.is_closed
