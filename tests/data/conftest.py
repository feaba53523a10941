"""Shared fixtures for the tta_data tests: the real CIFAR-10 test archive next to the repository."""

from __future__ import annotations

import numpy as np
import pytest

from tta_bench.paths import cifar10_archive
from tta_data import JpegDataset, decode_images, load_jpeg_npz


@pytest.fixture(scope="session")
def cifar_test() -> JpegDataset:
    return load_jpeg_npz(cifar10_archive("test"))


@pytest.fixture(scope="session")
def sample_index(cifar_test: JpegDataset) -> np.ndarray:
    """Eight images spread over all classes (the archive is ordered by class)."""
    return np.linspace(3, len(cifar_test) - 4, 8).astype(np.int64)


@pytest.fixture(scope="session")
def sample_images(cifar_test: JpegDataset, sample_index: np.ndarray) -> np.ndarray:
    images = decode_images(cifar_test, sample_index)
    images.flags.writeable = False  # a test that mutates its input would corrupt the others
    return images
