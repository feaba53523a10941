"""`tent`: entropy minimisation on BN affine parameters over test-batch statistics (docs/ALGORITHMS.md §4).

Loss = mean softmax entropy of the batch; one optimiser step per batch; the returned prediction is
that of the forward pass used for the loss (pre-update parameters). Defaults: CIFAR-10-C setting
(Adam, lr 1e-3); the ImageNet-C setting is optimizer="sgd", lr=2.5e-4, momentum=0.9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adapters import losses
from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step
from adapters._strategy import Forward, UpdateOutcome
from adapters.base import AdaptationState, ModelHandle


class TentConfig(OptimConfig):
    """Tent's hyper-parameters are the optimiser's."""


def trainable_names(handle: ModelHandle, frozen_substrings: Sequence[str] = ()) -> list[str]:
    return [n for n in handle.affine_names() if not any(s in n for s in frozen_substrings)]


def leaf_params(state: AdaptationState, names: Sequence[str]) -> dict[str, Tensor]:
    """Fresh autograd leaves for the adapted parameters (the stored tensors are never modified)."""
    return {n: state.tensors[n].detach().requires_grad_(True) for n in names}


def opt_state_of(state: AdaptationState) -> dict[str, Tensor]:
    return {k: v for k, v in state.tensors.items() if k.startswith(OPT_PREFIX)}


def init_affine_state(handle: ModelHandle, cfg: OptimConfig, names: Sequence[str]) -> dict[str, Tensor]:
    affine = {k: v.detach().clone() for k, v in handle.source_affine().items()}
    return {**affine, **init_optim_state({n: affine[n] for n in names}, cfg)}


def apply_gradients(
    state: AdaptationState,
    params: Mapping[str, Tensor],
    grads: Sequence[Tensor],
    cfg: OptimConfig,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One functional optimiser step; returns the changed tensors and meta."""
    step = int(state.meta.get("opt_steps", 0))
    new_params, new_opt = optim_step(
        params, dict(zip(params, grads, strict=True)), opt_state_of(state), step, cfg
    )
    return {**new_params, **new_opt}, {"opt_steps": step + 1}


class TentUpdater:
    name = "tent"
    config_cls = TentConfig
    autocast_ok = True

    def init_state(self, handle: ModelHandle, cfg: TentConfig, forward: Forward, seed: int):  # type: ignore[no-untyped-def]
        return init_affine_state(handle, cfg, handle.affine_names()), {"opt_steps": 0}

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: TentConfig, forward: Forward
    ) -> UpdateOutcome:
        affine = {k: state.tensors[k] for k in handle.affine_names()}
        params = leaf_params(state, handle.affine_names())
        with torch.enable_grad():
            logits, plan = forward(x, {**affine, **params}, True, True)
            loss = losses.softmax_entropy(logits).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
        tensors, meta = apply_gradients(state, params, grads, cfg)
        n = x.shape[0]
        return UpdateOutcome(logits, plan, tensors, meta, used=n, updated=True, loss=loss.detach())
