"""Hostile and broken payloads: every one answers 4xx with a JSON `{error, error_type}` body, and the
stream's state is left exactly as it was."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import npy_bytes
from tests.reliability.conftest import NPY, batch, jpeg_bytes

MAX_BATCH = 4
MAX_BODY = 256 * 1024
STREAM = "cam-1"


@pytest.fixture(scope="module")
def client(pool):
    """One app (in-process store) with small limits, and a stream that has adapted once."""
    from fastapi.testclient import TestClient

    from tests.conftest import MODELS_YAML
    from tta_server.app import create_app
    from tta_server.settings import Settings

    settings = Settings(
        models_config=MODELS_YAML, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, log_level="WARNING"
    )
    with TestClient(create_app(settings, pool=pool), raise_server_exceptions=False) as c:
        assert c.put(f"/v1/streams/{STREAM}", json={"strategy": "tent"}).status_code == 200
        r = c.post(f"/v1/streams/{STREAM}/predict", content=npy_bytes(batch(4)), headers=NPY)
        assert r.status_code == 200 and r.json()["version"] == 1
        yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (1-bit grey) over a few bytes of zlib data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def npy_header(shape: tuple[int, ...], descr: str = "|u1", payload: bytes = b"") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload


def multipart(*files: tuple[str, bytes, str]) -> dict[str, Any]:
    return {"files": [("files", f) for f in files]}


def _bomb() -> bytes:
    return png(Image.new("1", (20000, 20000)))  # 400 M pixels in ~50 kB


class Pickled:
    """Unpickling this would create a marker file: it must never happen."""

    marker = Path("/tmp/tta-reliability-unpickled")

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Pickled(), Pickled()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int, progressive: bool = False, sof: int | None = None) -> bytes:
    """A 16x16 JPEG whose frame header claims width x height (or another frame type `sof`)."""
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=progressive)
    data = bytearray(buf.getvalue())
    at = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    if sof is not None:
        data[at + 1] = sof
    return bytes(data)


def npy_raw_header(text: str) -> bytes:
    header = text.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


JPEG = jpeg_bytes()
# name -> (request kwargs, expected status, expected error_type)
CASES: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "truncated-jpeg": (lambda: multipart(("a.jpg", JPEG[: len(JPEG) // 2], "image/jpeg")), 400, "invalid_image"),
    "jpeg-header-only": (lambda: multipart(("a.jpg", JPEG[:40], "image/jpeg")), 400, "invalid_image"),
    "random-bytes": (
        lambda: multipart(("a.jpg", np.random.default_rng(1).bytes(5000), "image/jpeg")),
        400,
        "invalid_image",
    ),
    "empty-file": (lambda: multipart(("a.png", b"", "image/png")), 400, "invalid_image"),
    "bmp-not-allowed": (
        lambda: multipart(("a.bmp", _encode(Image.new("RGB", (32, 32)), "BMP"), "image/bmp")),
        400,
        "invalid_image",
    ),
    "png-decompression-bomb": (lambda: multipart(("bomb.png", _bomb(), "image/png")), 413, "payload_too_large"),
    "png-header-claims-huge": (
        lambda: multipart(("h.png", png_with_header_size(1_000_000, 1_000_000), "image/png")),
        413,
        "payload_too_large",
    ),
    "png-over-pixel-limit": (
        lambda: multipart(("big.png", png(Image.new("1", (4097, 4097))), "image/png")),
        413,
        "payload_too_large",
    ),
    # libjpeg fills what is missing: these decoded to 16 M fabricated pixels and adapted the stream.
    "jpeg-header-claims-4000x4000": (
        lambda: multipart(("lie.jpg", jpeg_claiming(4000, 4000), "image/jpeg")), 400, "invalid_image"
    ),
    "jpeg-progressive-header-claims-4000x4000": (
        lambda: multipart(("lie.jpg", jpeg_claiming(4000, 4000, progressive=True), "image/jpeg")),
        400,
        "invalid_image",
    ),
    "jpeg-header-lie-among-good": (
        lambda: multipart(("a.jpg", JPEG, "image/jpeg"), ("lie.jpg", jpeg_claiming(1000, 800), "image/jpeg")),
        400,
        "invalid_image",
    ),
    "jpeg-arithmetic-coded-frame": (
        lambda: multipart(("a.jpg", jpeg_claiming(16, 16, sof=0xC9), "image/jpeg")), 400, "invalid_image"
    ),
    "jpeg-without-end-marker": (lambda: multipart(("a.jpg", JPEG[:-2], "image/jpeg")), 400, "invalid_image"),
    "one-bad-file-among-good": (
        lambda: multipart(("a.jpg", JPEG, "image/jpeg"), ("b.jpg", b"GIF89a....", "image/jpeg")),
        400,
        "invalid_image",
    ),
    "too-many-files": (
        lambda: multipart(*[(f"{i}.jpg", JPEG, "image/jpeg") for i in range(MAX_BATCH + 1)]),
        413,
        "payload_too_large",
    ),
    "far-too-many-files": (
        lambda: multipart(*[(f"{i}.jpg", JPEG, "image/jpeg") for i in range(MAX_BATCH + 20)]),
        400,
        "bad_request",
    ),
    "empty-multipart": (
        lambda: {"content": b"--xyz--\r\n", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
        400,
        "invalid_image",
    ),
    "multipart-without-boundary": (
        lambda: {"content": b"", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_request",
    ),
    "multipart-text-field-only": (
        lambda: {"data": {"files": "not a file"}, "files": {"other": ("a.jpg", JPEG, "image/jpeg")}},
        400,
        "invalid_image",
    ),
    "text-plain": (lambda: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "raw-jpeg-body": (lambda: {"content": JPEG, "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
    "json-body": (lambda: {"json": {"images": [[0, 1, 2]]}}, 415, "unsupported_media_type"),
    "no-content-type": (lambda: {"content": b"\x00\x01"}, 415, "unsupported_media_type"),
    "npy-not-npy": (lambda: {"content": b"just bytes", "headers": NPY}, 400, "invalid_image"),
    "npy-float32": (lambda: {"content": npy_bytes(batch(2).astype(np.float32)), "headers": NPY}, 400, "invalid_image"),
    "npy-int64": (lambda: {"content": npy_bytes(batch(2).astype(np.int64)), "headers": NPY}, 400, "invalid_image"),
    "npy-chw": (lambda: {"content": npy_bytes(batch(2).transpose(0, 3, 1, 2).copy()), "headers": NPY}, 400, "invalid_image"),
    "npy-4-channels": (
        lambda: {"content": npy_bytes(np.zeros((2, 32, 32, 4), np.uint8)), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-wrong-size": (lambda: {"content": npy_bytes(np.zeros((2, 64, 64, 3), np.uint8)), "headers": NPY}, 400, "invalid_image"),
    "npy-2d": (lambda: {"content": npy_bytes(np.zeros((32, 96), np.uint8)), "headers": NPY}, 400, "invalid_image"),
    "npy-5d": (lambda: {"content": npy_bytes(np.zeros((1, 2, 32, 32, 3), np.uint8)), "headers": NPY}, 400, "invalid_image"),
    "npy-empty-batch": (lambda: {"content": npy_bytes(np.zeros((0, 32, 32, 3), np.uint8)), "headers": NPY}, 400, "invalid_image"),
    "npy-pickled-objects": (lambda: {"content": _pickled_object_npy(), "headers": NPY}, 400, "invalid_image"),
    "npy-header-claims-petabytes": (
        lambda: {"content": npy_header((10**12, 32, 32, 3)), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-negative-dims-overflowing": (
        lambda: {"content": npy_header((-1, 10**13, 10**13), payload=b"x" * 64), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-negative-dims": (lambda: {"content": npy_header((-1, -1, 2**62)), "headers": NPY}, 400, "invalid_image"),
    "npy-truncated-data": (lambda: {"content": npy_bytes(batch(2))[:-500], "headers": NPY}, 400, "invalid_image"),
    "npy-garbage-header": (
        lambda: {"content": b"\x93NUMPY\x01\x00\x10\x00{'descr': __imp", "headers": NPY},
        400,
        "invalid_image",
    ),
    # numpy's header parser raises tokenize.TokenError on these: it was a 500.
    "npy-header-unbalanced-paren": (
        lambda: {"content": npy_raw_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, }"), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-header-unbalanced-brace": (
        lambda: {"content": npy_raw_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1,)}}"), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-header-null-bytes": (
        lambda: {"content": npy_raw_header("{'descr': '|u1', \x00 'shape': (1,)}"), "headers": NPY},
        400,
        "invalid_image",
    ),
    "npy-over-max-batch": (lambda: {"content": npy_bytes(batch(MAX_BATCH + 1)), "headers": NPY}, 413, "payload_too_large"),
    "body-over-limit": (lambda: {"content": npy_bytes(batch(100)), "headers": NPY}, 413, "payload_too_large"),
    "body-over-limit-chunked": (
        lambda: {"content": iter([npy_bytes(batch(100))[i : i + 65536] for i in range(0, 307_328, 65536)]), "headers": NPY},
        413,
        "payload_too_large",
    ),
    "multipart-over-limit": (
        lambda: multipart(("big.png", np.random.default_rng(2).bytes(MAX_BODY + 1), "image/png")),
        413,
        "payload_too_large",
    ),
    "batch-too-small-for-tent": (lambda: {"content": npy_bytes(batch(1)), "headers": NPY}, 422, "batch_too_small"),
}  # fmt: skip


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_payload_is_4xx_json_and_state_unchanged(client, case: str) -> None:
    make, status, error_type = CASES[case]
    before = client.get(f"/v1/streams/{STREAM}").json()
    r = client.post(f"/v1/streams/{STREAM}/predict", **make())
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == error_type, body
    assert r.headers["x-error-type"] == error_type
    after = client.get(f"/v1/streams/{STREAM}").json()
    assert (after["version"], after["steps"], after["samples_seen"]) == (
        before["version"],
        before["steps"],
        before["samples_seen"],
    )
    assert not Pickled.marker.exists()


def test_bad_payloads_with_adapt_false_are_refused_too(client) -> None:
    for case in ("truncated-jpeg", "npy-float32", "png-decompression-bomb"):
        make, status, _ = CASES[case]
        r = client.post(f"/v1/streams/{STREAM}/predict", params={"adapt": "false"}, **make())
        assert r.status_code == status


@pytest.mark.parametrize(
    "params", [{"top_k": "0"}, {"top_k": "abc"}, {"top_k": "100000"}, {"adapt": "maybe"}]
)
def test_bad_query_values_are_422(client, params: dict[str, Any]) -> None:
    r = client.post(f"/v1/streams/{STREAM}/predict", params=params, content=npy_bytes(batch(2)), headers=NPY)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


@pytest.mark.parametrize("stream", ["-starts-with-dash", "a" * 129, "has space", "semi;colon", "slash%2Fx"])
def test_bad_stream_ids_are_refused(client, stream: str) -> None:
    r = client.post(f"/v1/streams/{stream}/predict", content=npy_bytes(batch(2)), headers=NPY)
    assert 400 <= r.status_code < 500
    assert "error_type" in r.json()


def test_oversized_policy_body_is_refused(client) -> None:
    r = client.put(f"/v1/streams/{STREAM}", json={"strategy": "tent", "config": {"x": "y" * (MAX_BODY + 10)}})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert client.get(f"/v1/streams/{STREAM}").json()["strategy"] == "tent"


def test_oversized_chunked_policy_body_is_413(client) -> None:
    body = json.dumps({"strategy": "norm", "config": {"x": "y" * (MAX_BODY + 10)}}).encode()
    chunks = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    r = client.put(f"/v1/streams/{STREAM}", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert client.get(f"/v1/streams/{STREAM}").json()["strategy"] == "tent"


def test_chunked_body_within_the_limit_is_served(client) -> None:
    body = npy_bytes(batch(4))
    chunks = iter([body[i : i + 1000] for i in range(0, len(body), 1000)])
    r = client.post(f"/v1/streams/{STREAM}/predict", params={"adapt": "false"}, content=chunks, headers=NPY)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4


def test_extreme_aspect_ratio_is_resized_without_blowing_up(client) -> None:
    """A 1 x 4,000,000 strip is within the pixel limit: it must be served, not crash the resize."""
    before = client.get(f"/v1/streams/{STREAM}").json()["version"]
    strip = png(Image.new("1", (1, 4_000_000)))
    r = client.post(
        f"/v1/streams/{STREAM}/predict",
        **multipart(
            ("strip.png", strip, "image/png"), ("b.png", png(Image.new("RGB", (4_000, 2))), "image/png")
        ),
    )
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["predictions"]) == 2 and r.json()["version"] == before + 1
