"""Accuracy of source, norm and tent on the real CIFAR-10 WRN-40-2 under additive gaussian noise."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
from adapters.base import ModelHandle
from tests.adapters.conftest import REAL_DATA_MARKS
from tests.conftest import CIFAR_TEST

N_IMAGES = 500
BATCH = 100
SIGMA = 0.1

pytestmark = REAL_DATA_MARKS


@pytest.fixture(scope="module")
def noisy_stream() -> tuple[torch.Tensor, torch.Tensor]:
    """500 test images in a seeded random order (the file is sorted by class), plus gaussian noise."""
    with np.load(CIFAR_TEST, allow_pickle=False) as archive:
        jpeg, offsets, labels = archive["jpeg"], archive["offsets"], archive["labels"]
    order = np.random.default_rng(0).permutation(len(labels))[:N_IMAGES]
    images = []
    for i in order:
        with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as im:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return (x + SIGMA * noise).clamp(0, 1), torch.from_numpy(labels[order].astype(np.int64))


def _accuracy(handle: ModelHandle, name: str, stream: tuple[torch.Tensor, torch.Tensor]) -> float:
    strategy = adapters.get_strategy(name)
    cfg = strategy.config_cls()
    state = strategy.init_state(handle, cfg)
    x, y = stream
    correct = 0
    for start in range(0, len(y), BATCH):
        result = strategy.step(handle, x[start : start + BATCH], state, cfg)
        state = result.state
        correct += int((result.logits.argmax(1) == y[start : start + BATCH]).sum())
    return correct / len(y)


def test_adaptation_recovers_accuracy_under_noise(
    cifar_handle: ModelHandle, noisy_stream: tuple[torch.Tensor, torch.Tensor]
) -> None:
    labels = noisy_stream[1]
    assert len(torch.unique(labels)) == 10 and int(torch.bincount(labels).min()) > 25, (
        "stream must be shuffled"
    )
    source = _accuracy(cifar_handle, "source", noisy_stream)
    norm = _accuracy(cifar_handle, "norm", noisy_stream)
    tent = _accuracy(cifar_handle, "tent", noisy_stream)
    summary = f"source={source:.3f} norm={norm:.3f} tent={tent:.3f}"
    assert 0.55 <= source <= 0.72, summary
    assert norm >= source + 0.08, summary
    assert tent >= norm - 0.02, summary
