"""Request payloads -> uint8 NCHW batches, with dtype, shape and size limits.

Images are sniffed and their dimensions checked from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it; `scan_files` and `npy_shape` read those headers
alone, so the caller can charge the decoded pixels to a budget before anything is decoded. Every parse
failure of an upload is an `InvalidImageError` (400), never a 500.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import InterpolationMode, resize

from tta_server.errors import InvalidImageError, PayloadTooLargeError, TTAError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which needs FFmpeg libraries on
# the host. The pinned torchvision still ships them (libjpeg-turbo, nvJPEG); revisit on an upgrade.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP"}
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says: format and size (the pixels it will decode to)."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@contextlib.contextmanager
def _open_image(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's view of one image file, after checking format and size from its header alone.

    Whatever Pillow raises on a malformed file, in the header or while decoding the pixels inside the
    block, becomes a 400 (a 413 for a decompression bomb); our own errors pass through.
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
            if fmt == "JPEG":
                check_jpeg_scans(data)
            yield img
    except (TTAError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, struct.error, ... from plugins
        raise InvalidImageError(f"not a decodable image (JPEG, PNG or WebP expected): {exc}") from exc


def image_info(data: bytes, max_pixels: int) -> ImageInfo:
    """Format and size of one image file, from its header alone; refuses what we won't decode."""
    with _open_image(data, max_pixels) as img:
        return ImageInfo(str(img.format), img.size[0], img.size[1])


def scan_files(files: Sequence[bytes], max_pixels: int) -> list[ImageInfo]:
    """`image_info` of every file, in order: no pixel is decoded."""
    return [image_info(data, max_pixels) for data in files]


def check_image_header(data: bytes, max_pixels: int) -> str:
    """Format ("JPEG", "PNG" or "WEBP") of one image file, from its header alone; refuses what we won't decode."""
    return image_info(data, max_pixels).format


# Start-of-frame markers libjpeg decodes with Huffman coding: baseline, extended sequential, progressive.
_SOF_HUFFMAN = {0xC0: False, 0xC1: False, 0xC2: True}
# Lossless, hierarchical and arithmetic-coded frames.
_SOF_OTHER = {0xC3, *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG whose scans cannot hold the image its frame header declares.

    libjpeg does not fail on entropy-coded data that ends early: it warns, fills the missing blocks
    with zeros and hands back an image of the declared size (a 4000x4000 header over the data of
    16x16 pixels decodes to 16 M fabricated pixels). Every 8x8 block of a Huffman-coded scan costs at
    least one bit per Huffman symbol: two (DC and AC) in a sequential scan, one in a progressive DC
    scan. So each scan's data must be at least as long as the blocks it covers need, every component
    must be covered, and the file must reach its end-of-image marker. Arithmetic-coded, lossless and
    hierarchical JPEGs (rare, and where no such bound holds) are refused. A header that lies by less than
    that bound still decodes with filled blocks: this catches the amplification, not every truncation.
    """
    if data[:2] != b"\xff\xd8":
        raise InvalidImageError("JPEG without a start-of-image marker")
    frame: _Frame | None = None
    covered: set[int] = set()
    for marker, seg, scan_bytes in _jpeg_segments(data):
        if marker in _SOF_OTHER:
            raise InvalidImageError("arithmetic-coded, lossless and hierarchical JPEGs are not accepted")
        if marker in _SOF_HUFFMAN:
            if frame is not None:
                raise InvalidImageError("JPEG with more than one frame header")
            frame = _parse_frame(seg, _SOF_HUFFMAN[marker])
        elif marker == 0xDA:
            if frame is None:
                raise InvalidImageError("JPEG scan before its frame header")
            ids, need_bits = _scan_cost(seg, frame)
            if scan_bytes * 8 < need_bits:
                raise InvalidImageError(
                    f"JPEG scan data of {scan_bytes} bytes is too short for the declared "
                    f"{frame[1]}x{frame[2]} image: truncated, or a forged header"
                )
            if need_bits:
                covered |= ids
    if frame is None:
        raise InvalidImageError("JPEG without a frame header")
    if not set(frame[3]) <= covered:
        raise InvalidImageError("incomplete JPEG: a component has no scan with its DC coefficients")


# (progressive, width, height, {component id: (blocks wide, blocks high)})
_Frame = tuple[bool, int, int, dict[int, tuple[int, int]]]


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(marker, payload, bytes of entropy-coded data after it) of each segment up to end-of-image."""
    n, pos = len(data), 2
    while True:
        if pos + 2 > n:
            raise InvalidImageError("truncated JPEG: no end-of-image marker")
        if data[pos] != 0xFF:
            raise InvalidImageError(f"corrupt JPEG: marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image
            return
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte, standalone markers
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        seg = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            raise InvalidImageError("truncated JPEG segment")
        pos += 2 + length
        scan_bytes = 0
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            end = _scan_end(data, pos)
            scan_bytes, pos = end - pos, end
        yield marker, seg, scan_bytes


def _parse_frame(seg: bytes, progressive: bool) -> _Frame:
    """SOF segment -> (progressive, width, height, {component id: (blocks wide, blocks high)})."""
    if len(seg) < 6:
        raise InvalidImageError("truncated JPEG frame header")
    height, width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
    if width == 0 or height == 0:
        raise InvalidImageError("corrupt JPEG frame header")
    sampling = _sampling_factors(seg)
    hmax = max(h for h, _ in sampling.values())
    vmax = max(v for _, v in sampling.values())
    if min(min(h, v) for h, v in sampling.values()) < 1:
        raise InvalidImageError("corrupt JPEG sampling factors")
    blocks = {
        cid: (math.ceil(math.ceil(width * h / hmax) / 8), math.ceil(math.ceil(height * v / vmax) / 8))
        for cid, (h, v) in sampling.items()
    }
    return progressive, width, height, blocks


def _sampling_factors(seg: bytes) -> dict[int, tuple[int, int]]:
    """SOF segment -> {component id: (horizontal, vertical) sampling factor}."""
    ncomp = seg[5] if len(seg) > 5 else 0
    if ncomp == 0 or len(seg) < 6 + 3 * ncomp:
        raise InvalidImageError("corrupt JPEG frame header")
    return {seg[6 + 3 * i]: (seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(ncomp)}


def _scan_cost(seg: bytes, frame: _Frame) -> tuple[set[int], int]:
    """SOS segment -> (its component ids, the fewest bits its entropy-coded data can take)."""
    progressive, _, _, blocks = frame
    if not seg or len(seg) < 1 + 2 * seg[0] + 3:
        raise InvalidImageError("truncated JPEG scan header")
    ids = {seg[1 + 2 * i] for i in range(seg[0])}
    if not ids <= set(blocks):
        raise InvalidImageError("JPEG scan names a component the frame does not have")
    ss, ah = seg[1 + 2 * seg[0]], seg[3 + 2 * seg[0]] >> 4
    if progressive and not (ss == 0 and ah == 0):
        return ids, 0  # AC bands and refinements: an end-of-band run may cover 32767 blocks in one symbol
    per_block = 1 if progressive else 2
    return ids, per_block * sum(blocks[c][0] * blocks[c][1] for c in ids)


def _scan_end(data: bytes, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at `pos` (len(data) if none)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        nxt = data[pos + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed byte, restart marker
            pos += 2
        elif nxt == 0xFF:  # fill bytes before a marker
            pos += 1
        else:
            return pos


def jpeg_chroma_subsampled(data: bytes) -> bool:
    """Whether a JPEG's frame header gives its colour components coarser sampling than its luma (4:2:0,
    4:2:2, ...). A grey JPEG is not subsampled; a file whose header cannot be read counts as subsampled
    (the CPU decoder, which reports errors best, takes it)."""
    try:
        for marker, seg, _ in _jpeg_segments(data):
            if marker in _SOF_HUFFMAN or marker in _SOF_OTHER:
                return len(set(_sampling_factors(seg).values())) != 1
            if marker == 0xDA:
                break
    except InvalidImageError:
        pass
    return True


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
    files: Sequence[bytes],
    size: tuple[int, int],
    max_pixels: int,
    device: torch.device | None = None,
    infos: Sequence[ImageInfo] | None = None,
) -> torch.Tensor:
    """Several image files -> uint8 (N, 3, H, W) at the model's input size, on `device` (default CPU).

    Every header is checked first (or was: `infos` from `scan_files`). JPEGs are decoded together by
    torchvision (on the GPU when `device` is CUDA, for JPEGs without chroma subsampling), other formats
    and any JPEG torchvision refuses by Pillow; then images of one size are resized as one batch.
    """
    device = device or torch.device("cpu")
    formats = (
        [i.format for i in infos] if infos is not None else [check_image_header(d, max_pixels) for d in files]
    )
    images: list[torch.Tensor | None] = [None] * len(files)
    jpeg_idx = [i for i, fmt in enumerate(formats) if fmt == "JPEG"]
    host = torch.device("cpu")
    if device.type == "cpu":
        groups = [(jpeg_idx, device)]
    else:
        # nvJPEG upsamples subsampled chroma differently from libjpeg-turbo (Pillow's decoder, which the
        # models were trained on): on an H200, 4:2:0 CIFAR-size JPEGs came out 8.6 grey levels apart on
        # average (docs/BENCHMARKS.md §7). Only JPEGs without chroma subsampling go to the device decoder.
        full = [i for i in jpeg_idx if not jpeg_chroma_subsampled(files[i])]
        groups = [(full, device), (sorted(set(jpeg_idx) - set(full)), host)]
    for idx, where in groups:
        decoded = _decode_jpegs([files[i] for i in idx], where) if idx else None
        if decoded is None and idx and where.type != "cpu":
            # The device decoder refused a file (say an unusual sampling): try the CPU decoder.
            decoded = _decode_jpegs([files[i] for i in idx], host)
        if decoded is not None:
            for i, img in zip(idx, decoded, strict=True):
                images[i] = img.to(device)
    for i, found in enumerate(images):
        if found is None:
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


# numpy parses .npy headers with `ast.literal_eval`, and CPython 3.11 keeps the AST constructor's recursion
# depth in per-interpreter state: two threads parsing at once (the event loop and a decode thread) can fail
# with "SystemError: AST constructor recursion depth mismatch", seen under load. One parse at a time
# (a header is a few hundred bytes), and each upload's header is parsed once.
_NPY_HEADER_LOCK = threading.Lock()


def npy_header(data: bytes) -> tuple[tuple[int, ...], int, bool]:
    """(shape, offset of the array data, Fortran order) of an `np.save` uint8 array, from its header
    alone, checked against the body's length.

    A 100-byte body can claim petabytes, and a forged header can make numpy's header parser raise
    anything (ValueError, SyntaxError, tokenize.TokenError, ...): each is a 400 here.
    """
    if not data.startswith(NPY_MAGIC):
        raise InvalidImageError("body is not a .npy array (missing NumPy magic)")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        with _NPY_HEADER_LOCK:
            shape, fortran, dtype = read_header(fp)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(f"unreadable .npy header: {type(exc).__name__}: {exc}") from exc
    if dtype != np.uint8:
        raise InvalidImageError(f"array dtype must be uint8, got {dtype}")
    if any(d < 0 for d in shape) or math.prod(shape) > len(data) - fp.tell():
        raise InvalidImageError(f"declared shape {tuple(shape)} does not match the array data")
    return tuple(int(d) for d in shape), fp.tell(), bool(fortran)


def npy_shape(data: bytes) -> tuple[int, ...]:
    """Shape of an `np.save` uint8 array (`npy_header`)."""
    return npy_header(data)[0]


def npy_images(shape: tuple[int, ...]) -> tuple[int, int]:
    """(images, decoded pixels) of a .npy upload's shape; (N, H, W, 3) or (H, W, 3) else 400."""
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidImageError(f"array shape must be (N, H, W, 3), got {shape}")
    return shape[0], shape[0] * shape[1] * shape[2]


def decode_npy(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """An `np.save` uint8 array, (N, H, W, 3) or (H, W, 3) -> uint8 (N, 3, H, W). Never unpickles."""
    # The header first, before anything allocates what it declares; the data is then read in place.
    shape, offset, fortran = npy_header(data)
    flat = np.frombuffer(data, dtype=np.uint8, count=math.prod(shape), offset=offset)
    arr = flat.reshape(shape, order="F" if fortran else "C")
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
    # A copy: `data` is immutable, and the tensor must own memory that outlives the request body.
    return torch.from_numpy(np.array(arr, order="C")).permute(0, 3, 1, 2)
