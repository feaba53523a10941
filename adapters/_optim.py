"""Functional SGD and Adam over dicts of tensors: (params, grads, state) in, (params, state) out.

They follow torch.optim.SGD / torch.optim.Adam (no amsgrad, L2 weight decay added to the gradient)
so that an optimiser's moments can live in a stream's stored state instead of inside an object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from adapters.base import StrategyConfig

OPT_PREFIX = "opt."


class OptimConfig(StrategyConfig):
    """Optimiser hyper-parameters shared by the gradient strategies."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=1.0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        # The same rule as torch.optim.SGD: Nesterov needs momentum and no dampening.
        if self.optimizer == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        return self


def init_optim_state(params: Mapping[str, Tensor], cfg: OptimConfig) -> dict[str, Tensor]:
    """Zero moments for every parameter, keyed `opt.<moment>.<param>`."""
    moments = ("exp_avg", "exp_avg_sq") if cfg.optimizer == "adam" else ("momentum_buffer",)
    if cfg.optimizer == "sgd" and cfg.momentum == 0:
        moments = ()
    return {
        f"{OPT_PREFIX}{m}.{name}": p.detach().new_zeros(p.shape)
        for name, p in params.items()
        for m in moments
    }


def optim_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    opt_state: Mapping[str, Tensor],
    step: int,
    cfg: OptimConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimiser step. `step` is the number of steps already taken (0 for the first)."""
    if cfg.optimizer == "adam":
        return _adam(params, grads, opt_state, step + 1, cfg)
    return _sgd(params, grads, opt_state, step, cfg)


def _adam(params, grads, state, t: int, cfg: OptimConfig):  # type: ignore[no-untyped-def]
    new_params: dict[str, Tensor] = {}
    new_state: dict[str, Tensor] = {}
    bc1 = 1 - cfg.beta1**t
    bc2_sqrt = math.sqrt(1 - cfg.beta2**t)
    for name, p in params.items():
        p = p.detach()
        g = grads[name]
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m = state[f"{OPT_PREFIX}exp_avg.{name}"] * cfg.beta1 + g * (1 - cfg.beta1)
        v = state[f"{OPT_PREFIX}exp_avg_sq.{name}"] * cfg.beta2 + g * g * (1 - cfg.beta2)
        denom = v.sqrt() / bc2_sqrt + cfg.adam_eps
        new_params[name] = p - (cfg.lr / bc1) * m / denom
        new_state[f"{OPT_PREFIX}exp_avg.{name}"] = m
        new_state[f"{OPT_PREFIX}exp_avg_sq.{name}"] = v
    return new_params, new_state


def _sgd(params, grads, state, step: int, cfg: OptimConfig):  # type: ignore[no-untyped-def]
    new_params: dict[str, Tensor] = {}
    new_state: dict[str, Tensor] = {}
    for name, p in params.items():
        p = p.detach()
        g = grads[name]
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        if cfg.momentum:
            key = f"{OPT_PREFIX}momentum_buffer.{name}"
            # torch.optim.SGD starts the buffer at the first gradient (no dampening on step 1).
            buf = g.clone() if step == 0 else state[key] * cfg.momentum + g * (1 - cfg.dampening)
            new_state[key] = buf
            g = g + cfg.momentum * buf if cfg.nesterov else buf
        new_params[name] = p - cfg.lr * g
    return new_params, new_state
