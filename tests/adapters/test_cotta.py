"""`cotta` (docs/ALGORITHMS.md §15): teacher EMA, stochastic restoration rate, augmentation threshold, state."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.base import ModelHandle
from adapters.cotta import STUDENT, TEACHER, CoTTAConfig, source_params
from adapters.serialization import state_from_bytes, state_to_bytes

from ._reference import assert_states_equal, make_batch

COTTA = adapters.get_strategy("cotta")
NORM = adapters.get_strategy("norm")


def _norm_logits(handle: ModelHandle, x: torch.Tensor) -> torch.Tensor:
    cfg = NORM.parse_config({})
    return NORM.step(handle, x, NORM.init_state(handle, cfg), cfg).logits


def test_defaults_are_the_cifar10_c_setting() -> None:
    cfg = CoTTAConfig()
    assert (cfg.optimizer, cfg.lr, cfg.teacher_momentum, cfg.rst, cfg.ap, cfg.n_augmentations) == (
        "adam",
        1e-3,
        0.999,
        0.01,
        0.92,
        32,
    )


def test_teacher_is_the_ema_of_the_updated_student(tiny_handle: ModelHandle) -> None:
    cfg = CoTTAConfig(rst=0.0, ap=0.0, teacher_momentum=0.9, lr=1e-2)
    state = COTTA.init_state(tiny_handle, cfg)
    x = make_batch(8, seed=1)
    result = COTTA.step(tiny_handle, x, state, cfg)
    # ap = 0: no augmentation; the teacher is still the source, so the prediction is norm's.
    assert result.state.meta["augmented"] is False
    torch.testing.assert_close(result.logits, _norm_logits(tiny_handle, x), rtol=1e-4, atol=1e-5)
    moved = 0
    for name, src in source_params(tiny_handle).items():
        student = result.state.tensors[STUDENT + name]
        teacher = result.state.tensors[TEACHER + name]
        torch.testing.assert_close(teacher, 0.9 * src + 0.1 * student, rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(student, src))
    assert moved > 0


def test_stochastic_restoration_rate(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=2)
    src = source_params(tiny_handle)
    full = COTTA.step(
        tiny_handle,
        x,
        COTTA.init_state(tiny_handle, CoTTAConfig(rst=1.0, ap=0.0)),
        CoTTAConfig(rst=1.0, ap=0.0),
    )
    for name, value in src.items():
        assert torch.equal(full.state.tensors[STUDENT + name], value), name
    cfg = CoTTAConfig(rst=0.3, ap=0.0, lr=1e-2)
    none = CoTTAConfig(rst=0.0, ap=0.0, lr=1e-2)
    restored = COTTA.step(tiny_handle, x, COTTA.init_state(tiny_handle, cfg), cfg).state
    free = COTTA.step(tiny_handle, x, COTTA.init_state(tiny_handle, none), none).state
    hits = total = 0
    for name, value in src.items():
        changed = free.tensors[STUDENT + name] != value  # weights the update moved
        back = restored.tensors[STUDENT + name] == value
        hits += int((changed & back).sum())
        total += int(changed.sum())
    assert total > 5000
    assert abs(hits / total - 0.3) < 0.03, hits / total


def test_augmentation_averaging_below_the_anchor_threshold(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=3)
    cfg = CoTTAConfig(ap=1.0, n_augmentations=2)
    result = COTTA.step(tiny_handle, x, COTTA.init_state(tiny_handle, cfg), cfg)
    assert result.state.meta["augmented"] is True
    assert not torch.allclose(result.logits, _norm_logits(tiny_handle, x), atol=1e-3)


def test_state_round_trip_repeats_the_step_and_predicts_with_the_teacher(tiny_handle: ModelHandle) -> None:
    cfg = CoTTAConfig(ap=1.0, n_augmentations=2, lr=1e-2, teacher_momentum=0.5)
    first = COTTA.step(tiny_handle, make_batch(8, seed=4), COTTA.init_state(tiny_handle, cfg), cfg)
    restored = state_from_bytes(state_to_bytes(first.state))
    assert_states_equal(first.state, restored)
    a = COTTA.step(tiny_handle, make_batch(8, seed=5), first.state, cfg)
    b = COTTA.step(tiny_handle, make_batch(8, seed=5), restored, cfg)
    assert_states_equal(a.state, b.state)
    # adapt=false: the teacher's plain prediction, which has moved away from the source's.
    frozen = COTTA.step(tiny_handle, make_batch(8, seed=6), first.state, cfg, adapt=False)
    assert_states_equal(frozen.state, first.state)
    assert not torch.allclose(frozen.logits, _norm_logits(tiny_handle, make_batch(8, seed=6)), atol=1e-4)
    with pytest.raises(adapters.BatchTooSmallError):
        COTTA.step(tiny_handle, make_batch(1, seed=7), first.state, cfg)
