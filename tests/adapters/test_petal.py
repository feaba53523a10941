"""`petal` (docs/ALGORITHMS.md §17): the prior in closed form, the Laplace posterior, Fisher-based restoration,
the teacher EMA, state round trips and the refusal without source data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters.base import ModelHandle
from adapters.cotta import STUDENT, TEACHER, labelled_source, run, source_params
from adapters.models import ModelSpec, build_handle
from adapters.petal import PETALConfig, posterior_variance, prior_nll, quantile
from adapters.serialization import state_from_bytes, state_to_bytes

from ._reference import assert_states_equal, make_batch

PETAL = adapters.get_strategy("petal")
SMALL = {"posterior_size": 16, "posterior_batch_size": 8, "n_augmentations": 2}


def _cfg(**kw: object) -> PETALConfig:
    return PETALConfig(**{**SMALL, **kw})  # type: ignore[arg-type]


def test_defaults_are_the_cifar10_c_setting() -> None:
    cfg = PETALConfig()
    assert (cfg.optimizer, cfg.lr, cfg.teacher_momentum, cfg.ap, cfg.n_augmentations) == (
        "adam",
        1e-3,
        0.999,
        0.92,
        32,
    )
    assert (cfg.perc, cfg.spw, cfg.rst) == (0.03, 1e-9, 0.0)


def test_quantile_interpolates_like_numpy() -> None:
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.03, 0.5, 0.977, 1.0):
        assert float(quantile(values, q)) == pytest.approx(float(torch.quantile(values, q)), abs=1e-6)


def test_prior_nll_in_closed_form() -> None:
    gen = torch.Generator().manual_seed(1)
    student = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    mean = {k: torch.randn(v.shape, generator=gen) for k, v in student.items()}
    var = {k: torch.rand(v.shape, generator=gen) + 0.1 for k, v in student.items()}
    expected = sum(float(((student[k] - mean[k]) ** 2 / (var[k] + 1e-6)).sum()) for k in student) / 2
    assert float(prior_nll(student, mean, var)) == pytest.approx(expected, rel=1e-5)


def test_posterior_variance_is_the_laplace_approximation(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(prior_samples=100)
    var = posterior_variance(tiny_handle, cfg, seed=0)
    src = source_params(tiny_handle)
    images, labels = labelled_source(tiny_handle, 16, 0, 8)
    fisher = {n: torch.zeros_like(p) for n, p in src.items()}
    for i in (0, 8):
        params = {n: p.clone().requires_grad_(True) for n, p in src.items()}
        loss = F.cross_entropy(run(tiny_handle, params, images[i : i + 8])[0], labels[i : i + 8])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            fisher[n] += 8 * g.square() / 2
    assert set(var) == set(src)
    for n in src:
        torch.testing.assert_close(var[n], 1 / (100 * fisher[n] + 1), rtol=1e-4, atol=1e-7)
        assert bool((var[n] > 0).all() and (var[n] <= 1).all())
    # Memoised: a second stream gets the same tensors without recomputing.
    assert posterior_variance(tiny_handle, cfg, seed=0)[n] is var[n]


def test_fisher_restoration_resets_the_lowest_gradient_fraction(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=2)
    src = source_params(tiny_handle)
    free_cfg, cfg = _cfg(perc=0.0, ap=0.0, lr=1e-2), _cfg(perc=0.25, ap=0.0, lr=1e-2)
    free = PETAL.step(tiny_handle, x, PETAL.init_state(tiny_handle, free_cfg), free_cfg).state
    restored = PETAL.step(tiny_handle, x, PETAL.init_state(tiny_handle, cfg), cfg).state
    back = total = kept_teacher = 0
    for name, value in src.items():
        s_free, s_rst = free.tensors[STUDENT + name], restored.tensors[STUDENT + name]
        reset = (s_rst == value) & (s_free != value)
        back += int(reset.sum())
        total += value.numel()
        # Unrestored weights are the free step's; the teacher is the EMA of the unrestored student.
        assert torch.equal(s_rst[~reset], s_free[~reset]), name
        kept_teacher += int(torch.equal(restored.tensors[TEACHER + name], free.tensors[TEACHER + name]))
    assert kept_teacher == len(src)
    # 25 % of all weights have the lowest squared gradients (ties at zero gradient are kept as they are).
    assert 0.15 < back / total <= 0.25 + 1e-3, back / total


def test_the_prior_pulls_the_student_towards_the_source(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=3)
    src = source_params(tiny_handle)
    # SGD so that the step is proportional to the gradient (Adam normalises the prior's term away).
    base = {"perc": 0.0, "ap": 0.0, "optimizer": "sgd", "lr": 1e-2, "momentum": 0.0}
    a_cfg, b_cfg = _cfg(spw=0.0, **base), _cfg(spw=1e-4, **base)
    first = PETAL.step(tiny_handle, x, PETAL.init_state(tiny_handle, a_cfg), a_cfg).state
    # A student well away from the source (one entropy step on this tiny model moves it by ~1e-7, where the
    # prior's pull would be float noise): every weight offset by 1 %.
    gen = torch.Generator().manual_seed(0)
    moved = {
        STUDENT + n: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=gen) for n, v in src.items()
    }
    first = first.with_updates(moved)
    # One more step with and without the prior: the prior's step ends closer to the source.
    plain = PETAL.step(tiny_handle, make_batch(8, seed=4), first, a_cfg).state
    pulled = PETAL.step(tiny_handle, make_batch(8, seed=4), first, b_cfg).state

    def distance(state: adapters.AdaptationState) -> float:
        return sum(float((state.tensors[STUDENT + n] - v).double().square().sum()) for n, v in src.items())

    assert distance(pulled) < distance(plain) * (1 - 1e-4), (distance(pulled), distance(plain))


def test_state_round_trip_repeats_the_step(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(ap=1.0, lr=1e-2, teacher_momentum=0.5)
    first = PETAL.step(tiny_handle, make_batch(8, seed=5), PETAL.init_state(tiny_handle, cfg), cfg)
    restored = state_from_bytes(state_to_bytes(first.state))
    assert_states_equal(first.state, restored)
    a = PETAL.step(tiny_handle, make_batch(8, seed=6), first.state, cfg)
    b = PETAL.step(tiny_handle, make_batch(8, seed=6), restored, cfg)
    assert_states_equal(a.state, b.state)
    assert not any(k.startswith("petal.variance") for k in first.state.tensors)  # a model constant, not state
    with pytest.raises(adapters.BatchTooSmallError):
        PETAL.step(tiny_handle, make_batch(1, seed=7), first.state, cfg)


def test_a_model_without_source_data_is_refused_unless_the_prior_is_off(tiny_spec: ModelSpec) -> None:
    handle = build_handle(tiny_spec.model_copy(update={"source_data": None}))
    with pytest.raises(adapters.IncompatibleModelError, match="source data"):
        PETAL.init_state(handle, _cfg())
    state = PETAL.init_state(handle, _cfg(spw=0.0))
    assert (
        PETAL.step(handle, make_batch(8, seed=8), state, _cfg(spw=0.0, ap=0.0)).state.meta["opt_steps"] == 1
    )
