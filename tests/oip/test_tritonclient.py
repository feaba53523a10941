"""tritonclient (HTTP and gRPC), the official Open Inference Protocol clients, against the real server:
health, metadata, inference with a stream id that adapts (`version`/`steps` move, visible through /v1),
sequence_start, JSON and binary tensors, encoded images as BYTES, and errors with their statuses."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.oip.conftest import MODEL, OipServer, images, jpegs, put_policy, read_stream

PROTOCOLS = ["http", "grpc"]


def client(server: OipServer, protocol: str) -> Any:
    if protocol == "http":
        return thttp.InferenceServerClient(server.http_host)
    return tgrpc.InferenceServerClient(server.grpc_host)


def module(protocol: str) -> Any:
    return thttp if protocol == "http" else tgrpc


def params(result: Any, protocol: str) -> dict[str, Any]:
    """The response's `parameters` as plain values."""
    if protocol == "http":
        return dict(result.get_response()["parameters"])
    raw = result.get_response().parameters
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in raw.items()}


def uint8_input(protocol: str, arr: np.ndarray, binary: bool = True) -> Any:
    inp = module(protocol).InferInput("images", list(arr.shape), "UINT8")
    if protocol == "http":
        inp.set_data_from_numpy(arr, binary_data=binary)
    else:
        inp.set_data_from_numpy(arr)
    return inp


def status_of(exc: InferenceServerException, protocol: str) -> str:
    return str(exc.status())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata(oip_server: OipServer, protocol: str) -> None:
    c = client(oip_server, protocol)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready(MODEL)
    if protocol == "http":  # 404: the client says False
        assert not c.is_model_ready("no_such_model")
    else:  # NOT_FOUND, as Triton answers an unknown model
        with pytest.raises(InferenceServerException, match="unknown model"):
            c.is_model_ready("no_such_model")
    meta = c.get_model_metadata(MODEL, as_json=True) if protocol == "grpc" else c.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"images": "UINT8", "image_bytes": "BYTES"}
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert outputs["probabilities"] == "FP32" and outputs["entropy"] == "FP32"
    assert outputs["predicted_class"] == "INT64"
    server = c.get_server_metadata(as_json=True) if protocol == "grpc" else c.get_server_metadata()
    assert server["name"] == "tta-service"
    assert "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize(("protocol", "stream", "strategy"), [("http", 42, "tent"), ("grpc", 43, "norm")])
def test_stream_adapts_and_sequence_start_resets(
    oip_server: OipServer, protocol: str, stream: int, strategy: str
) -> None:
    put_policy(oip_server, str(stream), strategy)
    c = client(oip_server, protocol)
    x = images(8, seed=stream)
    seen = []
    probs = []
    for _ in range(3):
        r = c.infer(MODEL, [uint8_input(protocol, x)], sequence_id=stream)
        p = params(r, protocol)
        assert p["adapted"] is True and p["stream_id"] == str(stream) and p["strategy"] == strategy
        seen.append((p["version"], p["steps"], p["incarnation"]))
        probs.append(r.as_numpy("probabilities"))
    assert [v for v, _, _ in seen] == [1, 2, 3]
    assert [s for _, s, _ in seen] == [1, 2, 3]
    assert len({i for _, _, i in seen}) == 1
    if strategy == "tent":  # its affine parameters move: the same images get other probabilities
        assert not np.allclose(probs[0], probs[2], atol=1e-6)
    # The /v1 stream of the same id is the one that adapted.
    v1 = read_stream(oip_server, str(stream))
    assert (v1["version"], v1["steps"], v1["strategy"]) == (3, 3, strategy)
    # sequence_start: a fresh incarnation from the source state, the policy kept.
    r = c.infer(MODEL, [uint8_input(protocol, x)], sequence_id=stream, sequence_start=True)
    p = params(r, protocol)
    assert p["version"] == 1 and p["steps"] == 1 and p["incarnation"] != seen[0][2]
    if strategy == "tent":
        np.testing.assert_allclose(r.as_numpy("probabilities"), probs[0], atol=1e-5)
    assert read_stream(oip_server, str(stream))["strategy"] == strategy


def _source_v1(
    server: OipServer, stream: str, arr: np.ndarray, files: list[bytes] | None = None
) -> np.ndarray:
    """Probabilities of the top-10 (all classes) from /v1 predict on a `source` stream, adapt=false."""
    from tests.conftest import npy_bytes

    put_policy(server, stream, "source")
    url = f"{server.http_url}/v1/streams/{stream}/predict"
    q = {"adapt": "false", "top_k": "10"}
    if files is None:
        r = httpx.post(url, params=q, content=npy_bytes(arr), headers={"content-type": "application/x-npy"})
    else:
        r = httpx.post(
            url, params=q, files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(files)]
        )
    assert r.status_code == 200, r.text
    out = np.zeros((len(r.json()["predictions"]), 10), dtype=np.float32)
    for row, pred in enumerate(r.json()["predictions"]):
        for t in pred["top_k"]:
            out[row, t["index"]] = t["probability"]
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_a_stream_the_source_model_answers(oip_server: OipServer, protocol: str) -> None:
    """No stream id: the source model, nothing stored; the same answers as /v1 on a `source` stream."""
    x = images(6, seed=1)
    r = client(oip_server, protocol).infer(MODEL, [uint8_input(protocol, x)])
    p = params(r, protocol)
    assert p["adapted"] is False and p["strategy"] == "source" and "stream_id" not in p
    probs = r.as_numpy("probabilities")
    assert probs.shape == (6, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, _source_v1(oip_server, f"src-{protocol}", x), atol=1e-5)
    np.testing.assert_array_equal(r.as_numpy("predicted_class"), probs.argmax(1))
    entropy = -(probs * np.log(probs)).sum(1)
    np.testing.assert_allclose(r.as_numpy("entropy"), entropy, rtol=1e-4, atol=1e-5)
    labels = r.as_numpy("predicted_label")
    assert labels.shape == (6,) and all(isinstance(b, bytes) for b in labels)


def test_json_tensors_in_and_out_over_http(oip_server: OipServer) -> None:
    x = images(4, seed=2)
    c = thttp.InferenceServerClient(oip_server.http_host)
    outs = [
        thttp.InferRequestedOutput("probabilities", binary_data=False),
        thttp.InferRequestedOutput("top_k_indices", binary_data=True),
    ]
    r = c.infer(MODEL, [uint8_input("http", x, binary=False)], outputs=outs, parameters={"top_k": 2})
    body = r.get_response()
    assert [o["name"] for o in body["outputs"]] == ["probabilities", "top_k_indices"]  # only those asked
    assert "data" in body["outputs"][0] and "binary_data_size" in body["outputs"][1]["parameters"]
    probs, top = r.as_numpy("probabilities"), r.as_numpy("top_k_indices")
    assert top.shape == (4, 2)
    np.testing.assert_array_equal(top[:, 0], probs.argmax(1))
    # JSON in and binary in give the same answer.
    binary = c.infer(MODEL, [uint8_input("http", x, binary=True)]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, binary, atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_encoded_images_as_bytes(oip_server: OipServer, protocol: str) -> None:
    """BYTES elements are JPEG files, decoded by the server's codec like /v1 multipart uploads."""
    x = images(5, seed=3)
    files = jpegs(x)
    inp = module(protocol).InferInput("image_bytes", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    out = module(protocol).InferRequestedOutput("probabilities", class_count=3)
    r = client(oip_server, protocol).infer(
        MODEL, [inp], outputs=[out, module(protocol).InferRequestedOutput("entropy")]
    )
    classes = r.as_numpy("probabilities")  # Triton's classification extension: "score:index:label"
    assert classes.shape == (5, 3)
    expected = _source_v1(oip_server, f"src-jpeg-{protocol}", x, files)
    for row, items in enumerate(classes):
        score, index, label = items[0].decode().split(":")
        assert int(index) == int(expected[row].argmax())
        assert abs(float(score) - expected[row].max()) < 1e-4
        assert label
    assert r.as_numpy("entropy").shape == (5,)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_inputs_answer_their_status(oip_server: OipServer, protocol: str) -> None:
    c, mod = client(oip_server, protocol), module(protocol)
    x = images(2)
    codes = {
        "http": {"shape": "400", "dtype": "400", "model": "404", "name": "400", "stream": "422"},
        "grpc": {
            "shape": "StatusCode.INVALID_ARGUMENT",
            "dtype": "StatusCode.INVALID_ARGUMENT",
            "model": "StatusCode.NOT_FOUND",
            "name": "StatusCode.INVALID_ARGUMENT",
            "stream": "StatusCode.INVALID_ARGUMENT",
        },
    }[protocol]
    wrong_shape = mod.InferInput("images", [2, 32, 32], "UINT8")
    wrong_shape.set_data_from_numpy(x[..., 0])
    wrong_dtype = mod.InferInput("images", list(x.shape), "FP32")
    wrong_dtype.set_data_from_numpy(x.astype(np.float32))
    wrong_name = mod.InferInput("pixels", list(x.shape), "UINT8")
    wrong_name.set_data_from_numpy(x)
    cases = [
        ("shape", MODEL, [wrong_shape], {}),
        ("dtype", MODEL, [wrong_dtype], {}),
        ("model", "no_such_model", [uint8_input(protocol, x)], {}),
        ("name", MODEL, [wrong_name], {}),
        ("stream", MODEL, [uint8_input(protocol, x)], {"sequence_id": "bad id!"}),
    ]
    for kind, model, inputs, kwargs in cases:
        with pytest.raises(InferenceServerException) as info:
            c.infer(model, inputs, **kwargs)
        assert status_of(info.value, protocol) == codes[kind], (kind, info.value)
        assert info.value.message()
