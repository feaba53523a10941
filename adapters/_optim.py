"""Functional SGD and Adam over dicts of tensors: (params, grads, state) in, (params, state) out.

They follow torch.optim.SGD / torch.optim.Adam (no amsgrad, L2 weight decay added to the gradient)
so that an optimiser's moments can live in a stream's stored state instead of inside an object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from adapters.base import StrategyConfig

OPT_PREFIX = "opt."
# What torch's `_foreach_*` kernels take and give (they return lists, typed as tuples).
TensorList = list[Tensor] | tuple[Tensor, ...]


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
    moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq") if cfg.optimizer == "adam" else ("momentum_buffer",)
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


# Both steps use torch's multi-tensor (`_foreach_*`) kernels, as torch.optim does with foreach=True: a
# handful of launches for all BN parameters instead of several per parameter, which matters on a GPU.
# They return new tensors; the state's tensors are never modified in place.


def _with_weight_decay(g: TensorList, p: list[Tensor], weight_decay: float) -> list[Tensor]:
    # Not `alpha=weight_decay`: an alpha that overflows float32 raises, where the product just becomes inf
    # (and the engine then discards the non-finite state, as for any other diverged update).
    return list(torch._foreach_add(g, torch._foreach_mul(p, weight_decay)))


def _adam(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    t: int,
    cfg: OptimConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    names = list(params)
    p = [params[n].detach() for n in names]
    g = [grads[n] for n in names]
    if cfg.weight_decay:
        g = _with_weight_decay(g, p, cfg.weight_decay)
    m = torch._foreach_lerp([state[f"{OPT_PREFIX}exp_avg.{n}"] for n in names], g, 1 - cfg.beta1)
    v = torch._foreach_mul([state[f"{OPT_PREFIX}exp_avg_sq.{n}"] for n in names], cfg.beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - cfg.beta2)
    denom = torch._foreach_div(torch._foreach_sqrt(v), math.sqrt(1 - cfg.beta2**t))
    torch._foreach_add_(denom, cfg.adam_eps)
    new_p = torch._foreach_addcdiv(p, m, denom, value=-cfg.lr / (1 - cfg.beta1**t))
    new_state = {f"{OPT_PREFIX}exp_avg.{n}": x for n, x in zip(names, m, strict=True)}
    new_state.update({f"{OPT_PREFIX}exp_avg_sq.{n}": x for n, x in zip(names, v, strict=True)})
    return dict(zip(names, new_p, strict=True)), new_state


def _sgd(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    step: int,
    cfg: OptimConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    names = list(params)
    p = [params[n].detach() for n in names]
    g: TensorList = [grads[n] for n in names]
    if cfg.weight_decay:
        g = _with_weight_decay(g, p, cfg.weight_decay)
    new_state: dict[str, Tensor] = {}
    if cfg.momentum:
        keys = [f"{OPT_PREFIX}momentum_buffer.{n}" for n in names]
        buf: TensorList
        if step == 0:
            buf = [x.clone() for x in g]  # torch.optim.SGD starts the buffer at the first gradient
        else:
            buf = torch._foreach_mul([state[k] for k in keys], cfg.momentum)
            torch._foreach_add_(buf, g, alpha=1 - cfg.dampening)
        new_state = dict(zip(keys, buf, strict=True))
        g = torch._foreach_add(g, buf, alpha=cfg.momentum) if cfg.nesterov else buf
    new_p = torch._foreach_add(p, g, alpha=-cfg.lr)
    return dict(zip(names, new_p, strict=True)), new_state
