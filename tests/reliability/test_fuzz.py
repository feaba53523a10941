"""Property-based fuzzing: schemathesis over every operation of the OpenAPI schema (positive and
negative generation), predict included (its document describes both bodies, multipart `files` and
application/x-npy, so schemathesis sends real images and arrays), plus Hypothesis over malformed
prediction bodies (random bytes, forged .npy headers, mutated images). The property everywhere: no 5xx.

Bounded by default (TTA_FUZZ_EXAMPLES examples per operation / property, default 12); raise it for a
long run, e.g. `TTA_FUZZ_EXAMPLES=200 pytest tests/reliability/test_fuzz.py`. With TTA_FUZZ_REPORT=FILE
the number of requests sent and the statuses seen are written there as JSON at the end.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from schemathesis.checks import not_a_server_error

from tests.conftest import MODELS_YAML, npy_bytes
from tests.reliability.conftest import jpeg_bytes
from tta_server.app import create_app
from tta_server.settings import Settings

EXAMPLES = int(os.environ.get("TTA_FUZZ_EXAMPLES", "12"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("TTA_FUZZ_RANDOM") is None,
)
SEEN: Counter[str] = Counter()


def _settings() -> Settings:
    # Small limits keep generated bodies cheap; max_batch 8 keeps predictions fast on CPU.
    return Settings(models_config=MODELS_YAML, max_batch=8, max_body_bytes=512 * 1024, log_level="ERROR")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("TTA_FUZZ_REPORT")
    if path:
        total = sum(v for k, v in SEEN.items() if k.startswith("status:"))
        with open(path, "w") as f:
            json.dump(
                {"examples_per_property": EXAMPLES, "requests": total, "counts": dict(SEEN)}, f, indent=2
            )


PREDICT_PATH = "/v1/streams/{stream_id}/predict"


def _npy_bodies() -> st.SearchStrategy[bytes]:
    """Bodies for application/x-npy: mostly well-formed uint8 batches at the model's size (so generated
    predicts get answers, not only 400s), some of other shapes, and bytes that are no array at all."""
    valid = st.builds(
        lambda n, seed: npy_bytes(
            np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        ),
        st.integers(1, 4),
        st.integers(0, 2**16),
    )
    shaped = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, max_side=8)).map(npy_bytes)
    return st.one_of(valid, valid, shaped, st.binary(max_size=256))


# schemathesis knows no generator for this media type; register one (used for every schema below).
schemathesis.openapi.media_type("application/x-npy", _npy_bodies())

# The schema is built at import from the app's own OpenAPI document (no lifespan needed for that); the
# app loads its model in the lifespan that schemathesis runs around each operation's test.
APP = create_app(_settings())
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP
schema.config.generation.update(max_examples=EXAMPLES)


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_operation_answers_5xx(case) -> None:
    response = case.call()
    SEEN[f"status:{response.status_code}"] += 1
    SEEN[f"op:{case.operation.label}"] += 1
    if case.operation.path == PREDICT_PATH and case.body is not None:
        SEEN[f"predict-body:{case.media_type}:{response.status_code}"] += 1
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and isinstance(body.get("error_type"), str), body


def test_the_schema_documents_both_predict_bodies() -> None:
    body = APP.openapi()["paths"][PREDICT_PATH]["post"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"multipart/form-data", "application/x-npy"}
    files = body["content"]["multipart/form-data"]["schema"]["properties"]["files"]
    assert files["type"] == "array" and files["items"]["format"] == "binary"


def test_generated_predict_calls_carry_both_bodies_and_get_predictions(pool) -> None:
    """schemathesis' own cases for predict (what the fuzz test above sends): they carry bodies of both
    media types, and some are real predictions (200), not only refusals."""
    from fastapi.testclient import TestClient

    app = create_app(_settings(), pool=pool)
    predict_schema = schemathesis.openapi.from_dict(app.openapi())
    predict_schema.app = app
    operation = predict_schema[PREDICT_PATH]["POST"]
    seen: Counter[tuple[str, int]] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES, 12))
    @given(case=operation.as_strategy())
    def send(case) -> None:
        response = case.call()
        assert response.status_code < 500, response.text[:300]
        if case.body is not None:
            seen[(case.media_type, response.status_code)] += 1

    with TestClient(app):  # the lifespan (engine, store) for the cases' calls
        send()
    for media in ("multipart/form-data", "application/x-npy"):
        assert sum(n for (m, _), n in seen.items() if m == media) > 0, (media, seen)
        assert seen[(media, 200)] > 0, (media, seen)
    SEEN.update({f"predict-body:{m}:{status}": n for (m, status), n in seen.items()})


# ------------------------------------------------------------------ malformed prediction bodies
@pytest.fixture(scope="module")
def client(pool):
    from fastapi.testclient import TestClient

    with TestClient(create_app(_settings(), pool=pool), raise_server_exceptions=False) as c:
        yield c


def _check(r, kind: str) -> None:
    SEEN[f"status:{r.status_code}"] += 1
    SEEN[f"body:{kind}"] += 1
    assert r.status_code < 500, (kind, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert {"error", "error_type"} <= set(r.json())


def _encoded(fmt: str, seed: int, size: tuple[int, int]) -> bytes:
    if fmt == "JPEG":
        return jpeg_bytes(seed, size[0])
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


CONTENT_TYPES = st.sampled_from(
    ["application/x-npy", "application/octet-stream", "multipart/form-data; boundary=b", "image/png", ""]
)


@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=4096), ctype=CONTENT_TYPES, prefix=st.sampled_from([b"", b"\x93NUMPY\x01\x00"])
)
def test_random_bodies_never_5xx(client, body: bytes, ctype: str, prefix: bytes) -> None:
    headers = {"content-type": ctype} if ctype else {}
    _check(client.post("/v1/streams/fz/predict", content=prefix + body, headers=headers), "random")


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int8, np.uint16, np.float32, np.float64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=40).filter(
        lambda s: int(np.prod(s)) <= 40_000
    ),
)


@FUZZ_SETTINGS
@given(arr=ARRAYS, adapt=st.booleans())
def test_random_npy_arrays_never_5xx(client, arr: np.ndarray, adapt: bool) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    r = client.post(
        "/v1/streams/fz-npy/predict",
        params={"adapt": str(adapt).lower()},
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    _check(r, "npy")


@FUZZ_SETTINGS
@given(
    shape=st.lists(st.integers(-3, 10**13), min_size=0, max_size=6),
    descr=st.sampled_from(["|u1", "<f4", "|O", "<i8", "|b1", "|V8", "<U3", "garbage"]),
    fortran=st.booleans(),
    payload=st.binary(max_size=2048),
)
def test_forged_npy_headers_never_5xx(client, shape, descr, fortran, payload) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {tuple(shape)}, }}"
    header = header.ljust(((len(header) + 10) // 64 + 1) * 64 - 10) + "\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload
    r = client.post("/v1/streams/fz/predict", content=body, headers={"content-type": "application/x-npy"})
    _check(r, "npy-header")


@FUZZ_SETTINGS
@given(
    fmt=st.sampled_from(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]),
    size=st.tuples(st.integers(1, 80), st.integers(1, 80)),
    seed=st.integers(0, 2**16),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    count=st.integers(0, 10),
)
def test_mutated_images_never_5xx(client, fmt, size, seed, flips, cut, count) -> None:
    data = bytearray(_encoded(fmt, seed, size))
    for pos, value in flips:
        data[pos % len(data)] = value
    blob = bytes(data[:cut] if cut is not None else data)
    files = [("files", (f"{i}.img", blob, "application/octet-stream")) for i in range(count)]
    r = client.post(
        "/v1/streams/fz-img/predict",
        params={"adapt": "false"},
        files=files or None,
        data=None if files else {"x": "1"},
    )
    _check(r, "image")
