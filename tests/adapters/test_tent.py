"""`tent` against a deep-copied torch model trained by torch.optim on the mean entropy (docs/ALGORITHMS.md §4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import adapters
from adapters.base import AdaptationState, ModelHandle
from adapters.tent import TentConfig

from ._reference import (
    affine_leaves,
    assert_snapshot_equal,
    batch_stat_bn,
    entropy,
    make_batch,
    model_snapshot,
    replace_bn,
)

STRATEGY = adapters.get_strategy("tent")
assert STRATEGY.config_cls is TentConfig
STEPS = 3

OPTIMIZERS: list[dict[str, Any]] = [
    {},  # CIFAR-10-C default: Adam lr 1e-3
    {"lr": 1e-2, "weight_decay": 1e-3},
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},  # the ImageNet-C setting
]


def _torch_optimizer(params: list[Tensor], cfg: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def _reference_tent(
    handle: ModelHandle, batches: list[Tensor], cfg: Any
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Logits of every batch and the BN affine parameters after every step."""
    model, bns = replace_bn(handle, batch_stat_bn)
    params = affine_leaves(bns)
    optimizer = _torch_optimizer(list(params.values()), cfg)
    logits_seen, params_seen = [], []
    for x in batches:
        logits = model(x)
        loss = entropy(logits).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logits_seen.append(logits.detach())
        params_seen.append({k: v.detach().clone() for k, v in params.items()})
    return logits_seen, params_seen


def _run(handle: ModelHandle, batches: list[Tensor], cfg: Any) -> tuple[list[Tensor], list[AdaptationState]]:
    state = STRATEGY.init_state(handle, cfg)
    logits, states = [], []
    for x in batches:
        result = STRATEGY.step(handle, x, state, cfg)
        assert result.stats.updated and result.stats.used == x.shape[0]
        state = result.state
        logits.append(result.logits)
        states.append(state)
    return logits, states


@pytest.mark.parametrize("overrides", OPTIMIZERS, ids=["adam", "adam-wd", "sgd-nesterov"])
def test_update_equals_torch_reference(tiny_handle: ModelHandle, overrides: dict[str, Any]) -> None:
    cfg = TentConfig(**overrides)
    batches = [make_batch(6, seed=s) for s in range(STEPS)]
    ref_logits, ref_params = _reference_tent(tiny_handle, batches, cfg)
    logits, states = _run(tiny_handle, batches, cfg)
    source = tiny_handle.source_affine()
    for step in range(STEPS):
        # The returned prediction is the one of the forward used for the loss (pre-update parameters).
        torch.testing.assert_close(logits[step], ref_logits[step], rtol=1e-5, atol=2e-5)
        for key, expected in ref_params[step].items():
            torch.testing.assert_close(states[step].tensors[key], expected, rtol=1e-5, atol=1e-6)
    moved = max(float((states[-1].tensors[k] - source[k]).abs().max()) for k in source)
    assert moved > 10 * cfg.lr * 0.1, "the parameters must move enough for the comparison to mean something"


def test_first_prediction_uses_initial_parameters(tiny_handle: ModelHandle) -> None:
    cfg = TentConfig(lr=0.1)
    x = make_batch(6, seed=5)
    state = STRATEGY.init_state(tiny_handle, cfg)
    first = STRATEGY.step(tiny_handle, x, state, cfg)
    norm = adapters.get_strategy("norm")
    expected = norm.step(tiny_handle, x, norm.init_state(tiny_handle, norm.config_cls()), norm.config_cls())
    torch.testing.assert_close(first.logits, expected.logits, rtol=0, atol=1e-6)
    second = STRATEGY.step(tiny_handle, x, first.state, cfg)
    assert (second.logits - first.logits).abs().max() > 1e-3


def test_only_affine_parameters_and_moments_change(tiny_handle: ModelHandle) -> None:
    cfg = TentConfig()
    state = STRATEGY.init_state(tiny_handle, cfg)
    affine = set(tiny_handle.affine_names())
    moments = {f"opt.{m}.{k}" for k in affine for m in ("exp_avg", "exp_avg_sq")}
    assert set(state.tensors) == affine | moments
    for key, value in tiny_handle.source_affine().items():
        assert torch.equal(state.tensors[key], value)
    result = STRATEGY.step(tiny_handle, make_batch(6, seed=6), state, cfg)
    assert set(result.state.tensors) == set(state.tensors)
    assert all(not torch.equal(result.state.tensors[k], state.tensors[k]) for k in affine)
    assert result.state.meta["opt_steps"] == 1 and result.state.meta["steps"] == 1
    assert result.state.meta["samples_seen"] == 6 and result.state.meta["updates"] == 1
    # The input state is a value: the step did not modify it.
    for key, value in tiny_handle.source_affine().items():
        assert torch.equal(state.tensors[key], value)


def test_shared_model_is_bit_identical_after_steps(tiny_handle: ModelHandle) -> None:
    cfg = TentConfig(lr=0.05)
    before = model_snapshot(tiny_handle.model)
    layers_before = [(layer.running_mean.clone(), layer.weight.clone()) for layer in tiny_handle.bn_layers]
    _run(tiny_handle, [make_batch(6, seed=s) for s in range(STEPS)], cfg)
    assert_snapshot_equal(before, model_snapshot(tiny_handle.model))
    for (mean, weight), layer in zip(layers_before, tiny_handle.bn_layers, strict=True):
        assert torch.equal(mean, layer.running_mean) and torch.equal(weight, layer.weight)
    assert all(p.grad is None for p in tiny_handle.model.parameters())
