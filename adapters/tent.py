"""`tent`: entropy minimisation on BN affine parameters over test-batch statistics (docs/ALGORITHMS.md §4).

Loss = mean softmax entropy of the batch; one optimiser step per batch; the returned prediction is
that of the forward pass used for the loss (pre-update parameters). Defaults: CIFAR-10-C setting
(Adam, lr 1e-3); the ImageNet-C setting is optimizer="sgd", lr=2.5e-4, momentum=0.9.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from adapters import losses
from adapters._grad import apply_gradients, init_affine_state, leaf_params
from adapters._optim import OptimConfig
from adapters._strategy import ComposedStrategy, Forward, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, ModelHandle
from adapters.registry import register_strategy
from adapters.source import BatchStats
from adapters.unmix_tns import UnMixStats

SUMMARY = "entropy minimisation of BN affine parameters"


class TentConfig(OptimConfig):
    """Tent's hyper-parameters are the optimiser's, and the optional confidence filter."""

    confidence_filter: bool = Field(
        False,
        description=(
            "open-set filter ('wisdom of crowds'): drop samples whose confidence in the source model's "
            "predicted class fell below the source model's (one extra forward per step)"
        ),
    )


class TentUpdater:
    name = "tent"
    config_cls = TentConfig
    autocast_ok = True
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: TentConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return init_affine_state(handle, cfg, handle.affine_names()), {"opt_steps": 0}

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: TentConfig, forward: Forward
    ) -> UpdateOutcome:
        affine = {k: state.tensors[k] for k in handle.affine_names()}
        params = leaf_params(state, handle.affine_names())
        n = x.shape[0]
        with torch.enable_grad():
            logits, plan = forward(x, {**affine, **params}, update_stats=True, record=True)
            ent = losses.softmax_entropy(logits)
            used = n
            if not cfg.confidence_filter:
                loss = ent.mean()
            else:
                kept, used = confidence_filter(handle, x, logits, forward)
                if used == 0:
                    return UpdateOutcome(logits, plan, {}, {}, used=0, filtered=n)
                loss = torch.where(kept, ent, 0).sum() / used
            grads = torch.autograd.grad(loss, list(params.values()))
        tensors, meta = apply_gradients(state, params, grads, cfg)
        return UpdateOutcome(
            logits, plan, tensors, meta, used=used, filtered=n - used, updated=True, loss=loss.detach()
        )


def confidence_filter(handle: ModelHandle, x: Tensor, logits: Tensor, forward: Forward) -> tuple[Tensor, int]:
    """(mask, count) of the samples the open-set confidence filter keeps: a forward of the source affine
    parameters under the same normaliser gives the reference confidences (docs/ALGORITHMS.md §10)."""
    with torch.no_grad():
        source_logits, _ = forward(x, handle.source_affine(), update_stats=False, record=False)
    kept = losses.confidence_kept(logits.detach(), source_logits)
    return kept, int(kept.sum())


@register_strategy
def tent() -> ComposedStrategy:
    return ComposedStrategy(
        "tent", f"{SUMMARY} (test-batch statistics)", BatchStats(required=False), TentUpdater()
    )


@register_strategy
def unmix_tns_tent() -> ComposedStrategy:
    return ComposedStrategy(
        "unmix_tns+tent", f"{SUMMARY} over UnMix-TNS statistics", UnMixStats(), TentUpdater()
    )
