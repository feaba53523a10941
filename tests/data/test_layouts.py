"""Dataset folder layouts (tta_data.layouts) on small folders the tests write: CIFAR-10-C .npy files,
ImageNet-C folders and class folders; severity slicing, labels, resizing, streams and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_data import stream_indices
from tta_data.layouts import detect_layout, domain_stream, list_domains, load_domain

N = 20  # images per severity


def severity_images(corruption_id: int, severity: int, n: int = N) -> np.ndarray:
    """Images whose pixels say what they are: channel 0 = corruption, 1 = severity, 2 = image index."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[..., 0] = corruption_id
    images[..., 1] = severity
    images[..., 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    return images


def make_cifar_c(root: Path, corruptions=("gaussian_noise", "fog"), tiled_labels: bool = True) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(N) % 10
    for k, name in enumerate(corruptions):
        np.save(root / f"{name}.npy", np.concatenate([severity_images(k, s) for s in range(1, 6)]))
    np.save(root / "labels.npy", np.tile(labels, 5).astype(np.uint8) if tiled_labels else labels)
    return labels


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), color).save(path)


def make_imagenet_c(root: Path) -> None:
    for c, corruption in enumerate(("blur", "snow")):
        for severity in (1, 2, 3, 4, 5):
            for k, cls in enumerate(("n01", "n02", "n03")):
                for i in range(2):
                    write_image(
                        root / corruption / str(severity) / cls / f"{i}.JPEG",
                        (c * 100, severity * 40, k * 80),
                    )


@pytest.mark.parametrize("tiled", [True, False])
def test_cifar_c_severity_picks_its_rows_and_labels(tmp_path: Path, tiled: bool) -> None:
    labels = make_cifar_c(tmp_path, tiled_labels=tiled)
    assert detect_layout(tmp_path) == "cifar-c"
    assert list_domains(tmp_path) == ["fog", "gaussian_noise"]
    for severity in (1, 3, 5):
        domain = load_domain(tmp_path, "fog", severity)
        assert len(domain) == N and domain.severity == severity and domain.name == "fog"
        np.testing.assert_array_equal(domain.labels, labels)
        images = domain.images([0, 7, 19])
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
        assert set(images[..., 0].ravel()) == {1}  # fog was written second
        assert set(images[..., 1].ravel()) == {severity}
        assert list(images[:, 0, 0, 2]) == [0, 7, 19]
        assert domain.classes == tuple(str(i) for i in range(10))


def test_cifar_c_errors_name_what_is_missing_and_where(tmp_path: Path) -> None:
    make_cifar_c(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"snow\.npy.*corruptions found: fog, gaussian_noise"):
        load_domain(tmp_path, "snow", 5)
    with pytest.raises(ValueError, match="severity must be one of"):
        load_domain(tmp_path, "fog", 6)
    with pytest.raises(ValueError, match="model takes 64x64"):
        load_domain(tmp_path, "fog", 5, size=(64, 64))
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"labels not found: {tmp_path}/labels\.npy"):
        load_domain(tmp_path, "fog", 5)
    np.save(tmp_path / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match=r"expected 100 \(or 20\) labels"):
        load_domain(tmp_path, "fog", 5)
    np.save(tmp_path / "odd.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="do not split into 5 severities"):
        load_domain(tmp_path, "odd", 1)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no dataset found in .*empty: expected CIFAR-10-C files"):
        detect_layout(tmp_path / "empty")


def test_imagenet_c_folders(tmp_path: Path) -> None:
    make_imagenet_c(tmp_path)
    assert detect_layout(tmp_path) == "imagenet-c"
    assert list_domains(tmp_path) == ["blur", "snow"]
    domain = load_domain(tmp_path, "snow", 3)
    assert domain.classes == ("n01", "n02", "n03")
    assert list(domain.labels) == [0, 0, 1, 1, 2, 2]
    images = domain.images([0, 2, 5])
    assert images.shape == (3, 32, 32, 3)
    # JPEG is lossy: the colours within a few levels of (100, 3 * 40, k * 80).
    np.testing.assert_allclose(
        images[:, 16, 16].astype(int), [[100, 120, 0], [100, 120, 80], [100, 120, 160]], atol=4
    )
    with pytest.raises(FileNotFoundError, match=r"corruption folder not found: .*fog .*found: blur, snow"):
        load_domain(tmp_path, "fog", 3)
    import shutil

    shutil.rmtree(tmp_path / "blur" / "4")
    with pytest.raises(FileNotFoundError, match=r"severity folder not found: .*blur/4"):
        load_domain(tmp_path, "blur", 4, layout="imagenet-c")


def test_class_folders_decode_and_resize(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "a.png", (255, 0, 0), (40, 60))
    write_image(tmp_path / "cat" / "b.jpg", (250, 0, 0), (32, 32))
    write_image(tmp_path / "dog" / "c.webp", (0, 0, 255), (64, 64))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    assert detect_layout(tmp_path) == "folders"
    assert list_domains(tmp_path) == ["none"]
    domain = load_domain(tmp_path, "none", size=(32, 32))
    assert domain.classes == ("cat", "dog") and list(domain.labels) == [0, 0, 1]
    images = domain.images([0, 1, 2])
    assert images.shape == (3, 32, 32, 3)
    assert images[0, 16, 16, 0] > 240 and images[2, 16, 16, 2] > 240
    with pytest.raises(ValueError, match="differ in size"):
        load_domain(tmp_path, "none").images([0, 2])
    with pytest.raises(ValueError, match="one domain of clean images"):
        load_domain(tmp_path, "fog")
    (tmp_path / "bird").mkdir()
    empty = tmp_path / "bird"
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load_domain(empty, "none", layout="folders")


def test_domain_stream_draws_like_build_stream(tmp_path: Path) -> None:
    labels = make_cifar_c(tmp_path)
    domain = load_domain(tmp_path, "gaussian_noise", 2)
    batches = list(domain_stream(domain, n=10, order="sorted", seed=3, batch_size=4))
    expected = stream_indices(labels, 10, "sorted", 0.0, 3)
    assert [len(b.labels) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.index for b in batches]), expected)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels[expected])
    for b in batches:
        assert b.corruption == "gaussian_noise"
        np.testing.assert_array_equal(b.images[:, 0, 0, 2], b.index)
        assert set(b.images[..., 1].ravel()) == {2}
    with pytest.raises(ValueError, match="cannot take 30 of 20"):
        domain_stream(domain, n=30)
