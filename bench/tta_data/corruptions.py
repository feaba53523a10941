"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), deterministic for a seed.

Parameters are the CIFAR-10-C ones (``make_cifar_c.py``; they differ from ImageNet-C). Every corruption maps
a 32x32x3 uint8 RGB image to a uint8 image of the same shape. Randomness only comes from an explicit
``np.random.Generator``; :func:`corrupt` derives one generator per image from ``(seed, name, severity,
image id)``, so a result never depends on how a batch is chunked. Deviations from the original generator
script are listed in ``docs/CORRUPTIONS.md``.

scipy, scikit-image and Pillow are imported inside the functions so that ``import tta_data`` loads numpy
only.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from scipy.sparse import csr_array

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "STOCHASTIC_CORRUPTIONS",
    "brightness",
    "contrast",
    "corrupt",
    "corruption_rng",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_noise",
    "get_corruption",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "shot_noise",
    "snow",
    "zoom_blur",
]

UInt8Images = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.floating]
#: Single-image corruption: ``(image HxWx3 uint8, severity 1-5, rng) -> image``.
CorruptionFn = Callable[[UInt8Images, int, np.random.Generator], UInt8Images]
_BatchFn = Callable[[UInt8Images, int, Sequence[np.random.Generator]], UInt8Images]

#: Canonical CIFAR-10-C order (the order every benchmark table uses).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Corruptions whose output depends on the random generator (the others ignore it).
STOCHASTIC_CORRUPTIONS: frozenset[str] = frozenset(
    {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "glass_blur",
        "motion_blur",
        "snow",
        "frost",
        "fog",
        "elastic_transform",
    }
)

_SIZE = 32
_SHAPE = (_SIZE, _SIZE, 3)
_CHUNK = 128  # images per internal pass of corrupt()

# ------------------------------------------------------------------------------------------------------------
# CIFAR-10-C parameters, one entry per severity 1..5 (make_cifar_c.py).
# ------------------------------------------------------------------------------------------------------------
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_NOISE = (500, 250, 100, 75, 50)
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
# (disk radius, anti-alias sigma)
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
# (gaussian sigma, max pixel displacement, shuffle passes)
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# (radius, sigma) of the ImageMagick motion blur
_MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
# np.arange reproduces the exact float zoom factors (including the end point that floating error adds).
_ZOOM_BLUR = tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26))
# (mean, std, zoom, threshold, blur radius, blur sigma, image blend)
_SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
# (image weight, frost weight)
_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# make_cifar_c.py draws the texture with randint(5), so frost6 is never used.
_FROST_CHOICES = 5
_FROST_SCALE = 0.2
# (fog strength, plasma wibble decay)
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# (alpha, sigma, affine jitter), written as fractions of the image size like the original.
_ELASTIC = (
    (_SIZE * 0, _SIZE * 0, _SIZE * 0.08),
    (_SIZE * 0.05, _SIZE * 0.2, _SIZE * 0.07),
    (_SIZE * 0.08, _SIZE * 0.06, _SIZE * 0.06),
    (_SIZE * 0.1, _SIZE * 0.04, _SIZE * 0.05),
    (_SIZE * 0.1, _SIZE * 0.03, _SIZE * 0.03),
)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_JPEG_QUALITY = (80, 65, 58, 50, 40)


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------
def _to_uint8(x: FloatArray) -> UInt8Images:
    """Clip to [0, 255] and truncate: make_cifar_c.py stores ``np.uint8(float_image)``, which truncates."""
    return np.clip(x, 0.0, 255.0).astype(np.uint8)


def _round_to_uint8(x: FloatArray) -> UInt8Images:
    """Round half up, as ImageMagick does when it writes its float result back to 8-bit pixels."""
    return np.clip(np.floor(x + 0.5), 0.0, 255.0).astype(np.uint8)


def _draw(
    rngs: Sequence[np.random.Generator], draw: Callable[[np.random.Generator], npt.ArrayLike]
) -> np.ndarray:
    """Stack one draw per image; each image only ever consumes its own generator."""
    return np.stack([np.asarray(draw(rng)) for rng in rngs])


def _gaussian_filter(
    x: FloatArray, sigma: float, axes: tuple[int, ...], mode: str, truncate: float
) -> FloatArray:
    """``skimage.filters.gaussian`` on the given spatial axes only (the batch axis is never mixed)."""
    from scipy.ndimage import gaussian_filter

    sigmas = [sigma if ax in axes else 0.0 for ax in range(x.ndim)]
    return gaussian_filter(x, sigma=sigmas, mode=mode, truncate=truncate)


@lru_cache(maxsize=64)
def _zoom_matrix(length: int, zoom: float) -> np.ndarray:
    """make_cifar_c ``clipped_zoom`` along one axis as a (length, length) matrix of interpolation weights.

    Centre crop of ``ceil(length / zoom)`` pixels, linear zoom, centre trim back to ``length``. The weights
    are read off ``scipy.ndimage.zoom`` (order 1) applied to an identity matrix, so the coordinate mapping
    and edge handling are exactly scipy's.
    """
    from scipy.ndimage import zoom as scipy_zoom

    crop = int(np.ceil(length / zoom))
    top = (length - crop) // 2
    weights = scipy_zoom(np.eye(crop), (zoom, 1), order=1)  # weights[o, i]: weight of input i in output o
    trim = (weights.shape[0] - length) // 2
    matrix = np.zeros((length, length))
    matrix[:, top : top + crop] = weights[trim : trim + length]
    matrix.flags.writeable = False
    return matrix


@lru_cache(maxsize=16)
def _zoom_operator(zooms: tuple[float, ...]) -> csr_array:
    """Sparse operator on flattened H*W planes: the sum of ``clipped_zoom`` over ``zooms``.

    Linear zooms are separable (``kron`` of the per-axis matrices) and their sum for zoom blur has about 12
    non-zeros per pixel, so one sparse product replaces 26 interpolations per image.
    """
    from scipy import sparse

    total = sum(np.kron(_zoom_matrix(_SIZE, z), _zoom_matrix(_SIZE, z)) for z in zooms)
    return sparse.csr_array(total)


def _apply_plane_operator(operator: csr_array, x: FloatArray) -> npt.NDArray[np.float64]:
    """Apply a (H*W, H*W) operator to every channel plane of ``x`` (N, H, W, C), in float64.

    scipy's CSR product accumulates each output column on its own, so an image's result never depends on
    the other images in the batch.
    """
    n, h, w, c = x.shape
    planes = x.reshape(n, h * w, c).transpose(1, 0, 2).reshape(h * w, n * c).astype(np.float64)
    out = operator @ planes
    return out.reshape(h * w, n, c).transpose(1, 0, 2).reshape(n, h, w, c)


def _motion_blur_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's one-sided motion-blur kernel: a half Gaussian over ``2 * ceil(radius) + 1`` taps."""
    width = int(2 * np.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _motion_blur_batch(x: FloatArray, radius: float, sigma: float, angles_deg: np.ndarray) -> FloatArray:
    """ImageMagick ``MotionBlurImage`` on (N, H, W, C): tap i samples (x + ox_i, y + oy_i), edge-clamped.

    The offsets follow ImageMagick: ``ox_i = ceil(i * cos(a) - 0.5)``, ``oy_i = ceil(i * sin(a) - 0.5)``
    (computed through its ``width * (sin, cos)`` vector), with the default edge virtual-pixel method.
    """
    n, h, w, _ = x.shape
    kernel = _motion_blur_kernel(radius, sigma)
    width = kernel.shape[0]
    rad = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    point_x, point_y = width * np.sin(rad), width * np.cos(rad)
    hyp = np.hypot(point_x, point_y)
    taps = np.arange(width, dtype=np.float64)
    off_x = np.ceil(taps[None, :] * point_y[:, None] / hyp[:, None] - 0.5).astype(np.int64)  # (N, width)
    off_y = np.ceil(taps[None, :] * point_x[:, None] / hyp[:, None] - 0.5).astype(np.int64)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        rows = np.clip(np.arange(h)[None, :, None] + off_y[:, i, None, None], 0, h - 1)
        cols = np.clip(np.arange(w)[None, None, :] + off_x[:, i, None, None], 0, w - 1)
        out += kernel[i] * x[batch, rows, cols]
    return out


def _plasma_fractal(
    rngs: Sequence[np.random.Generator], wibble_decay: float, mapsize: int = _SIZE
) -> FloatArray:
    """Diamond-square height maps in [0, 1], one per generator (make_cifar_c ``plasma_fractal``)."""
    n = len(rngs)
    maps = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        # The original adds wibble * U(-wibble, wibble), i.e. noise of amplitude wibble**2; kept as is.
        noise = _draw(rngs, lambda rng: rng.uniform(-wibble, wibble, total.shape[1:]))
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        # squares: centre of each square = mean of its corners + noise
        corners = maps[:, 0::step, 0::step]
        total = corners + np.roll(corners, -1, axis=1)
        total += np.roll(total, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(total)
        # diamonds: edge midpoints = mean of the two adjacent corners and centres + noise
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        total = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=2))
        maps[:, 0::step, half::step] = wibbled_mean(total)
        total = (centres + np.roll(centres, 1, axis=2)) + (corners + np.roll(corners, -1, axis=1))
        maps[:, half::step, 0::step] = wibbled_mean(total)
        step //= 2
        wibble /= wibble_decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _frost_dir() -> Path:
    """Folder of the frost textures shipped with ``imagecorruptions`` (found without importing it)."""
    # The package's __init__ imports pkg_resources, which current setuptools no longer ships, so it must not
    # be imported; only its data folder is needed.
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'frost' corruption needs the frost textures shipped by the 'imagecorruptions' package "
            "(pip install imagecorruptions==1.1.2); it is not installed"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    missing = [f for f in _FROST_FILES[:_FROST_CHOICES] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"frost textures {missing} missing from {folder}")
    return folder


@lru_cache(maxsize=len(_FROST_FILES))
def _frost_texture(index: int) -> UInt8Images:
    """Frost texture ``index`` as RGB uint8, shrunk by 0.2 exactly like ``cv2.resize(fx=fy=0.2)``.

    OpenCV's bilinear resize by exactly 1/5 samples source pixel ``5 * d + 2`` with weight 1 (the pixel-centre
    mapping ``(d + 0.5) * 5 - 0.5`` is an integer), so the shrink is a strided subsample.
    """
    from PIL import Image

    with Image.open(_frost_dir() / _FROST_FILES[index]) as im:
        # convert("RGB") drops alpha without compositing, as cv2.imread(IMREAD_COLOR) does.
        full = np.asarray(im.convert("RGB"), dtype=np.uint8)
    h, w = full.shape[:2]
    step = round(1 / _FROST_SCALE)
    rows = np.minimum(step * np.arange(int(np.rint(h * _FROST_SCALE))) + step // 2, h - 1)
    cols = np.minimum(step * np.arange(int(np.rint(w * _FROST_SCALE))) + step // 2, w - 1)
    small = np.ascontiguousarray(full[rows][:, cols])
    small.flags.writeable = False
    return small


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 affine matrices mapping three ``src`` points onto ``dst`` (batched ``cv2.getAffineTransform``)."""
    ones = np.ones((*src.shape[:-1], 1), dtype=np.float64)
    a = np.concatenate([src.astype(np.float64), ones], axis=-1)  # (N, 3, 3)
    return np.swapaxes(np.linalg.solve(a, dst.astype(np.float64)), -1, -2)  # (N, 2, 3)


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 index folding (``gfedcb|abcdefgh|gfedcba``)."""
    period = 2 * n - 2
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def _warp_affine_reflect101(images: FloatArray, matrices: np.ndarray) -> FloatArray:
    """``cv2.warpAffine(img, M, (W, H), borderMode=BORDER_REFLECT_101)`` (bilinear) for each image.

    ``M`` maps source to destination, so every destination pixel samples the source at ``M^-1 (x, y)``.
    """
    n, h, w, _ = images.shape
    lin, shift = matrices[:, :, :2], matrices[:, :, 2:]
    inv = np.linalg.inv(lin)
    inv_shift = -inv @ shift
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    src_x = inv[:, 0, 0, None, None] * xs + inv[:, 0, 1, None, None] * ys + inv_shift[:, 0, 0, None, None]
    src_y = inv[:, 1, 0, None, None] * xs + inv[:, 1, 1, None, None] * ys + inv_shift[:, 1, 0, None, None]
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xa, xb = _reflect101(x0, w), _reflect101(x0 + 1, w)
    ya, yb = _reflect101(y0, h), _reflect101(y0 + 1, h)
    b = np.arange(n)[:, None, None]
    top = images[b, ya, xa] * (1 - fx) + images[b, ya, xb] * fx
    bottom = images[b, yb, xa] * (1 - fx) + images[b, yb, xb] * fx
    return top * (1 - fy) + bottom * fy


# ------------------------------------------------------------------------------------------------------------
# Batch implementations: (N, 32, 32, 3) uint8 + one generator per image -> uint8
# ------------------------------------------------------------------------------------------------------------
def _gaussian_noise(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    c = _GAUSSIAN_NOISE[severity - 1]
    noise = _draw(rngs, lambda rng: rng.normal(scale=c, size=_SHAPE))
    return _to_uint8(np.clip(x / 255.0 + noise, 0, 1) * 255)


def _shot_noise(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    c = _SHOT_NOISE[severity - 1]
    scaled = x / 255.0 * c
    counts = np.stack([rng.poisson(lam) for rng, lam in zip(rngs, scaled, strict=True)])
    return _to_uint8(np.clip(counts / c, 0, 1) * 255)


def _impulse_noise(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    # skimage random_noise(mode="s&p"): each value is replaced with probability `amount`, half by 1,
    # half by 0.
    amount = _IMPULSE_NOISE[severity - 1]
    draws = _draw(rngs, lambda rng: rng.random((2, *_SHAPE)))
    flipped, salted = draws[:, 0] < amount, draws[:, 1] < 0.5
    out = x / 255.0
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return _to_uint8(out * 255)


@lru_cache(maxsize=8)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c ``disk``: an aliased disk on a 17x17 grid, anti-aliased by a 3x3 Gaussian (cv2 semantics).

    Returned cropped to its non-zero support, which leaves the convolution unchanged and makes it cheaper.
    """
    from scipy.ndimage import correlate1d

    if radius > 8:
        raise ValueError(
            "radii above 8 use a 5x5 anti-alias kernel in the original; not needed for CIFAR-10-C"
        )
    grid = np.arange(-8, 8 + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    # cv2.getGaussianKernel(3, sigma) and GaussianBlur's default BORDER_REFLECT_101 (= scipy "mirror").
    g = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / (2 * alias_blur**2))
    g = (g / g.sum()).astype(np.float32)
    kernel = correlate1d(correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    support = np.argwhere(kernel != 0)
    r = int(np.abs(support - 8).max())
    kernel = np.ascontiguousarray(kernel[8 - r : 8 + r + 1, 8 - r : 8 + r + 1])
    kernel.flags.writeable = False
    return kernel


def _defocus_blur(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    from scipy.ndimage import correlate

    radius, alias_blur = _DEFOCUS_BLUR[severity - 1]
    kernel = _disk_kernel(float(radius), float(alias_blur))
    # cv2.filter2D correlates with BORDER_REFLECT_101 (= scipy "mirror"); size-1 axes keep images apart.
    out = correlate(x / 255.0, kernel[None, :, :, None].astype(np.float64), mode="mirror")
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _glass_blur(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    sigma, max_delta, passes = _GLASS_BLUR[severity - 1]
    if max_delta != 1:
        raise AssertionError("the vectorised pixel shuffle below is only exact for max_delta == 1")
    blurred = _to_uint8(_gaussian_filter(x / 255.0, sigma, (1, 2), "nearest", 4.0) * 255)
    # The original visits h, w = 31 ... 2 (descending) and draws (dx, dy) = randint(-1, 1), i.e. in {-1, 0}.
    # Its tuple "swap" of numpy views only copies the neighbour into (h, w); the neighbour lies above/left,
    # which that pass has not written yet. One pass is therefore a gather from the previous image.
    lo, hi = max_delta + 1, _SIZE - max_delta  # visited coordinates, inclusive
    m = hi - lo + 1
    offsets = _draw(rngs, lambda rng: rng.integers(-max_delta, max_delta, size=(passes, m, m, 2)))
    offsets = offsets[:, :, ::-1, ::-1]  # draws come in descending (h, w) order; index them ascending
    coords = np.arange(lo, hi + 1)
    b = np.arange(x.shape[0])[:, None, None]
    for p in range(passes):
        dx, dy = offsets[:, p, :, :, 0], offsets[:, p, :, :, 1]
        src = blurred[b, coords[None, :, None] + dy, coords[None, None, :] + dx]
        blurred = blurred.copy()
        blurred[:, lo : hi + 1, lo : hi + 1] = src
    out = _gaussian_filter(blurred / 255.0, sigma, (1, 2), "nearest", 4.0)
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _motion_blur(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    radius, sigma = _MOTION_BLUR[severity - 1]
    angles = _draw(rngs, lambda rng: rng.uniform(-45, 45))
    return _round_to_uint8(_motion_blur_batch(x.astype(np.float64), radius, sigma, angles))


def _zoom_blur(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    zooms = tuple(float(z) for z in _ZOOM_BLUR[severity - 1])
    img = (x / 255.0).astype(np.float32)
    # The original sums the zoomed copies one by one in float32; here the sum is one float64 product.
    total = _apply_plane_operator(_zoom_operator(zooms), img).astype(np.float32)
    out = (img + total) / (len(zooms) + 1)
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _snow(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    mean, std, zoom, threshold, radius, sigma, blend = _SNOW[severity - 1]
    layers, angles = [], []
    for rng in rngs:  # per image: the snow field first, then the blur angle, as in the original
        layers.append(rng.normal(loc=mean, scale=std, size=(_SIZE, _SIZE)))
        angles.append(rng.uniform(-135, -45))
    layer = _apply_plane_operator(_zoom_operator((float(zoom),)), np.stack(layers)[..., None])
    layer[layer < threshold] = 0
    # The original round-trips the layer through an 8-bit PNG for ImageMagick: truncate, blur, round.
    layer_u8 = _to_uint8(np.clip(layer, 0, 1) * 255)
    flakes = _round_to_uint8(_motion_blur_batch(layer_u8.astype(np.float64), radius, sigma, np.array(angles)))
    flakes_f = flakes / 255.0
    img = x.astype(np.float32) / 255.0
    # cv2.cvtColor(RGB2GRAY) weights in float32
    gray = (
        img[..., 0] * np.float32(0.299) + img[..., 1] * np.float32(0.587) + img[..., 2] * np.float32(0.114)
    )[..., None]
    img = blend * img + (1 - blend) * np.maximum(img, gray * 1.5 + 0.5)
    out = img + flakes_f + np.rot90(flakes_f, k=2, axes=(1, 2))
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _frost(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    image_weight, frost_weight = _FROST[severity - 1]
    crops = []
    for rng in rngs:
        texture = _frost_texture(int(rng.integers(_FROST_CHOICES)))
        top = int(rng.integers(0, texture.shape[0] - _SIZE))
        left = int(rng.integers(0, texture.shape[1] - _SIZE))
        crops.append(texture[top : top + _SIZE, left : left + _SIZE])
    return _to_uint8(np.clip(image_weight * x + frost_weight * np.stack(crops), 0, 255))


def _fog(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    strength, decay = _FOG[severity - 1]
    img = x / 255.0
    max_val = img.max(axis=(1, 2, 3), keepdims=True)
    img = img + strength * _plasma_fractal(rngs, decay)[..., None]
    return _to_uint8(np.clip(img * max_val / (max_val + strength), 0, 1) * 255)


def _brightness(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + _BRIGHTNESS[severity - 1], 0, 1)
    return _to_uint8(np.clip(hsv2rgb(hsv), 0, 1) * 255)


def _contrast(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    c = _CONTRAST[severity - 1]
    img = x / 255.0
    # per-image, per-channel mean; reshaping keeps the reduction identical for every batch size
    means = img.reshape(x.shape[0], -1, 3).mean(axis=1)[:, None, None, :]
    return _to_uint8(np.clip((img - means) * c + means, 0, 1) * 255)


def _elastic_transform(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    from scipy.ndimage import map_coordinates

    alpha, sigma, jitter = _ELASTIC[severity - 1]
    n = x.shape[0]
    img = x.astype(np.float32) / 255.0
    centre = np.float32(_SIZE) // 2
    third = _SIZE // 3
    pts1 = np.array(
        [
            [centre + third, centre + third],
            [centre + third, centre - third],
            [centre - third, centre - third],
        ],
        dtype=np.float32,
    )
    jitters, fields = [], []
    for rng in rngs:  # per image: affine jitter, then the dx field, then the dy field
        jitters.append(rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32))
        fields.append(rng.uniform(-1, 1, size=(2, _SIZE, _SIZE)))
    pts2 = pts1[None] + np.stack(jitters)
    warped = _warp_affine_reflect101(img, _affine_from_points(np.broadcast_to(pts1, pts2.shape), pts2))
    warped = warped.astype(np.float32)
    # skimage gaussian(mode="reflect", truncate=3) on the two uniform fields, scaled by alpha
    disp = (_gaussian_filter(np.stack(fields), sigma, (2, 3), "reflect", 3.0) * alpha).astype(np.float32)
    dx, dy = disp[:, 0], disp[:, 1]
    ys, xs = np.mgrid[0:_SIZE, 0:_SIZE]
    # map_coordinates on (N*3, H, W): the image/channel coordinate is an exact integer, so no mixing.
    planes = np.ascontiguousarray(warped.transpose(0, 3, 1, 2)).reshape(n * 3, _SIZE, _SIZE)
    coords = np.stack(
        [
            np.broadcast_to(np.arange(n * 3)[:, None, None], planes.shape).astype(np.float64),
            np.repeat(ys[None] + dy, 3, axis=0),
            np.repeat(xs[None] + dx, 3, axis=0),
        ]
    )
    sampled = map_coordinates(planes, coords, order=1, mode="reflect")
    out = sampled.reshape(n, 3, _SIZE, _SIZE).transpose(0, 2, 3, 1)
    return _to_uint8(np.clip(out, 0, 1) * 255)


def _pixelate(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    from PIL import Image

    small = int(_SIZE * _PIXELATE[severity - 1])
    out = [
        np.asarray(
            Image.fromarray(img)
            .resize((small, small), Image.Resampling.BOX)
            .resize((_SIZE, _SIZE), Image.Resampling.BOX)
        )
        for img in x
    ]
    return np.stack(out).astype(np.uint8, copy=False)


def _jpeg_compression(x: UInt8Images, severity: int, rngs: Sequence[np.random.Generator]) -> UInt8Images:
    from PIL import Image

    quality = _JPEG_QUALITY[severity - 1]
    out = []
    for img in x:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return np.stack(out).astype(np.uint8, copy=False)


_BATCH: dict[str, _BatchFn] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_BATCH) == CORRUPTIONS


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return int(severity)


def _check_name(name: str) -> str:
    if name != "none" and name not in _BATCH:
        raise ValueError(f"unknown corruption {name!r}; expected 'none' or one of {CORRUPTIONS}")
    return name


def _check_images(images: np.ndarray) -> UInt8Images:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != _SHAPE:
        raise ValueError(f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} {images.shape}")
    return images


def _name_key(name: str) -> int:
    # A stable integer for the name (Python's hash() of a str is salted per process).
    return int.from_bytes(name.encode("utf-8"), "little")


def corruption_rng(seed: int, name: str, severity: int, image_id: int) -> np.random.Generator:
    """The generator :func:`corrupt` uses for image ``image_id`` (derived with ``np.random.SeedSequence``)."""
    if seed < 0 or image_id < 0:
        raise ValueError("seed and image_id must be non-negative")
    entropy = [int(seed), _name_key(name), int(severity), int(image_id)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def corrupt(
    images: UInt8Images,
    name: str,
    severity: int,
    seed: int,
    image_ids: Sequence[int] | npt.NDArray[np.integer] | None = None,
) -> UInt8Images:
    """Apply corruption ``name`` ('none' = identity) at ``severity`` to a uint8 NHWC batch of 32x32 images.

    Image ``k`` uses ``corruption_rng(seed, name, severity, image_ids[k])``; ``image_ids`` defaults to
    ``0 .. N-1``. Pass stable ids (e.g. dataset indices) so that an image is corrupted identically however
    the batch is chunked or ordered. Returns a new array.
    """
    images = _check_images(np.asarray(images))
    name = _check_name(name)
    severity = _check_severity(severity)
    n = images.shape[0]
    ids = (
        np.arange(n, dtype=np.int64)
        if image_ids is None
        else np.asarray(image_ids, dtype=np.int64).reshape(-1)
    )
    if ids.shape[0] != n:
        raise ValueError(f"got {ids.shape[0]} image_ids for {n} images")
    if name == "none" or n == 0:
        return images.copy()
    batch_fn = _BATCH[name]
    out = np.empty(images.shape, dtype=np.uint8)
    # Chunks keep the float64 temporaries cache-sized (up to 2x faster on 1000 images); every image depends
    # only on its own pixels and generator, so the chunk size never changes a result.
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        rngs = [corruption_rng(seed, name, severity, int(i)) for i in ids[start:stop]]
        out[start:stop] = batch_fn(images[start:stop], severity, rngs)
    return out


def _single_image(name: str) -> CorruptionFn:
    batch_fn = _BATCH[name]

    def apply(image: UInt8Images, severity: int, rng: np.random.Generator) -> UInt8Images:
        batch = _check_images(np.asarray(image)[None])
        return batch_fn(batch, _check_severity(severity), [rng])[0]

    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = (
        f"CIFAR-10-C ``{name}`` of one 32x32x3 uint8 image at ``severity`` 1-5, randomness from ``rng``."
    )
    return apply


gaussian_noise = _single_image("gaussian_noise")
shot_noise = _single_image("shot_noise")
impulse_noise = _single_image("impulse_noise")
defocus_blur = _single_image("defocus_blur")
glass_blur = _single_image("glass_blur")
motion_blur = _single_image("motion_blur")
zoom_blur = _single_image("zoom_blur")
snow = _single_image("snow")
frost = _single_image("frost")
fog = _single_image("fog")
brightness = _single_image("brightness")
contrast = _single_image("contrast")
elastic_transform = _single_image("elastic_transform")
pixelate = _single_image("pixelate")
jpeg_compression = _single_image("jpeg_compression")

_SINGLE: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def get_corruption(name: str) -> CorruptionFn:
    """The single-image function of corruption ``name`` (one of :data:`CORRUPTIONS`)."""
    if name not in _SINGLE:
        raise ValueError(f"unknown corruption {name!r}; expected one of {CORRUPTIONS}")
    return _SINGLE[name]
