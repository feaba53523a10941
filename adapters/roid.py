"""`roid`: weight-ensembled, diversity-weighted soft-likelihood-ratio adaptation (docs/ALGORITHMS.md §9).

Per adapting batch, over test-batch statistics, training the normalisation layers' affine parameters:

1. forward; diversity weight w_div = 1 - cos(p_bar, p_i) against a moving average p_bar of the batch mean
   predictions, certainty weight w_cert = -H(p_i), each min-max normalised over the batch; samples with
   w_div below the batch mean of w_div are dropped; the others weigh exp(w_div * w_cert / T);
2. loss = sum over kept samples of w_i * SLR(p_i) / B, with the soft likelihood ratio
   SLR(p) = -sum_c p_c log(p_c / (1 - p_c) + eps) (p clipped at 0.99), plus the consistency term
   sum_i w_i * SCE(f(aug(x_i)), f(x_i)) / B over the kept samples' augmented view (symmetric cross-entropy);
3. one Adam step, then weight ensembling with the source: theta <- m theta + (1 - m) theta_source;
4. the returned prediction is prior-corrected: logits * (prior + s) / (1 + s C), prior = batch mean of
   p, s = max(1/B, 1/C) / max(prior) (as the reference, the factor multiplies the logits).

Defaults: the reference's CIFAR-10-C setting (Adam lr 1e-3, m = 0.99, p_bar momentum 0.9, T = 1/3).
Deviation: B is the request's batch size (the reference divides by its configured 200).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adapters import losses
from adapters._augment import generator_for, tta_augment
from adapters._grad import apply_gradients, init_affine_state, leaf_params
from adapters._optim import OptimConfig
from adapters._strategy import ComposedStrategy, Forward, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, BatchTooSmallError, ModelHandle
from adapters.registry import register_strategy
from adapters.source import BatchStats

PROBS_KEY = "roid.class_probs_ema"


class ROIDConfig(OptimConfig):
    use_weighting: bool = True
    use_prior_correction: bool = True
    use_consistency: bool = True
    momentum_src: float = Field(
        0.99, ge=0, le=1, description="weight ensembling: m theta + (1 - m) theta_src"
    )
    momentum_probs: float = Field(0.9, ge=0, lt=1, description="moving average of the mean predictions")
    temperature: float = Field(1 / 3, gt=0, description="temperature of the sample weights")
    slr_clip: float = Field(0.99, gt=0, lt=1)
    slr_eps: float = Field(1e-5, gt=0)


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Per sample -sum_c p_c log(p_c / (1 - p_c) + eps), with p clipped to [0, clip]."""
    p = logits.float().softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


def symmetric_cross_entropy(x: Tensor, x_ref: Tensor, alpha: float = 0.5) -> Tensor:
    """Per sample -(1 - a) sum softmax(x_ref) log_softmax(x) - a sum softmax(x) log_softmax(x_ref)."""
    x, x_ref = x.float(), x_ref.float()
    return -(1 - alpha) * (x_ref.softmax(1) * x.log_softmax(1)).sum(1) - alpha * (
        x.softmax(1) * x_ref.log_softmax(1)
    ).sum(1)


def prior_correct(logits: Tensor) -> Tensor:
    """The reference's prior correction: logits times the smoothed batch prior of the predictions."""
    n, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / n, 1 / c) / prior.max()
    return logits * ((prior + smooth) / (1 + smooth * c))


def _minmax(v: Tensor) -> Tensor:
    # The reference divides by (max - min) unguarded; a constant vector (e.g. a batch of one) gives 0 here.
    span = v.max() - v.min()
    return torch.where(span > 0, (v - v.min()) / span.clamp_min(1e-12), torch.zeros_like(v))


def sample_weights(logits: Tensor, probs_ema: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(weights, keep): ROID's diversity x certainty weights (0 for dropped samples) and the kept mask."""
    probs = logits.softmax(1)
    w_div = _minmax(1 - F.cosine_similarity(probs_ema[None], probs, dim=1))
    keep = ~(w_div < w_div.mean())
    w_cert = _minmax(-losses.softmax_entropy(logits))
    weights = torch.where(keep, torch.exp(w_div * w_cert / temperature), 0)
    return weights, keep


class ROIDUpdater:
    name = "roid"
    config_cls = ROIDConfig
    autocast_ok = False
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: ROIDConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = init_affine_state(handle, cfg, handle.affine_names())
        tensors[PROBS_KEY] = torch.full((handle.num_classes,), 1 / handle.num_classes, device=handle.device)
        return tensors, {"opt_steps": 0}

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: ROIDConfig, forward: Forward
    ) -> UpdateOutcome:
        names = handle.affine_names()
        params = leaf_params(state, names)
        n = x.shape[0]
        probs_ema = state.tensors[PROBS_KEY]
        with torch.enable_grad():
            logits, plan = forward(x, params, update_stats=True, record=True)
            with torch.no_grad():
                if cfg.use_weighting:
                    weights, keep = sample_weights(logits.detach(), probs_ema, cfg.temperature)
                    new_ema = torch.lerp(
                        probs_ema, logits.detach().softmax(1).mean(0), 1 - cfg.momentum_probs
                    )
                else:
                    weights, keep = (
                        torch.ones(n, device=x.device),
                        torch.ones(n, dtype=torch.bool, device=x.device),
                    )
                    new_ema = probs_ema
            slr = soft_likelihood_ratio(logits, cfg.slr_clip, cfg.slr_eps)
            loss = torch.where(keep, slr * weights, 0).sum() / n
            kept = int(keep.sum())
            if cfg.use_consistency and kept > 0:
                idx = keep.nonzero().squeeze(1)
                seed, step = int(state.meta.get("seed", 0)), int(state.meta.get("steps", 0))
                x_aug = tta_augment(
                    x[idx], generator_for(seed, step, salt=1), padding_mode="reflect", cotta=False
                )
                if kept * x.shape[2] * x.shape[3] >= 2:
                    # A deep layer may still see one value per channel (one kept image at 1x1 there):
                    # then the batch of kept images has no statistics and the consistency term is left out.
                    with contextlib.suppress(BatchTooSmallError):
                        logits_aug, _ = forward(x_aug, params, update_stats=False, record=False)
                        sce = symmetric_cross_entropy(logits_aug, logits[idx])
                        loss = loss + (sce * weights[idx]).sum() / n
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = tuple(
            torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads, strict=True)
        )
        tensors, meta = apply_gradients(state, params, grads, cfg)
        source = handle.source_affine()
        if cfg.momentum_src < 1:
            for k in names:
                tensors[k] = torch.lerp(source[k].float(), tensors[k], cfg.momentum_src)
        tensors[PROBS_KEY] = new_ema
        out = prior_correct(logits.detach()) if cfg.use_prior_correction else logits.detach()
        return UpdateOutcome(
            out, plan, tensors, meta, used=kept, filtered=n - kept, updated=True, loss=loss.detach()
        )


SUMMARY = "weight-ensembled, diversity-weighted soft likelihood ratio with prior correction"


@register_strategy
def roid() -> ComposedStrategy:
    return ComposedStrategy(
        "roid", f"{SUMMARY} (test-batch statistics)", BatchStats(required=False), ROIDUpdater()
    )
