"""bf16 autocast: forwards run in bf16, while logits, statistics and adaptive state stay float32."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
from adapters.base import ModelHandle
from adapters.models import ModelSpec, build_handle
from tests.conftest import CIFAR_TEST, CIFAR_WEIGHTS

SPEC = ModelSpec(id="cifar10_wrn40_2", arch="wide_resnet", depth=40, widen_factor=2, weights=CIFAR_WEIGHTS)


@pytest.fixture(scope="module")
def handles() -> dict[str, ModelHandle]:
    return {p: build_handle(SPEC, precision=p) for p in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """128 clean test images in a seeded order (the file is sorted by class)."""
    with np.load(CIFAR_TEST, allow_pickle=False) as archive:
        jpeg, offsets = archive["jpeg"], archive["offsets"]
        order = np.random.default_rng(1).permutation(len(offsets) - 1)[:128]
        arrays = []
        for i in order:
            with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _two_steps(handle: ModelHandle, name: str, x: torch.Tensor) -> adapters.StepResult:
    strategy = adapters.get_strategy(name)
    cfg = strategy.config_cls()
    state = strategy.init_state(handle, cfg, seed=0)
    state = strategy.step(handle, x[:64], state, cfg).state
    return strategy.step(handle, x[64:], state, cfg)


def test_precision_comes_from_the_spec_or_the_override() -> None:
    assert build_handle(SPEC).autocast_dtype is None
    bf16_spec = SPEC.model_copy(update={"precision": "bf16"})
    assert build_handle(bf16_spec).autocast_dtype == torch.bfloat16
    assert build_handle(bf16_spec, precision="fp32").autocast_dtype is None


@pytest.mark.parametrize("name", ["norm", "alpha_bn", "unmix_tns", "tent", "unmix_tns+tent"])
def test_bf16_agrees_with_fp32_and_keeps_state_float32(
    handles: dict[str, ModelHandle], images: torch.Tensor, name: str
) -> None:
    ref = _two_steps(handles["fp32"], name, images)
    low = _two_steps(handles["bf16"], name, images)
    assert low.logits.dtype == torch.float32
    # bf16 really ran (results differ in the low bits) ...
    assert not torch.equal(low.logits, ref.logits)
    # ... and predicts like fp32 on clean data.
    agree = float((low.logits.argmax(1) == ref.logits.argmax(1)).float().mean())
    assert agree >= 0.95, agree
    assert low.state.tensors.keys() == ref.state.tensors.keys()
    for key, tensor in low.state.tensors.items():
        assert tensor.dtype == ref.state.tensors[key].dtype, key
        assert bool(torch.isfinite(tensor).all()), key
    assert low.stats.bn_distance is not None and ref.stats.bn_distance is not None
    assert abs(low.stats.bn_distance - ref.stats.bn_distance) < 0.1


def test_sar_stays_float32(handles: dict[str, ModelHandle], images: torch.Tensor) -> None:
    ref = _two_steps(handles["fp32"], "sar", images)
    low = _two_steps(handles["bf16"], "sar", images)
    torch.testing.assert_close(low.logits, ref.logits, rtol=0, atol=0)
