"""The HTTP API through the real app (in-process store), with the real CIFAR-10 model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO, npy_bytes

NPY = {"content-type": "application/x-npy"}


def files(jpegs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(jpegs)]


def test_jpeg_predict_returns_a_prediction_per_image(make_client, cifar_jpegs) -> None:
    client = make_client()
    jpegs, labels = cifar_jpegs
    r = client.post("/v1/streams/cam-1/predict?top_k=2", files=files(jpegs[:32]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 32
    top = [p["top_k"][0]["index"] for p in body["predictions"]]
    assert np.mean(np.array(top) == labels[:32]) > 0.7  # clean data, source-level accuracy
    first = body["predictions"][0]
    assert len(first["top_k"]) == 2 and first["top_k"][0]["probability"] >= first["top_k"][1]["probability"]
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert all(p["top_k"][0]["label"] == classes[p["top_k"][0]["index"]] for p in body["predictions"])
    assert body["strategy"] == "alpha_bn" and body["adapted"] is True and body["version"] == 1


def test_raw_and_jpeg_payloads_agree(make_client, cifar_jpegs, cifar_array) -> None:
    client = make_client()
    client.put("/v1/streams/s", json={"strategy": "source"})
    a = client.post("/v1/streams/s/predict", files=files(cifar_jpegs[0][:16])).json()
    b = client.post("/v1/streams/s/predict", content=npy_bytes(cifar_array[:16]), headers=NPY).json()
    pa = [p["top_k"][0]["probability"] for p in a["predictions"]]
    pb = [p["top_k"][0]["probability"] for p in b["predictions"]]
    assert np.allclose(pa, pb, atol=1e-5)


def test_policy_lifecycle_and_stats(make_client, cifar_array) -> None:
    client = make_client()
    r = client.put("/v1/streams/p1", json={"strategy": "tent", "config": {"lr": 1e-4}})
    assert r.status_code == 200 and r.json()["config"]["lr"] == 1e-4 and r.json()["steps"] == 0
    for i in range(3):
        r = client.post(
            "/v1/streams/p1/predict", content=npy_bytes(cifar_array[i * 16 : (i + 1) * 16]), headers=NPY
        )
        assert r.json()["version"] == i + 1
    s = client.get("/v1/streams/p1").json()
    assert (s["steps"], s["updates"], s["samples_seen"], s["version"]) == (3, 3, 48, 3)
    assert s["drift"]["entropy"] is not None and len(s["drift"]["class_distribution"]) == 10
    # adapt=false predicts without touching the state
    r = client.post("/v1/streams/p1/predict?adapt=false", content=npy_bytes(cifar_array[:16]), headers=NPY)
    assert r.json()["adapted"] is False and client.get("/v1/streams/p1").json()["version"] == 3
    # reset returns to the source state (a fresh epoch with no state yet)
    assert client.post("/v1/streams/p1/reset").json()["steps"] == 0
    # the same policy again is a no-op; a changed one resets
    client.post("/v1/streams/p1/predict", content=npy_bytes(cifar_array[:16]), headers=NPY)
    assert (
        client.put("/v1/streams/p1", json={"strategy": "tent", "config": {"lr": 1e-4}}).json()["steps"] == 1
    )
    assert client.put("/v1/streams/p1", json={"strategy": "norm"}).json()["steps"] == 0
    assert client.delete("/v1/streams/p1").status_code == 204
    assert client.get("/v1/streams/p1").status_code == 404


def test_a_composite_policy_has_one_config_per_part(make_client, cifar_array) -> None:
    client = make_client()
    policy = {"strategy": "unmix_tns+tent", "config": {"unmix_tns": {"k": 4}, "tent": {"lr": 1e-4}}}
    config = client.put("/v1/streams/u", json=policy).json()["config"]
    assert set(config) == {"unmix_tns", "tent"}
    assert (config["unmix_tns"]["k"], config["unmix_tns"]["tau"], config["tent"]["lr"]) == (4, 0.07, 1e-4)
    r = client.post("/v1/streams/u/predict", content=npy_bytes(cifar_array[:8]), headers=NPY)
    assert r.status_code == 200 and r.json()["adapted"] is True
    assert client.get("/v1/streams/u").json()["config"] == config


def test_unknown_strategy_lists_valid_names(make_client) -> None:
    r = make_client().put("/v1/streams/x", json={"strategy": "nope"})
    assert r.status_code == 422
    body = r.json()
    assert (
        body["error_type"] == "unknown_strategy" and "tent" in body["error"] and "unmix_tns" in body["error"]
    )


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"strategy": "tent", "config": {"lr": -1}}, "lr"),
        ({"strategy": "unmix_tns", "config": {"kk": 3}}, "kk"),
        ({"strategy": "unmix_tns+tent", "config": {"k": 4}}, "k"),  # a composite nests per part
        ({"strategy": "unmix_tns+tent", "config": {"unmix_tns": {"k": 0}}}, "k"),
    ],
)
def test_bad_config_is_422_listing_the_field(make_client, policy, field) -> None:
    r = make_client().put("/v1/streams/x", json=policy)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"])


def test_unknown_model_and_stream(make_client) -> None:
    client = make_client()
    r = client.put("/v1/streams/x", json={"strategy": "norm", "model": "imagenet"})
    assert (
        r.status_code == 422
        and r.json()["error_type"] == "unknown_model"
        and "cifar10_wrn40_2" in r.json()["error"]
    )
    for method, path in [
        ("get", "/v1/streams/ghost"),
        ("post", "/v1/streams/ghost/reset"),
        ("delete", "/v1/streams/ghost"),
    ]:
        r = getattr(client, method)(path)
        assert r.status_code == 404 and r.json()["error_type"] == "unknown_stream"


@pytest.mark.parametrize(
    ("content", "headers", "status", "error_type"),
    [
        (b"not an image", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (b"\x93NUMPYgarbage", NPY, 400, "invalid_image"),
        (npy_bytes(np.zeros((2, 32, 32, 3), np.float32)), NPY, 400, "invalid_image"),
        (npy_bytes(np.zeros((2, 28, 28, 3), np.uint8)), NPY, 400, "invalid_image"),
        (npy_bytes(np.zeros((0, 32, 32, 3), np.uint8)), NPY, 400, "invalid_image"),
    ],
)
def test_bad_payloads_are_4xx_and_leave_state_alone(
    make_client, cifar_array, content, headers, status, error_type
) -> None:
    client = make_client()
    client.post("/v1/streams/b/predict", content=npy_bytes(cifar_array[:8]), headers=NPY)
    r = client.post("/v1/streams/b/predict", content=content, headers=headers)
    assert r.status_code == status and r.json()["error_type"] == error_type
    assert client.get("/v1/streams/b").json()["version"] == 1


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"not an image", {"content-type": "text/plain"}, 415),
        (b"\x93NUMPYgarbage", NPY, 400),
        (npy_bytes(np.zeros((2, 32, 32, 3), np.float32)), NPY, 400),
        (npy_bytes(np.zeros((2, 32, 32), np.uint8)), NPY, 400),
        (npy_bytes(np.zeros((9, 32, 32, 3), np.uint8)), NPY, 413),
        (
            b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
            {"content-type": "multipart/form-data; boundary=b"},
            400,
        ),
    ],
)
def test_a_body_that_cannot_be_read_creates_no_stream(make_client, content, headers, status) -> None:
    """The body is framed and its headers read before the stream is looked up: refused, it leaves nothing."""
    client = make_client(max_batch=8)
    r = client.post("/v1/streams/never/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert client.get("/v1/streams/never").status_code == 404


def test_corrupt_jpeg_is_400(make_client, cifar_jpegs) -> None:
    truncated = cifar_jpegs[0][0][: len(cifar_jpegs[0][0]) // 3]
    r = make_client().post("/v1/streams/c/predict", files=files([b"GIF89a....", truncated]))
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_image"


def test_limits_are_413(make_client, cifar_array) -> None:
    client = make_client(max_batch=4, max_body_bytes=64 * 1024)
    r = client.post("/v1/streams/l/predict", content=npy_bytes(cifar_array[:5]), headers=NPY)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    r = client.post(
        "/v1/streams/l/predict", content=npy_bytes(np.zeros((100, 32, 32, 3), np.uint8)), headers=NPY
    )
    assert r.status_code == 413


def test_batch_too_small_for_gradient_strategy(make_client, cifar_array) -> None:
    client = make_client()
    client.put("/v1/streams/t", json={"strategy": "tent"})
    r = client.post("/v1/streams/t/predict", content=npy_bytes(cifar_array[:1]), headers=NPY)
    assert r.status_code == 422 and r.json()["error_type"] == "batch_too_small"
    r = client.post("/v1/streams/t/predict?adapt=false", content=npy_bytes(cifar_array[:1]), headers=NPY)
    assert r.status_code == 200 and r.json()["adapted"] is False


def test_discovery_endpoints(make_client) -> None:
    client = make_client()
    listing = client.get("/v1/strategies").json()
    strategies = listing["strategies"]
    assert (REPO / listing["guide"]).is_file()
    names = {s["name"] for s in strategies}
    assert {"source", "norm", "alpha_bn", "unmix_tns", "tent", "eata", "sar", "unmix_tns+tent"} <= names
    tent = next(s for s in strategies if s["name"] == "tent")
    assert tent["needs_grad"] and "lr" in tent["config_schema"]["properties"]
    composite = next(s for s in strategies if s["name"] == "unmix_tns+tent")
    assert set(composite["config_schema"]["properties"]) == {"unmix_tns", "tent"}
    models = client.get("/v1/models").json()["models"]
    assert (
        models[0]["id"] == "cifar10_wrn40_2"
        and models[0]["default"]
        and models[0]["classes"][0] == "airplane"
    )
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert "/v1/streams/{stream_id}/predict" in client.get("/openapi.json").json()["paths"]


def test_metrics_expose_request_and_drift_series(make_client, cifar_array) -> None:
    client = make_client()
    client.put("/v1/streams/m", json={"strategy": "eta"})
    client.post("/v1/streams/m/predict", content=npy_bytes(cifar_array[:32]), headers=NPY)
    client.post("/v1/streams/m/predict", content=b"x", headers={"content-type": "text/plain"})
    text = client.get("/metrics").text
    assert 'tta_requests_total{route="/v1/streams/{stream_id}/predict",status="200"} 1.0' in text
    assert (
        'tta_request_errors_total{error_type="unsupported_media_type",route="/v1/streams/{stream_id}/predict"} 1.0'
        in text
    )
    assert 'tta_samples_total{model="cifar10_wrn40_2",strategy="eta"} 32.0' in text
    assert 'tta_bn_distance_count{model="cifar10_wrn40_2",strategy="eta"} 1.0' in text
    assert "stream" not in {
        lbl for line in text.splitlines() if line.startswith("tta_") for lbl in [line.split("{")[0]]
    }


def test_drift_top_orders_by_bn_distance(make_client, cifar_array) -> None:
    client = make_client()
    rng = np.random.default_rng(0)
    noisy = np.clip(
        cifar_array[:32].astype(np.int16) + rng.normal(0, 40, cifar_array[:32].shape), 0, 255
    ).astype(np.uint8)
    client.put("/v1/streams/clean", json={"strategy": "source"})
    client.put("/v1/streams/noisy", json={"strategy": "source"})
    client.post("/v1/streams/clean/predict", content=npy_bytes(cifar_array[:32]), headers=NPY)
    client.post("/v1/streams/noisy/predict", content=npy_bytes(noisy), headers=NPY)
    top = client.get("/v1/drift/top?n=2").json()["streams"]
    assert [s["stream_id"] for s in top] == ["noisy", "clean"]
    assert top[0]["drift"]["bn_distance"] > top[1]["drift"]["bn_distance"]
