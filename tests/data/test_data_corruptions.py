"""Tests for tta_data.corruptions: contract, determinism, severity behaviour and fidelity to CIFAR-10-C."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tta_data import CORRUPTIONS, STOCHASTIC_CORRUPTIONS, corrupt, corruption_rng, get_corruption
from tta_data import corruptions as C

CANONICAL = [
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
]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def test_registry() -> None:
    assert list(CORRUPTIONS) == CANONICAL
    assert set(CORRUPTIONS) > STOCHASTIC_CORRUPTIONS
    for name in CORRUPTIONS:
        assert get_corruption(name).__name__ == name
    with pytest.raises(ValueError):
        get_corruption("speckle_noise")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_contract_and_determinism(name: str, sample_images: np.ndarray, sample_index: np.ndarray) -> None:
    out = corrupt(sample_images, name, 5, seed=11, image_ids=sample_index)
    assert out.shape == sample_images.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, corrupt(sample_images, name, 5, seed=11, image_ids=sample_index))
    other = corrupt(sample_images, name, 5, seed=12, image_ids=sample_index)
    if name in STOCHASTIC_CORRUPTIONS:
        assert not np.array_equal(out, other)
        # a different image id is a different draw as well
        shifted = corrupt(sample_images, name, 5, seed=11, image_ids=sample_index + 1)
        assert not np.array_equal(out, shifted)
    else:
        np.testing.assert_array_equal(out, other)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_chunking_independence(name: str, sample_images: np.ndarray, sample_index: np.ndarray) -> None:
    whole = corrupt(sample_images, name, 3, seed=5, image_ids=sample_index)
    parts = [
        corrupt(sample_images[a:b], name, 3, seed=5, image_ids=sample_index[a:b])
        for a, b in ((0, 1), (1, 4), (4, 8))
    ]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    # reversing the batch only permutes the results
    rev = corrupt(sample_images[::-1], name, 3, seed=5, image_ids=sample_index[::-1])
    np.testing.assert_array_equal(whole, rev[::-1])


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "glass_blur", "zoom_blur", "snow", "fog", "elastic_transform"]
)
def test_large_batches_match_small_ones(name: str, sample_images: np.ndarray) -> None:
    """Batches above the internal chunk size give the same images as one-by-one calls."""
    images = np.tile(sample_images, (40, 1, 1, 1))[:300]
    ids = np.arange(1000, 1300)
    whole = corrupt(images, name, 5, seed=2, image_ids=ids)
    for k in (0, 127, 128, 129, 255, 256, 299):
        np.testing.assert_array_equal(
            whole[k], corrupt(images[k : k + 1], name, 5, seed=2, image_ids=ids[k : k + 1])[0]
        )
    # same picture, different id: a different draw exactly when the corruption is random
    assert np.array_equal(whole[0], whole[8]) == (name not in STOCHASTIC_CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_single_image_function_matches_batch(
    name: str, sample_images: np.ndarray, sample_index: np.ndarray
) -> None:
    batch = corrupt(sample_images[:2], name, 4, seed=3, image_ids=sample_index[:2])
    for k in range(2):
        rng = corruption_rng(3, name, 4, int(sample_index[k]))
        np.testing.assert_array_equal(get_corruption(name)(sample_images[k], 4, rng), batch[k])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_five_changes_images(name: str, sample_images: np.ndarray) -> None:
    out = corrupt(sample_images, name, 5, seed=0)
    assert _mad(out, sample_images) > 2.0
    for k in range(len(sample_images)):
        assert not np.array_equal(out[k], sample_images[k])


def test_severity_ordering(sample_images: np.ndarray) -> None:
    ids = np.arange(len(sample_images))
    mad = {
        name: [
            _mad(corrupt(sample_images, name, s, seed=1, image_ids=ids), sample_images) for s in range(1, 6)
        ]
        for name in CORRUPTIONS
    }
    # CIFAR-10-C's elastic_transform is the exception: severity 1 is a pure affine warp with the largest
    # jitter (2.56 px), later severities trade it for a smaller local elastic field.
    for name in set(CORRUPTIONS) - {"elastic_transform"}:
        assert mad[name][4] > mad[name][0], (name, mad[name])
    # corruptions whose strength parameter grows with every severity step are strictly monotone
    monotone: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "zoom_blur")
    monotone += ("brightness", "contrast", "pixelate", "jpeg_compression")
    for name in monotone:
        assert all(np.diff(mad[name]) > 0), (name, mad[name])


def test_none_is_identity(sample_images: np.ndarray) -> None:
    out = corrupt(sample_images, "none", 5, seed=0)
    np.testing.assert_array_equal(out, sample_images)
    assert out is not sample_images and out.flags.writeable


def test_input_validation(sample_images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(sample_images, "speckle_noise", 5, 0)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(sample_images, "contrast", severity, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        corrupt(sample_images.astype(np.float32), "contrast", 1, 0)
    with pytest.raises(ValueError, match="shape"):
        corrupt(sample_images[:, :16], "contrast", 1, 0)
    with pytest.raises(ValueError, match="image_ids"):
        corrupt(sample_images, "contrast", 1, 0, image_ids=[1, 2])
    assert corrupt(sample_images[:0], "fog", 5, 0).shape == (0, 32, 32, 3)


@pytest.mark.parametrize(("severity", "sigma"), [(1, 0.04), (5, 0.10)])
def test_gaussian_noise_uses_cifar_parameters(severity: int, sigma: float) -> None:
    # Mid-grey keeps clipping away, so the residual std is the noise std (ImageNet-C would give 0.08 / 0.38).
    grey = np.full((64, 32, 32, 3), 128, dtype=np.uint8)
    residual = corrupt(grey, "gaussian_noise", severity, seed=0).astype(np.float64) / 255.0 - 128 / 255.0
    assert residual.std() == pytest.approx(sigma, rel=0.03)
    # truncation to uint8 (as make_cifar_c.py's np.uint8) biases the mean by about half a grey level
    assert residual.mean() * 255 == pytest.approx(-0.5, abs=0.25)


def test_contrast_formula(sample_images: np.ndarray) -> None:
    x = sample_images.astype(np.float64) / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    expected = (np.clip((x - means) * 0.15 + means, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(sample_images, "contrast", 5, seed=0), expected)


def test_glass_blur_matches_sequential_reference(sample_images: np.ndarray) -> None:
    """The vectorised pixel shuffle equals the original per-pixel loop (with its view-copy "swap")."""
    from skimage.filters import gaussian

    def reference(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        sigma, delta, passes = C._GLASS_BLUR[severity - 1]
        x = (gaussian(image / 255.0, sigma=sigma, channel_axis=-1) * 255).astype(np.uint8)
        draws = rng.integers(-delta, delta, size=(passes, 30 * 30, 2))
        for p in range(passes):
            k = 0
            for h in range(32 - delta, delta, -1):
                for w in range(32 - delta, delta, -1):
                    dx, dy = draws[p, k]
                    k += 1
                    x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
        return (np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255).astype(np.uint8)

    for severity in (1, 5):
        for k in range(2):
            got = C.glass_blur(sample_images[k], severity, np.random.default_rng(k))
            np.testing.assert_array_equal(
                got, reference(sample_images[k], severity, np.random.default_rng(k))
            )


def _clipped_zoom_reference(image: np.ndarray, factor: float) -> np.ndarray:
    from scipy.ndimage import zoom

    crop = int(np.ceil(32 / factor))
    top = (32 - crop) // 2
    big = zoom(image[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (big.shape[0] - 32) // 2
    return big[trim : trim + 32, trim : trim + 32]


def test_clipped_zoom_matches_scipy(sample_images: np.ndarray) -> None:
    x = (sample_images / 255.0).astype(np.float32)
    for factor in (1.0, 1.03, 1.12, 1.25, 1.75, 2.25):
        expected = np.stack([_clipped_zoom_reference(image, factor) for image in x])
        got = C._apply_plane_operator(C._zoom_operator((factor,)), x)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_zoom_blur_matches_per_factor_reference(sample_images: np.ndarray) -> None:
    """One sparse product equals the original loop of float32 zooms up to rare one-level truncation flips."""
    for severity in (1, 5):
        factors = C._ZOOM_BLUR[severity - 1]
        x = (sample_images / 255.0).astype(np.float32)
        total = np.zeros_like(x)
        for factor in factors:
            total += np.stack([_clipped_zoom_reference(image, factor) for image in x])
        expected = (np.clip((x + total) / (len(factors) + 1), 0, 1) * 255).astype(np.uint8)
        got = corrupt(sample_images, "zoom_blur", severity, seed=0)
        diff = np.abs(got.astype(np.int64) - expected)
        assert diff.max() <= 1 and np.mean(diff > 0) < 5e-3


def test_motion_blur_kernel_geometry() -> None:
    """ImageMagick semantics: tap i reads i pixels along the angle with half-Gaussian weights."""
    impulse = np.zeros((1, 32, 32, 1))
    impulse[0, 16, 16, 0] = 1.0
    kernel = C._motion_blur_kernel(6, 2.0)
    assert kernel.shape == (13,) and kernel.sum() == pytest.approx(1.0) and np.all(np.diff(kernel) < 0)
    right = C._motion_blur_batch(impulse, 6, 2.0, np.array([0.0]))[0, :, :, 0]
    np.testing.assert_allclose(right[16, 4:17], kernel[::-1])  # output x reads input x + i
    assert right.sum() == pytest.approx(1.0) and np.count_nonzero(right) == 13
    down = C._motion_blur_batch(impulse, 6, 2.0, np.array([90.0]))[0, :, :, 0]
    np.testing.assert_allclose(down[4:17, 16], kernel[::-1], atol=1e-12)
    # edge pixels are clamped, so a constant image stays constant
    flat = np.full((2, 32, 32, 3), 77.0)
    np.testing.assert_allclose(C._motion_blur_batch(flat, 9, 2.5, np.array([30.0, -40.0])), flat)


def test_frost_needs_imagecorruptions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert C._frost_dir().name == "frost"
    assert C._frost_texture(0).dtype == np.uint8 and C._frost_texture(0).shape[2] == 3
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="imagecorruptions"):
        C._frost_dir()


def test_cv2_equivalents(sample_images: np.ndarray) -> None:
    """Where OpenCV is installed, the numpy ports equal the cv2 calls of make_cifar_c.py."""
    cv2 = pytest.importorskip("cv2")
    x = sample_images[:3] / 255.0
    # defocus blur: disk kernel + filter2D with BORDER_REFLECT_101
    for radius, alias in C._DEFOCUS_BLUR:
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
        kernel = cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias)
        ours = C._disk_kernel(float(radius), float(alias))
        r = ours.shape[0] // 2
        np.testing.assert_allclose(kernel[8 - r : 9 + r, 8 - r : 9 + r], ours, atol=1e-7)
        assert np.abs(kernel).sum() == pytest.approx(np.abs(ours).sum())
    # elastic transform: getAffineTransform + warpAffine(BORDER_REFLECT_101)
    rng = np.random.default_rng(0)
    src = np.array([[26, 26], [26, 6], [6, 6]], dtype=np.float32)
    dst = src[None] + rng.uniform(-2.56, 2.56, size=(3, 3, 2)).astype(np.float32)
    matrices = C._affine_from_points(np.broadcast_to(src, dst.shape), dst)
    warped = C._warp_affine_reflect101(x.astype(np.float32), matrices)
    for k in range(3):
        m = cv2.getAffineTransform(src, dst[k])
        np.testing.assert_allclose(matrices[k], m, atol=1e-9)
        ref = cv2.warpAffine(x[k].astype(np.float32), m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(warped[k], ref, atol=1e-5)
    # frost: cv2.imread + cv2.resize(fx=fy=0.2)
    for k, name in enumerate(C._FROST_FILES[: C._FROST_CHOICES]):
        ref = cv2.resize(cv2.imread(str(C._frost_dir() / name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        np.testing.assert_array_equal(C._frost_texture(k), ref)
