"""The functional optimisers follow torch.optim.SGD / torch.optim.Adam step for step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step

STEPS = 5

CONFIGS: list[dict[str, Any]] = [
    {"optimizer": "adam"},
    {"optimizer": "adam", "lr": 0.05, "beta1": 0.5, "beta2": 0.9, "adam_eps": 1e-3},
    {"optimizer": "adam", "weight_decay": 0.1},
    {"optimizer": "sgd", "momentum": 0.0},
    {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.05},
    {"optimizer": "sgd", "momentum": 0.9},
    {"optimizer": "sgd", "momentum": 0.9, "nesterov": True},
    {"optimizer": "sgd", "momentum": 0.8, "dampening": 0.3},
    {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "lr": 0.1},
    {"optimizer": "sgd", "momentum": 0.5, "dampening": 0.5, "weight_decay": 0.2},
]


def _torch_optimizer(params: list[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            foreach=False,
        )
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        dampening=cfg.dampening,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )


def _problem(seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7,), "a.bias": (7,), "b.weight": (3, 4)}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    grads = [
        {k: torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2) for k, s in shapes.items()}
        for i in range(STEPS)
    ]
    return params, grads


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_functional_optimizer_matches_torch_optim(overrides: dict[str, Any]) -> None:
    cfg = OptimConfig(**overrides)
    params, grads = _problem(seed=len(str(overrides)))
    torch_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    reference = _torch_optimizer(list(torch_params.values()), cfg)
    state = init_optim_state(params, cfg)
    for step, g in enumerate(grads):
        old_params, old_state = params, state
        before = {k: v.clone() for k, v in params.items()}
        state_before = {k: v.clone() for k, v in state.items()}
        params, state = optim_step(params, g, state, step, cfg)
        # Pure: the inputs of a step are never modified in place.
        for k, v in before.items():
            assert torch.equal(old_params[k], v)
        for k, v in state_before.items():
            assert torch.equal(old_state[k], v)
        for k, p in torch_params.items():
            p.grad = g[k].clone()
        reference.step()
        for k, p in torch_params.items():
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-14)
    _assert_moments_match(state, reference, torch_params, cfg)


def _assert_moments_match(
    state: dict[str, torch.Tensor],
    reference: torch.optim.Optimizer,
    torch_params: dict[str, torch.Tensor],
    cfg: OptimConfig,
) -> None:
    moments = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",) if cfg.momentum else ()}
    expected_keys = {f"{OPT_PREFIX}{m}.{k}" for k in torch_params for m in moments[cfg.optimizer]}
    assert set(state) == expected_keys
    for key in expected_keys:
        moment, _, name = key[len(OPT_PREFIX) :].partition(".")
        torch.testing.assert_close(
            state[key], reference.state[torch_params[name]][moment], rtol=1e-12, atol=1e-14
        )


def test_inputs_are_not_modified() -> None:
    params, grads = _problem(seed=3)
    cfg = OptimConfig(optimizer="sgd", momentum=0.9)
    state = init_optim_state(params, cfg)
    params_copy = {k: v.clone() for k, v in params.items()}
    new_params, state = optim_step(params, grads[0], state, 0, cfg)
    state_copy = {k: v.clone() for k, v in state.items()}
    optim_step(new_params, grads[1], state, 1, cfg)
    for k, v in params_copy.items():
        assert torch.equal(params[k], v)
    for k, v in state_copy.items():
        assert torch.equal(state[k], v)


def test_init_state_is_zero_moments_per_parameter() -> None:
    params, _ = _problem(seed=4)
    adam = init_optim_state(params, OptimConfig(optimizer="adam"))
    assert set(adam) == {f"opt.{m}.{k}" for k in params for m in ("exp_avg", "exp_avg_sq")}
    assert all(
        torch.count_nonzero(v) == 0 and v.shape == params[k.split(".", 2)[2]].shape for k, v in adam.items()
    )
    assert init_optim_state(params, OptimConfig(optimizer="sgd", momentum=0.0)) == {}
