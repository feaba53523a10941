"""Gradient plumbing shared by the updaters (`tent`, `eata`/`eta`, `sar`): which BN affine parameters
train, fresh autograd leaves for them, their initial state, and one optimiser step over the stored state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step
from adapters.base import AdaptationState, ModelHandle


def trainable_names(handle: ModelHandle, frozen_substrings: Sequence[str] = ()) -> list[str]:
    return [n for n in handle.affine_names() if not any(s in n for s in frozen_substrings)]


def leaf_params(state: AdaptationState, names: Sequence[str]) -> dict[str, Tensor]:
    """Fresh autograd leaves for the adapted parameters (the stored tensors are never modified)."""
    return {n: state.tensors[n].detach().requires_grad_(True) for n in names}


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
        params, dict(zip(params, grads, strict=True)), _opt_state_of(state), step, cfg
    )
    return {**new_params, **new_opt}, {"opt_steps": step + 1}


def _opt_state_of(state: AdaptationState) -> dict[str, Tensor]:
    return {k: v for k, v in state.tensors.items() if k.startswith(OPT_PREFIX)}
