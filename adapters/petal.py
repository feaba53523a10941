"""`petal`: CoTTA's mean teacher with a Gaussian prior around the source weights and Fisher-based restoration
(PETAL, Brahma & Rai, CVPR 2023; docs/ALGORITHMS.md §17).

Per adapting batch, as `cotta` (teacher target with augmentation averaging below the anchor confidence `ap`,
cross-entropy of the student to it, one Adam step, EMA teacher), with two changes:

1. the loss adds `spw` x 0.5 sum_i (theta_i - theta0_i)^2 / (var_i + 1e-6): the negative log of a diagonal Gaussian
   posterior of the source weights (mean theta0, variance var);
2. instead of CoTTA's random restoration, the weights whose squared gradient of this step (a one-sample
   Fisher estimate) is below its `perc` quantile over all weights return to their source values: the weights
   the current data says least about are the ones reset.

The posterior: PETAL takes it from SWAG over the source training run, which a served model does not have.
Here it is the diagonal Laplace approximation at the source weights: precision = n x F + 1, with F the mean
squared mini-batch gradient of the source cross-entropy times the batch size (a per-sample Fisher
estimate) over `posterior_size` shuffled source images (their labels, or the source model's predictions for
unlabelled source data) and n = `prior_samples` (the size of the
training set it stands for); a unit Gaussian prior keeps the variance finite. It is a function of the
model and the config only, so it is computed once per process (or read from the model's source
artefact, `tta-bench prepare-source --strategies petal`) and not stored in each stream's state.

Defaults: the CIFAR-10-C setting of the PETAL configs (Adam lr 1e-3, teacher momentum 0.999, ap 0.92,
perc 0.03, spw 1e-9, 32 augmentations).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adapters._memo import Memo
from adapters._strategy import ComposedStrategy, Forward
from adapters.base import IncompatibleModelError, ModelHandle
from adapters.cotta import CoTTAConfig, CoTTAUpdater, labelled_source, run, source_params
from adapters.registry import register_strategy
from adapters.source import BatchStats

VARIANCE_PREFIX = "petal.variance."


class PETALConfig(CoTTAConfig):
    rst: float = Field(0.0, ge=0, le=0, description="unused: PETAL restores by the Fisher, not at random")
    perc: float = Field(
        0.03, ge=0, le=1, description="restore the weights whose squared gradient is below this quantile"
    )
    spw: float = Field(1e-9, ge=0, description="weight of the source prior's negative log-likelihood")
    posterior_size: int = Field(512, ge=2, le=50_000, description="labelled source images for the posterior")
    posterior_batch_size: int = Field(64, ge=2, le=1024)
    prior_samples: int = Field(
        50_000, ge=1, description="training-set size n of the Laplace precision n F + 1"
    )


def quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of a flat tensor with linear interpolation between order statistics (any size, unlike
    `torch.quantile`, which refuses more than 16 M elements)."""
    ordered = torch.sort(values).values
    pos = q * (ordered.numel() - 1)
    low = int(pos)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def prior_nll(
    student: Mapping[str, Tensor], mean: Mapping[str, Tensor], var: Mapping[str, Tensor], damp: float = 1e-6
) -> Tensor:
    """0.5 sum (theta - mean)^2 / (var + damp) over all weights, tensor by tensor: concatenating them would copy
    the network three times per step."""
    total = sum(((p - mean[n]).square() / (var[n] + damp)).sum() for n, p in student.items())
    return 0.5 * torch.as_tensor(total)


def posterior_key(cfg: PETALConfig, seed: int) -> str:
    fields = cfg.model_dump(include={"posterior_size", "posterior_batch_size", "prior_samples"})
    return hashlib.sha256(json.dumps([sorted(fields.items()), seed]).encode()).hexdigest()[:16]


def prepared_prefix(cfg: PETALConfig, seed: int) -> str:
    """Key prefix of a posterior variance in a source artefact (`ModelHandle.prepared`)."""
    return f"{VARIANCE_PREFIX}{posterior_key(cfg, seed)}."


def posterior_variance(handle: ModelHandle, cfg: PETALConfig, seed: int) -> dict[str, Tensor]:
    """The diagonal Laplace variance of every weight (module docs): prepared, memoised or computed."""
    names = [n for n, _ in handle.model.named_parameters()]
    prefix = prepared_prefix(cfg, seed)
    if all(prefix + n in handle.prepared for n in names):  # made by `tta-bench prepare-source`
        return {n: handle.prepared[prefix + n].to(handle.device) for n in names}
    if handle.source_images is None:
        raise IncompatibleModelError(
            f"model {handle.model_id!r} declares no source data, which petal's source posterior needs; "
            "set spw=0 to adapt without the prior"
        )
    key = (handle.fingerprint, str(handle.device), prefix)
    return _VARIANCES.get(key, lambda: _compute_variance(handle, cfg, seed))


def _compute_variance(handle: ModelHandle, cfg: PETALConfig, seed: int) -> dict[str, Tensor]:
    images, labels = labelled_source(handle, cfg.posterior_size, seed, cfg.posterior_batch_size)
    src = source_params(handle)
    acc = {n: torch.zeros_like(p) for n, p in src.items()}
    bs, batches = cfg.posterior_batch_size, 0
    for start in range(0, images.shape[0] - 1, bs):
        batch = images[start : start + bs].to(handle.device)
        target = labels[start : start + bs].to(handle.device)
        params = {n: p.clone().requires_grad_(True) for n, p in src.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(run(handle, params, batch)[0], target)
            grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            acc[n] += g.square() * batch.shape[0]
        batches += 1
    return {n: 1.0 / (cfg.prior_samples * a / max(batches, 1) + 1.0) for n, a in acc.items()}


_VARIANCES: Memo[tuple[str, str, str], dict[str, Tensor]] = Memo(4)


class PETALUpdater(CoTTAUpdater):
    name = "petal"
    config_cls = PETALConfig

    def init_state(
        self, handle: ModelHandle, cfg: CoTTAConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert isinstance(cfg, PETALConfig)
        if cfg.spw > 0:
            posterior_variance(handle, cfg, seed)  # refuses a model without source data now, not mid-stream
        return super().init_state(handle, cfg, forward, seed)

    def extra_loss(
        self,
        handle: ModelHandle,
        student: Mapping[str, Tensor],
        src: Mapping[str, Tensor],
        cfg: Any,
        seed: int,
    ) -> Tensor | float:
        if cfg.spw == 0:
            return 0.0
        return cfg.spw * prior_nll(student, src, posterior_variance(handle, cfg, seed))

    def restore(
        self,
        student: dict[str, Tensor],
        grads: Mapping[str, Tensor],
        src: Mapping[str, Tensor],
        gen: torch.Generator,
        cfg: Any,
    ) -> dict[str, Tensor]:
        """Weights whose squared gradient is below the `perc` quantile of all of them return to the source."""
        if cfg.perc <= 0:
            return student
        fisher = {n: grads[n].square() for n in student}
        threshold = quantile(torch.cat([f.reshape(-1) for f in fisher.values()]), cfg.perc)
        return {n: torch.where(fisher[n] < threshold, src[n], v) for n, v in student.items()}


@register_strategy
def petal() -> ComposedStrategy:
    summary = "mean teacher with a source-posterior prior and Fisher-based restoration (all weights)"
    return ComposedStrategy("petal", summary, BatchStats(required=False), PETALUpdater())
