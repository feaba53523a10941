"""Pure loss and prediction-summary functions."""

from __future__ import annotations

import math

from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy -sum p log p, in float32 and without log(0)."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def entropy_margin(factor: float, num_classes: int) -> float:
    """EATA/SAR reliability threshold E0 = factor * ln C."""
    return factor * math.log(num_classes)


def gaussian_symmetric_kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor) -> Tensor:
    """Per-channel symmetric KL, 0.5 * (KL(p||q) + KL(q||p)), between 1-D Gaussians."""
    var_p = var_p.float().clamp_min(1e-8)
    var_q = var_q.float().clamp_min(1e-8)
    d2 = (mu_p.float() - mu_q.float()) ** 2
    return 0.25 * ((var_p + d2) / var_q + (var_q + d2) / var_p - 2.0)


def mean_confidence(logits: Tensor) -> Tensor:
    return logits.float().softmax(1).max(1).values.mean()


def confidence_kept(logits: Tensor, source_logits: Tensor) -> Tensor:
    """The open-set "wisdom of crowds" filter: True where the adapted model is at least as confident as the
    source model in the class the source model predicts (confidence fell after adaptation: dropped)."""
    src = source_logits.float().softmax(1)
    pred = src.argmax(1, keepdim=True)
    now = logits.float().softmax(1).gather(1, pred).squeeze(1)
    return now >= src.gather(1, pred).squeeze(1)
