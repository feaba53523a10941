"""The Open Inference Protocol's edges: the binary extension's framing, JSON BYTES, versions, API keys on
both transports, admission, the error mapping, the generated stubs and the server's imports."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import REPO
from tests.oip.conftest import MODEL, images, jpegs, spawn_server
from tta_server.errors import ERROR_TYPES
from tta_server.oip import core

INFER = f"/v2/models/{MODEL}/infer"


def binary_body(
    arr: np.ndarray, extra: bytes = b"", size: int | None = None, **params: object
) -> tuple[bytes, dict[str, str]]:
    raw = arr.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(raw) if size is None else size},
                }
            ],
            "parameters": params,
        }
    ).encode()
    return head + raw + extra, {"Inference-Header-Content-Length": str(len(head))}


def test_binary_tensors_and_the_answer_header(make_client) -> None:
    c = make_client()
    body, headers = binary_body(images(3), binary_data_output=True)
    r = c.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in head["outputs"]}
    assert (
        sizes["probabilities"] == 3 * 10 * 4
        and sizes["entropy"] == 3 * 4
        and sizes["predicted_class"] == 3 * 8
    )
    assert n + sum(sizes.values()) == len(r.content)
    offset = n
    for o in head["outputs"]:
        if o["name"] == "probabilities":
            probs = np.frombuffer(r.content[offset : offset + sizes[o["name"]]], dtype="<f4").reshape(3, 10)
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        offset += sizes[o["name"]]


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        ({"extra": b"x"}, 400),  # bytes that belong to no input
        ({"size": 10**6}, 400),  # binary_data_size past the body
        ({"size": 5}, 400),  # too few bytes for the declared shape
    ],
)
def test_binary_framing_errors(make_client, mutate: dict[str, object], status: int) -> None:
    body, headers = binary_body(images(2), **mutate)  # type: ignore[arg-type]
    r = make_client().post(INFER, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["error_type"] == "invalid_image"


@pytest.mark.parametrize(
    ("body", "headers", "status", "error_type"),
    [
        (b"not json", {}, 400, "invalid_image"),
        (b"{}", {}, 422, "validation"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, 422, "validation"),
        (
            b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [1]}]}',
            {},
            400,
            "invalid_image",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [300, 0, 0]}]}',
            {},
            400,
            "invalid_image",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "COMPLEX", "shape": [1], "data": [0]}]}',
            {},
            400,
            "invalid_image",
        ),
        (b'{"inputs": [], "outputs": [{"name": "nope"}]}', {}, 422, "validation"),
        (b'{"inputs": [], "parameters": {"sequence_start": 1}}', {}, 422, "validation"),
    ],
)
def test_malformed_requests(
    make_client, body: bytes, headers: dict[str, str], status: int, error_type: str
) -> None:
    r = make_client().post(INFER, content=body, headers=headers)
    assert (r.status_code, r.json()["error_type"]) == (status, error_type), r.text


def test_json_bytes_are_base64_images_and_outputs_can_be_chosen(make_client) -> None:
    files = jpegs(images(2, seed=5))
    doc = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ],
        "outputs": [{"name": "predicted_label"}, {"name": "top_k_probabilities"}],
        "parameters": {"top_k": 4},
    }
    r = make_client().post(INFER, json=doc)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert set(out) == {"predicted_label", "top_k_probabilities"}
    assert out["top_k_probabilities"]["shape"] == [2, 4] and len(out["top_k_probabilities"]["data"]) == 8
    assert all(isinstance(label, str) for label in out["predicted_label"]["data"])


def test_versions_and_stream_header(make_client) -> None:
    c = make_client()
    assert c.get(f"/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]
    assert c.get(f"/v2/models/{MODEL}/versions/7").status_code == 404
    assert c.get(f"/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True
    body, headers = binary_body(images(4))
    for version in (1, 2):
        r = c.post(
            f"/v2/models/{MODEL}/versions/1/infer", content=body, headers={**headers, "X-Stream-Id": "cam-1"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["version"] == version
    assert c.get("/v1/streams/cam-1").json()["version"] == 2
    # adapt=false: answered on the stream's state, nothing stored
    body, headers = binary_body(images(4), adapt=False)
    r = c.post(INFER, content=body, headers={**headers, "X-Stream-Id": "cam-1"})
    assert r.json()["parameters"]["adapted"] is False and r.json()["parameters"]["version"] == 2


def test_an_input_that_cannot_be_served_neither_creates_nor_restarts_a_stream(make_client) -> None:
    c = make_client()
    wrong = np.zeros((2, 28, 28, 3), np.uint8)  # the model takes 32 x 32
    body, headers = binary_body(wrong, sequence_id="fresh")
    r = c.post(INFER, content=body, headers=headers)
    assert (r.status_code, r.json()["error_type"]) == (400, "invalid_image")
    assert c.get("/v1/streams/fresh").status_code == 404
    body, headers = binary_body(images(4), sequence_id="kept")
    assert c.post(INFER, content=body, headers=headers).json()["parameters"]["version"] == 1
    body, headers = binary_body(wrong, sequence_id="kept", sequence_start=True)
    assert c.post(INFER, content=body, headers=headers).status_code == 400
    assert c.get("/v1/streams/kept").json()["version"] == 1  # not reset by the refused request


def test_infer_is_admitted_like_predict(make_client) -> None:
    """The edge middleware's queue bound covers v2 infer: with none allowed, 503 overloaded."""
    c = make_client(max_pending_requests=1)
    body, headers = binary_body(images(2))
    assert c.post(INFER, content=body, headers=headers).status_code == 200
    app = c.app
    app.state.admission.pending = 1  # as if another request were in
    try:
        r = c.post(INFER, content=body, headers=headers)
    finally:
        app.state.admission.pending = 0
    assert (r.status_code, r.json()["error_type"]) == (503, "overloaded")
    assert "retry-after" in r.headers


def test_every_error_type_has_a_grpc_status() -> None:
    assert set(core.GRPC_STATUS) == set(ERROR_TYPES)
    for name in core.GRPC_STATUS.values():
        assert grpc.StatusCode[name] is not None
    assert core.GRPC_STATUS["deadline_exceeded"] == "DEADLINE_EXCEEDED"
    assert core.GRPC_STATUS["unauthorized"] == "UNAUTHENTICATED"


def test_the_api_doc_lists_every_grpc_status() -> None:
    import re

    doc = (REPO / "docs" / "API.md").read_text()
    section = doc[doc.index("## Open Inference Protocol") :]
    documented = {}
    for types, code in re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \| `([A-Z_]+)` \|$", section, flags=re.M):
        for t in re.findall(r"`([a-z_]+)`", types):
            documented[t] = code
    assert documented == core.GRPC_STATUS


def test_api_keys_guard_both_transports(tmp_path: Path) -> None:
    """Probes need no key; infer and metadata do, over HTTP and gRPC alike (raw gRPC calls: the
    server's own stubs may not be imported in this process, see conftest)."""
    import httpx

    key = "tenant:" + "k" * 24
    with spawn_server(tmp_path / "server.log", TTA_API_KEYS=key) as server:
        assert httpx.get(server.http_url + "/v2/health/live").status_code == 200
        assert httpx.get(server.http_url + "/v2/health/ready").status_code == 200
        body, headers = binary_body(images(2))
        assert httpx.post(server.http_url + INFER, content=body, headers=headers).status_code == 401
        assert httpx.get(server.http_url + f"/v2/models/{MODEL}").status_code == 401
        ok = httpx.post(server.http_url + INFER, content=body, headers={**headers, "X-API-Key": "k" * 24})
        assert ok.status_code == 200, ok.text
        with grpc.insecure_channel(server.grpc_host) as channel:

            def call(method: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
                fn = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
                return bytes(fn(b"", metadata=metadata, timeout=30))

            assert call("ServerLive") == b"\x08\x01"  # live: true
            assert call("ServerReady") == b"\x08\x01"
            for method in ("ModelInfer", "ServerMetadata"):
                with pytest.raises(grpc.RpcError) as info:
                    call(method)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                call("ServerLive", (("authorization", "Bearer wrong-key-wrong-key"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A valid key gets past authentication: an empty infer request is a bad request.
            with pytest.raises(grpc.RpcError) as info:
                call("ModelInfer", (("x-api-key", "k" * 24),))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # model "" is no served model


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    from grpc_tools import protoc

    proto = "tta_server/oip/grpc_predict_v2.proto"
    args = [
        "protoc",
        f"-I{REPO}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(REPO / proto),
    ]
    assert protoc.main(args) == 0
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"):
        fresh = (tmp_path / "tta_server" / "oip" / name).read_text()
        assert fresh == (REPO / "tta_server" / "oip" / name).read_text(), f"{name}: run scripts/gen_oip_stubs"


def test_the_server_does_not_import_the_clients() -> None:
    code = (
        "import sys, tta_server.app, tta_server.oip.grpc_server; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tritonclient', 'kserve')); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
