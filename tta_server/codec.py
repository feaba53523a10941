"""Request payloads -> uint8 NCHW batches, with dtype, shape and size limits.

Images are sniffed and their dimensions checked from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tta_server.errors import InvalidImageError, PayloadTooLargeError

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP"}
NPY_MAGIC = b"\x93NUMPY"


def decode_image_bytes(data: bytes, max_pixels: int) -> torch.Tensor:
    """One JPEG/PNG/WebP file -> uint8 tensor (3, H, W)."""
    if not data:
        raise InvalidImageError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Only the header has been read so far: check format and size before decoding pixels.
            fmt, (w, h) = img.format, img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidImageError(f"unsupported image format {fmt}; send JPEG, PNG or WebP")
            if w * h > max_pixels:
                raise PayloadTooLargeError(
                    f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels"
                )
            pixels = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"not a decodable image (JPEG, PNG or WebP expected): {exc}") from exc
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_files(files: Sequence[bytes], size: tuple[int, int], max_pixels: int) -> torch.Tensor:
    """Several image files -> uint8 (N, 3, H, W) at the model's input size."""
    images = [fit_to_size(decode_image_bytes(data, max_pixels), size) for data in files]
    # Same channels-last layout as the raw .npy path (NHWC memory): convolutions run faster on it.
    return torch.stack(images).contiguous(memory_format=torch.channels_last)


def fit_to_size(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (antialiased) and centre-crop to the model's input size; a no-op when it already fits."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    th, tw = size
    h, w = img.shape[1:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if nh * nw > 4 * th * tw:
        # Extreme aspect ratio (say a 1x4,000,000 strip): crop the part that survives the centre crop
        # first, or the float intermediate of the resize would need tens of gigabytes.
        ch, cw = min(h, math.ceil(th / scale)), min(w, math.ceil(tw / scale))
        img = img[:, (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        h, w = ch, cw
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    resized = F.interpolate(
        img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (nh - th) // 2, (nw - tw) // 2
    return resized[0, :, top : top + th, left : left + tw].round().clamp(0, 255).to(torch.uint8)


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


def to_model_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1] (normalisation, if any, is inside the model)."""
    return batch_u8.float().div_(255.0)
