"""Image uploads -> uint8 batches: torchvision decode, Pillow fallback, batched resize."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tta_server import codec
from tta_server.errors import InvalidImageError, PayloadTooLargeError

MAX_PIXELS = 10**7


def _encode(img: np.ndarray, fmt: str, mode: str = "RGB", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pillow_reference(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Pillow decode + float antialiased resize + centre crop: the pre-torchvision path."""
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    th, tw = size
    h, w = img.shape[1:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = torch.nn.functional.interpolate(img[None].float(), (nh, nw), mode="bilinear", antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[0, :, top : top + th, left : left + tw].round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Smooth random RGB images of a few sizes (JPEG-friendly content)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for h, w in [(32, 32), (48, 40), (48, 40), (120, 90), (32, 32)]:
        low = torch.randint(0, 256, (1, 3, 6, 6), generator=gen).float()
        img = torch.nn.functional.interpolate(low, (h, w), mode="bicubic").clamp(0, 255)
        out.append(img[0].permute(1, 2, 0).to(torch.uint8).numpy())
    return out


def test_same_size_jpegs_decode_exactly_like_pillow(photos: list[np.ndarray]) -> None:
    files = [_encode(p, "JPEG", quality=90) for p in photos if p.shape[:2] == (32, 32)]
    batch = codec.decode_files(files, (32, 32), MAX_PIXELS)
    expected = torch.stack([_pillow_reference(f, (32, 32)) for f in files])
    assert batch.dtype == torch.uint8 and batch.shape == (len(files), 3, 32, 32)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, expected)


def test_mixed_formats_and_sizes_keep_request_order(photos: list[np.ndarray]) -> None:
    fmts = ["JPEG", "PNG", "JPEG", "WEBP", "PNG"]
    files = [
        _encode(p, f, **({"quality": 90} if f == "JPEG" else {"lossless": True} if f == "WEBP" else {}))
        for p, f in zip(photos, fmts, strict=True)
    ]
    batch = codec.decode_files(files, (24, 24), MAX_PIXELS)
    assert batch.shape == (5, 3, 24, 24)
    for i, f in enumerate(files):
        diff = (batch[i].int() - _pillow_reference(f, (24, 24)).int()).abs()
        # The uint8 resize kernel rounds within one grey level of the float one.
        assert int(diff.max()) <= 1, (i, int(diff.max()))


def test_cmyk_and_greyscale_jpegs_decode_to_rgb(photos: list[np.ndarray]) -> None:
    files = [_encode(photos[0], "JPEG", mode="CMYK"), _encode(photos[0], "JPEG", mode="L")]
    batch = codec.decode_files(files, (32, 32), MAX_PIXELS)
    assert batch.shape == (2, 3, 32, 32)
    for i, f in enumerate(files):
        ref = _pillow_reference(f, (32, 32))
        assert float((batch[i].float() - ref.float()).abs().mean()) < 2.0


def test_one_truncated_jpeg_fails_the_request(photos: list[np.ndarray]) -> None:
    good = _encode(photos[0], "JPEG")
    with pytest.raises(InvalidImageError):
        codec.decode_files([good, good[: len(good) // 2], good], (32, 32), MAX_PIXELS)


def test_pixel_limit_is_checked_from_the_header(photos: list[np.ndarray]) -> None:
    big = _encode(photos[3], "JPEG")  # 120x90
    with pytest.raises(PayloadTooLargeError):
        codec.decode_files([big], (32, 32), max_pixels=120 * 90 - 1)


def test_extreme_aspect_ratio_is_cropped_before_resizing() -> None:
    strip = np.full((2, 4000, 3), 200, dtype=np.uint8)
    batch = codec.decode_files([_encode(strip, "PNG")], (32, 32), MAX_PIXELS)
    assert batch.shape == (1, 3, 32, 32) and int(batch.min()) == int(batch.max()) == 200


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_matches_cpu_decode(photos: list[np.ndarray]) -> None:
    files = [_encode(p, "JPEG", quality=90) for p in photos]
    gpu = codec.decode_files(files, (32, 32), MAX_PIXELS, torch.device("cuda"))
    cpu = codec.decode_files(files, (32, 32), MAX_PIXELS)
    assert gpu.device.type == "cuda"
    # nvJPEG and libjpeg-turbo may round the inverse DCT differently.
    assert float((gpu.cpu().float() - cpu.float()).abs().mean()) < 1.0


def test_npy_headers_are_parsed_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's header parser (ast.literal_eval) is not safe to run in two threads at once on CPython 3.11:
    the event loop and the decode threads parse headers under one lock."""
    real = np.lib.format.read_array_header_1_0
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def watched(fp: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal inside, overlaps
        with guard:
            inside += 1
            overlaps += inside > 1
        time.sleep(0.002)  # widen the window in which a second thread could enter
        try:
            return real(fp, *args, **kwargs)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", watched)
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 8, 8, 3), np.uint8))
    data = buf.getvalue()
    with ThreadPoolExecutor(4) as pool:
        shapes = list(pool.map(lambda _: codec.decode_npy(data, (8, 8)).shape, range(16)))
    assert shapes == [torch.Size([2, 3, 8, 8])] * 16
    assert overlaps == 0


@pytest.mark.parametrize(
    ("mode", "subsampling", "expected"),
    [("RGB", 2, True), ("RGB", 1, True), ("RGB", 0, False), ("L", 0, False)],
)
def test_chroma_subsampling_is_read_from_the_frame_header(
    photos: list[np.ndarray], mode: str, subsampling: int, expected: bool
) -> None:
    data = _encode(photos[1], "JPEG", mode=mode, quality=90, subsampling=subsampling)
    assert codec.jpeg_chroma_subsampled(data) is expected
    assert codec.jpeg_chroma_subsampled(data[:40]) is True  # unreadable header: the CPU decoder takes it


def test_only_jpegs_without_chroma_subsampling_go_to_the_device_decoder(
    photos: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG's 4:2:0 output differs from libjpeg-turbo's (docs/BENCHMARKS.md §7): the device decodes only
    4:4:4 files. The device decoder is stood in for (no GPU here); the routing is what is checked."""
    files = [
        _encode(p, "JPEG", quality=90, subsampling=s) for p, s in zip(photos, [0, 2, 0, 1, 2], strict=True)
    ]
    calls: list[tuple[list[int], str]] = []
    real = codec._decode_jpegs

    def recording(batch: list[bytes], device: torch.device) -> list[torch.Tensor] | None:
        calls.append(([files.index(f) for f in batch], device.type))
        return real(batch, torch.device("cpu"))

    monkeypatch.setattr(codec, "_decode_jpegs", recording)
    monkeypatch.setattr(
        codec, "fit_batch", lambda images, size: torch.stack([i[:, :32, :32] for i in images])
    )
    out = codec.decode_files(files, (32, 32), MAX_PIXELS, torch.device("meta"))
    assert calls == [([0, 2], "meta"), ([1, 3, 4], "cpu")]
    assert out.device.type == "meta" and out.shape == (5, 3, 32, 32)
