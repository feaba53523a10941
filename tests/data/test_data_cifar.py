"""Tests for tta_data.cifar (archive loading, JPEG decoding) and the benches' data-folder lookup."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_bench.paths import REPO_DATA_DIR, REPO_ROOT, cifar10_archive, cifar10_dir
from tta_data import JpegDataset, decode_images, load_cifar10, load_jpeg_npz


def test_test_split_layout(cifar_test: JpegDataset) -> None:
    assert len(cifar_test) == 1000  # the shipped subset: 100 per class
    assert cifar_test.classes[0] == "airplane" and len(cifar_test.classes) == 10
    assert all(isinstance(c, str) for c in cifar_test.classes)
    assert np.bincount(cifar_test.labels, minlength=10).tolist() == [100] * 10
    # the archive is ordered by class, which is why streams must never use file order
    assert np.all(np.diff(cifar_test.labels.astype(np.int64)) >= 0)
    assert cifar_test.offsets[0] == 0 and cifar_test.offsets[-1] == cifar_test.jpeg.shape[0]
    for arr in (cifar_test.jpeg, cifar_test.offsets, cifar_test.labels):
        assert not arr.flags.writeable


def test_jpeg_bytes_are_whole_files(cifar_test: JpegDataset) -> None:
    for i in (0, 1, 499, len(cifar_test) - 1, -1):
        data = cifar_test.jpeg_bytes(i)
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"  # JPEG SOI / EOI markers
    assert cifar_test.jpeg_bytes(-1) == cifar_test.jpeg_bytes(len(cifar_test) - 1)
    with pytest.raises(IndexError):
        cifar_test.jpeg_bytes(len(cifar_test))


def test_decode_images(cifar_test: JpegDataset) -> None:
    idx = np.array([7, 432, 999, 7])
    images = decode_images(cifar_test, idx)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[3])
    np.testing.assert_array_equal(images, decode_images(cifar_test, idx))  # deterministic
    single = np.asarray(Image.open(io.BytesIO(cifar_test.jpeg_bytes(432))).convert("RGB"))
    np.testing.assert_array_equal(images[1], single)
    assert 20 < images.mean() < 235  # real pictures, not blank
    assert decode_images(cifar_test, []).shape == (0, 32, 32, 3)


def test_missing_archive_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        load_jpeg_npz(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match=r"test_jpeg\.npz"):
        load_cifar10("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10("val", data_dir=tmp_path)  # type: ignore[arg-type]


def test_round_trip_small_archive(tmp_path: Path, cifar_test: JpegDataset) -> None:
    picks = [0, 150, 999]
    blobs = [np.frombuffer(cifar_test.jpeg_bytes(i), dtype=np.uint8) for i in picks]
    offsets = np.concatenate([[0], np.cumsum([b.size for b in blobs])]).astype(np.int64)
    path = tmp_path / "tiny.npz"
    labels = cifar_test.labels[picks]
    np.savez(
        path, jpeg=np.concatenate(blobs), offsets=offsets, labels=labels, classes=np.array(cifar_test.classes)
    )
    tiny = load_jpeg_npz(path)
    assert len(tiny) == 3 and tiny.classes == cifar_test.classes
    np.testing.assert_array_equal(tiny.labels, labels)
    np.testing.assert_array_equal(decode_images(tiny, [0, 1, 2]), decode_images(cifar_test, picks))

    np.savez(tmp_path / "bad.npz", jpeg=np.concatenate(blobs), labels=labels)
    with pytest.raises(ValueError, match="offsets"):
        load_jpeg_npz(tmp_path / "bad.npz")


def test_dataset_validation() -> None:
    jpeg = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="boundaries"):
        JpegDataset(jpeg, np.array([0, 10]), np.array([0, 1], dtype=np.uint8), ("a", "b"))
    with pytest.raises(ValueError, match="classes"):
        JpegDataset(jpeg, np.array([0, 4, 10]), np.array([0, 2], dtype=np.uint8), ("a", "b"))


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TTA_DATA_DIR", raising=False)
    # The benchmarks' default: the full archives next to the checkout (present or not).
    assert cifar10_dir() == (REPO_ROOT / ".." / "shared" / "data" / "cifar10").resolve()
    monkeypatch.setenv("TTA_DATA_DIR", "data/cifar10")  # the shipped subsets
    assert cifar10_archive("test") == REPO_DATA_DIR / "test_jpeg.npz"
    assert len(load_jpeg_npz(cifar10_archive("test"))) == 1000
    assert len(load_jpeg_npz(cifar10_archive("train"))) == 3000

    monkeypatch.setenv("TTA_DATA_DIR", "some/relative/dir")
    monkeypatch.chdir(tmp_path)  # a relative setting must not depend on the working directory
    assert cifar10_dir() == (REPO_ROOT / "some" / "relative" / "dir").resolve()

    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    assert cifar10_dir() == tmp_path.resolve()


def test_an_absent_default_archive_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    expected = tmp_path.resolve() / "train_jpeg.npz"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"expected {expected}") + ".*TTA_DATA_DIR or --data-dir"
    ):
        cifar10_archive("train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"expected {tmp_path / 'test_jpeg.npz'}")):
        cifar10_archive("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        cifar10_archive("val")  # type: ignore[arg-type]


def test_import_loads_numpy_only() -> None:
    code = (
        "import sys, tta_data\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(loaded & {'torch', 'scipy', 'skimage', 'PIL', 'cv2'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == ""
