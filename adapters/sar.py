"""`sar`: sharpness-aware, reliable entropy minimisation with model recovery (docs/ALGORITHMS.md §6).

Per batch: entropy filter S1 (E < E0); SAM ascent e = rho g/||g|| on the filtered mean entropy; second
forward at theta + e, filter S2 within S1; SGD step at theta with the gradient at theta + e. An EMA of
the second loss below the reset threshold signals collapse and resets parameters and optimiser.

Reset threshold (`reset_criterion`): "relative" (default) is `reset_fraction * ln C`, with the fraction
0.2 / ln 1000 = 0.029, i.e. exactly the reference's 0.2 nats on the 1000-class ImageNet it was tuned on,
and scaled with ln C like the entropy margin E0 = 0.4 ln C (the threshold stays 7.2 % of E0). On
10 classes it is 0.067 nats. "reference" is the absolute `reset_constant` (0.2 nats), which on a
10-class model lies above the filtered loss from the first batch and so resets at every step.
When S1 or S2 is empty the step is skipped entirely (the momentum buffer would otherwise still move).
Defaults: the CIFAR-10-C benchmark setting (SGD lr 1e-3, momentum 0.9); ImageNet ResNet-50 uses 2.5e-4.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from adapters import losses
from adapters._grad import apply_gradients, init_affine_state, leaf_params, trainable_names
from adapters._optim import OptimConfig
from adapters._strategy import ComposedStrategy, Forward, StatPlan, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, ModelHandle
from adapters.registry import register_strategy
from adapters.source import BatchStats
from adapters.unmix_tns import UnMixStats

SUMMARY = "sharpness-aware reliable entropy minimisation with model recovery"
# The reference's absolute 0.2 nats as a share of ln C at the 1000 classes of ImageNet, its tuning set.
RESET_FRACTION = 0.2 / math.log(1000)


class SARConfig(OptimConfig):
    optimizer: Literal["adam", "sgd"] = "sgd"
    e_margin: float = Field(0.4, gt=0, le=1, description="E0 = e_margin * ln(num_classes)")
    rho: float = Field(0.05, gt=0, description="SAM neighbourhood radius")
    reset_criterion: Literal["relative", "reference"] = Field(
        "relative",
        description=(
            "recovery threshold: 'relative' = reset_fraction * ln(num_classes); 'reference' = the "
            "absolute reset_constant of the reference"
        ),
    )
    reset_fraction: float = Field(
        RESET_FRACTION, ge=0, description="relative criterion: reset below this fraction of ln(num_classes)"
    )
    reset_constant: float = Field(
        0.2, ge=0, description="reference criterion: reset when the EMA of the loss falls below this (nats)"
    )
    ema_momentum: float = Field(0.9, ge=0, lt=1)
    frozen_layers: tuple[str, ...] | None = Field(
        None,
        description=(
            "normalisation layers whose name contains one of these stay frozen; default (null): the "
            "model's declared top modules (`top_modules` of its spec; ResNets: layer4, ViTs: the last "
            "three blocks and the final norm)"
        ),
    )


class SARUpdater:
    name = "sar"
    config_cls = SARConfig
    # The reference keeps SAR out of mixed precision (docs/ALGORITHMS.md §6): its forwards stay float32.
    autocast_ok = False
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: SARConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return init_affine_state(handle, cfg, _trainable(handle, cfg)), {
            "opt_steps": 0,
            "loss_ema": None,
        }

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: SARConfig, forward: Forward
    ) -> UpdateOutcome:
        names = _trainable(handle, cfg)
        affine = {k: state.tensors[k] for k in handle.affine_names()}
        params = leaf_params(state, names)
        e0 = losses.entropy_margin(cfg.e_margin, handle.num_classes)
        with torch.enable_grad():
            logits, plan = forward(x, {**affine, **params}, update_stats=True, record=True)
            ent = losses.softmax_entropy(logits)
            s1 = ent.detach() < e0
            # Two host synchronisations before the result, one per filter: an empty filter skips the step.
            # Masked means (`where`, so dropped samples cannot turn the loss into nan) instead of boolean
            # indexing, which would synchronise to learn the row count.
            n1 = int(s1.sum())
            if n1 == 0:
                return UpdateOutcome(logits, plan, {}, {}, used=0, filtered=x.shape[0])
            grads = torch.autograd.grad(torch.where(s1, ent, 0).sum() / n1, list(params.values()))
            scale = cfg.rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
            ascent = torch._foreach_add(
                [p.detach() for p in params.values()], torch._foreach_mul(grads, scale)
            )
            perturbed = {n: e.requires_grad_(True) for n, e in zip(params, ascent, strict=True)}
            # Like the reference, the second pass sees the whole batch (same BN statistics), then filters.
            logits2, _ = forward(x, {**affine, **perturbed}, update_stats=False, record=False)
            ent2 = losses.softmax_entropy(logits2)
            s2 = s1 & (ent2.detach() < e0)
            loss2_sum = torch.where(s2, ent2, 0).sum()
            # The loss reaches the host with the count: it drives the recovery decision.
            n2, loss2 = torch.stack([s2.sum().float(), loss2_sum.detach()]).tolist()
            n2 = int(n2)
            if n2 == 0:
                return UpdateOutcome(logits, plan, {}, {}, used=0, filtered=x.shape[0])
            grads2 = torch.autograd.grad(loss2_sum / n2, list(perturbed.values()))
        tensors, meta = apply_gradients(state, params, grads2, cfg)
        return self._recover(handle, state, cfg, logits, plan, tensors, meta, loss2 / n2, n2, x.shape[0])

    def _recover(
        self,
        handle: ModelHandle,
        state: AdaptationState,
        cfg: SARConfig,
        logits: Tensor,
        plan: StatPlan,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        loss: float,
        n2: int,
        n: int,
    ) -> UpdateOutcome:
        prev = state.meta.get("loss_ema")
        ema = loss if prev is None else cfg.ema_momentum * prev + (1 - cfg.ema_momentum) * loss
        meta["loss_ema"] = ema
        if ema < reset_threshold(cfg, handle.num_classes):
            # Collapse to trivial confident solutions: back to the initial parameters and optimiser.
            tensors = init_affine_state(handle, cfg, _trainable(handle, cfg))
            meta = {"opt_steps": 0, "loss_ema": None}
            return UpdateOutcome(
                logits, plan, tensors, meta, used=n2, filtered=n - n2, updated=True, loss=loss, reset=True
            )
        return UpdateOutcome(logits, plan, tensors, meta, used=n2, filtered=n - n2, updated=True, loss=loss)


def reset_threshold(cfg: SARConfig, num_classes: int) -> float:
    """The loss EMA below which SAR resets (nats): `reset_fraction * ln C` or the absolute `reset_constant`."""
    if cfg.reset_criterion == "reference":
        return cfg.reset_constant
    return cfg.reset_fraction * math.log(num_classes)


def _trainable(handle: ModelHandle, cfg: SARConfig) -> list[str]:
    """The affine parameters SAR trains: all but those of the top of the network (docs/ALGORITHMS.md §6)."""
    if cfg.frozen_layers is not None:
        return trainable_names(handle, cfg.frozen_layers)
    return [n for n in handle.affine_names() if not _under(n, handle.top_modules)]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@register_strategy
def sar() -> ComposedStrategy:
    return ComposedStrategy(
        "sar", f"{SUMMARY} (test-batch statistics)", BatchStats(required=False), SARUpdater()
    )


@register_strategy
def unmix_tns_sar() -> ComposedStrategy:
    return ComposedStrategy(
        "unmix_tns+sar", f"{SUMMARY} over UnMix-TNS statistics", UnMixStats(), SARUpdater()
    )
