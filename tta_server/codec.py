"""Request payloads -> uint8 NCHW batches, with dtype, shape and size limits.

Images are sniffed and their dimensions checked from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import InterpolationMode, resize

from tta_server.errors import InvalidImageError, PayloadTooLargeError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which needs FFmpeg libraries on
# the host. The pinned torchvision still ships them (libjpeg-turbo, nvJPEG); revisit on an upgrade.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP"}
NPY_MAGIC = b"\x93NUMPY"


@contextlib.contextmanager
def _open_image(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's view of one image file, after checking format and size from its header alone.

    Pillow errors, in the header or while decoding the pixels inside the block, become 400/413 errors.
    """
    if not data:
        raise InvalidImageError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidImageError(f"unsupported image format {fmt}; send JPEG, PNG or WebP")
            if w * h > max_pixels:
                raise PayloadTooLargeError(
                    f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels"
                )
            yield img
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"not a decodable image (JPEG, PNG or WebP expected): {exc}") from exc


def check_image_header(data: bytes, max_pixels: int) -> str:
    """Format ("JPEG", "PNG" or "WEBP") of one image file, from its header alone; refuses what we won't decode."""
    with _open_image(data, max_pixels) as img:
        return str(img.format)


def decode_image_bytes(data: bytes, max_pixels: int) -> torch.Tensor:
    """One JPEG/PNG/WebP file -> uint8 tensor (3, H, W), decoded by Pillow (the reference decoder)."""
    with _open_image(data, max_pixels) as img:
        pixels = np.asarray(img.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _decode_jpegs(files: Sequence[bytes], device: torch.device) -> list[torch.Tensor] | None:
    """Batched libjpeg-turbo (CPU) or nvJPEG (CUDA) decode; None when torchvision refuses any file."""
    try:
        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        return None  # e.g. CMYK or unusual sampling: Pillow handles these
    return list(out)


def decode_files(
    files: Sequence[bytes], size: tuple[int, int], max_pixels: int, device: torch.device | None = None
) -> torch.Tensor:
    """Several image files -> uint8 (N, 3, H, W) at the model's input size, on `device` (default CPU).

    Every header is checked first. JPEGs are decoded together by torchvision (on the GPU when `device`
    is CUDA), other formats and any JPEG torchvision refuses by Pillow; then images of one size are
    resized as one batch.
    """
    device = device or torch.device("cpu")
    formats = [check_image_header(data, max_pixels) for data in files]
    images: list[torch.Tensor | None] = [None] * len(files)
    jpeg_idx = [i for i, fmt in enumerate(formats) if fmt == "JPEG"]
    jpegs = [files[i] for i in jpeg_idx]
    decoded = _decode_jpegs(jpegs, device) if jpegs else None
    if decoded is None and jpegs and device.type != "cpu":
        # The device decoder refused a file (say nvJPEG and an unusual sampling): try the CPU decoder.
        on_host = _decode_jpegs(jpegs, torch.device("cpu"))
        decoded = None if on_host is None else [img.to(device) for img in on_host]
    if decoded is not None:
        for i, img in zip(jpeg_idx, decoded, strict=True):
            images[i] = img
    for i, img in enumerate(images):
        if img is None:
            images[i] = decode_image_bytes(files[i], max_pixels).to(device)
    batch = fit_batch([img for img in images if img is not None], size)
    # Same channels-last layout as the raw .npy path (NHWC memory): convolutions run faster on it.
    return batch.contiguous(memory_format=torch.channels_last)


def fit_batch(images: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Images of any sizes -> one (N, 3, H, W) batch at `size`; images that share a size resize together."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((img.shape[1], img.shape[2]), []).append(i)
    for idx in groups.values():
        fitted = fit_to_size(torch.stack([images[i] for i in idx]), size)
        for i, img in zip(idx, fitted, strict=True):
            out[i] = img
    return torch.stack([img for img in out if img is not None])


def fit_to_size(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (antialiased) and centre-crop (..., 3, H, W) uint8 images to the model's input size.

    A no-op when they already fit.
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    th, tw = size
    h, w = img.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if nh * nw > 4 * th * tw:
        # Extreme aspect ratio (say a 1x4,000,000 strip): crop the part that survives the centre crop
        # first, or the float intermediate of the resize would need tens of gigabytes.
        ch, cw = min(h, math.ceil(th / scale)), min(w, math.ceil(tw / scale))
        img = img[..., (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        h, w = ch, cw
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    # torchvision's uint8 kernel: same bilinear antialiased filter as a float interpolate (within one
    # grey level), several times faster on CPU.
    resized = resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return resized[..., top : top + th, left : left + tw]


def decode_npy(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """An `np.save` uint8 array, (N, H, W, 3) or (H, W, 3) -> uint8 (N, 3, H, W). Never unpickles."""
    if not data.startswith(NPY_MAGIC):
        raise InvalidImageError("body is not a .npy array (missing NumPy magic)")
    try:
        # Check the header before np.load allocates what it declares (a 100-byte body can claim petabytes).
        fp = io.BytesIO(data)
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(fp)
        if dtype != np.uint8:
            raise InvalidImageError(f"array dtype must be uint8, got {dtype}")
        if any(d < 0 for d in shape) or math.prod(shape) > len(data) - fp.tell():
            raise InvalidImageError(f"declared shape {tuple(shape)} does not match the array data")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidImageError(f"unreadable .npy array: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidImageError(f"array shape must be (N, H, W, 3), got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidImageError("empty batch")
    if tuple(arr.shape[1:3]) != tuple(size):
        raise InvalidImageError(
            f"images must be {size[0]}x{size[1]} for this model, got {arr.shape[1]}x{arr.shape[2]}"
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
