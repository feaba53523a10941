"""`eata` / `eta`: entropy- and redundancy-filtered, reweighted entropy minimisation (docs/ALGORITHMS.md §5).

Per batch: keep samples with entropy < E0 = e_margin * ln C (reliable), then those whose softmax
vector has |cos| < d_margin to the moving average of past predictions (non-redundant); weight each by
exp(E0 - E); add the Fisher (EWC) penalty beta * sum F (theta - theta0)^2; skip the step when no
sample survives. `eta` is EATA with beta = 0 (no Fisher, no source data needed).
Defaults follow the CIFAR-10-C setting of the benchmark reference: d_margin 0.4, beta 1.0, Adam 1e-3.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adapters import losses
from adapters._grad import apply_gradients, init_affine_state, leaf_params
from adapters._memo import Memo
from adapters._optim import OptimConfig
from adapters._strategy import ComposedStrategy, Forward, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, IncompatibleModelError, ModelHandle
from adapters.registry import register_strategy
from adapters.source import BatchStats
from adapters.tent import confidence_filter
from adapters.unmix_tns import UnMixStats

PROBS_KEY = "eata.probs_ema"
FISHER_PREFIX = "eata.fisher."


class EATAConfig(OptimConfig):
    e_margin: float = Field(0.4, gt=0, le=1, description="E0 = e_margin * ln(num_classes)")
    d_margin: float = Field(0.4, ge=0, le=1, description="redundancy threshold on |cos(m, p)|")
    fisher_alpha: float = Field(1.0, ge=0, description="weight beta of the Fisher anti-forgetting penalty")
    fisher_size: int = Field(2000, ge=2, le=50_000, description="clean source images used for the Fisher")
    fisher_batch_size: int = Field(64, ge=2, le=1024)
    probs_momentum: float = Field(0.9, ge=0, lt=1, description="moving-average factor of m")
    confidence_filter: bool = Field(
        False,
        description=(
            "open-set filter ('wisdom of crowds'): also drop samples whose confidence in the source model's "
            "predicted class fell below the source model's (one extra forward per step)"
        ),
    )


class ETAConfig(EATAConfig):
    fisher_alpha: float = Field(0.0, ge=0, le=0, description="ETA has no Fisher penalty")


class EATAUpdater:
    autocast_ok = True
    affine_kinds = AFFINE_KINDS

    def __init__(self, name: str, config_cls: type[EATAConfig]) -> None:
        self.name = name
        self.config_cls = config_cls

    def needs_source_data(self, cfg: EATAConfig) -> bool:
        """The Fisher penalty is computed on the model's source images (ETA has none)."""
        return cfg.fisher_alpha > 0

    def init_state(
        self, handle: ModelHandle, cfg: EATAConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        names = handle.affine_names()
        tensors = init_affine_state(handle, cfg, names)
        tensors[PROBS_KEY] = torch.zeros(handle.num_classes, device=handle.device)
        if cfg.fisher_alpha > 0:
            # The Fisher also depends on the statistics the forward normalises with.
            cache_key = fisher_cache_key(forward, cfg, seed)
            fisher = fisher_diagonal(handle, forward, cfg.fisher_size, cfg.fisher_batch_size, seed, cache_key)
            tensors.update({FISHER_PREFIX + n: f for n, f in fisher.items()})
        return tensors, {"opt_steps": 0, "has_probs": False}

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: EATAConfig, forward: Forward
    ) -> UpdateOutcome:
        names = handle.affine_names()
        params = leaf_params(state, names)
        e0 = losses.entropy_margin(cfg.e_margin, handle.num_classes)
        with torch.enable_grad():
            logits, plan = forward(x, params, update_stats=True, record=True)
            ent = losses.softmax_entropy(logits)
            probs = logits.detach().float().softmax(1)
            reliable = ent.detach() < e0
            selected = reliable
            has_probs = bool(state.meta.get("has_probs", False))
            m = state.tensors[PROBS_KEY]
            if has_probs:
                cos = F.cosine_similarity(m[None], probs, dim=1).abs()
                selected = reliable & (cos < cfg.d_margin)
            if cfg.confidence_filter:
                selected = selected & confidence_filter(handle, x, logits, forward)[0]
            # The step's one host synchronisation before its result: whether any sample survived the
            # filters decides whether there is an update at all. Masks instead of boolean indexing below
            # (indexing would synchronise again to learn the number of rows).
            n_rel, n_sel = (int(c) for c in torch.stack([reliable.sum(), selected.sum()]).tolist())
            new_m, new_has = _update_probs(m, has_probs, probs, (reliable, n_rel), (selected, n_sel), cfg)
            meta: dict[str, Any] = {"has_probs": new_has}
            tensors: dict[str, Tensor] = {PROBS_KEY: new_m}
            loss = None
            if n_sel > 0:
                # The weighted mean over the selected samples; `where`, not a product with the mask, so a
                # non-finite entropy of a dropped sample cannot reach the loss (0 * nan is nan).
                loss = torch.where(selected, ent * torch.exp(e0 - ent.detach()), 0).sum() / n_sel
                if cfg.fisher_alpha > 0:
                    loss = loss + cfg.fisher_alpha * _fisher_penalty(handle, state, params)
                grads = torch.autograd.grad(loss, list(params.values()))
                upd_tensors, upd_meta = apply_gradients(state, params, grads, cfg)
                tensors.update(upd_tensors)
                meta.update(upd_meta)
        return UpdateOutcome(
            logits,
            plan,
            tensors,
            meta,
            used=n_sel,
            filtered=x.shape[0] - n_sel,
            updated=n_sel > 0,
            loss=None if loss is None else loss.detach(),
        )


def _update_probs(
    m: Tensor,
    has: bool,
    probs: Tensor,
    reliable: tuple[Tensor, int],
    selected: tuple[Tensor, int],
    cfg: EATAConfig,
) -> tuple[Tensor, bool]:
    """m starts as the mean of the first reliable predictions, then follows an EMA of selected ones.

    `reliable` and `selected` are (mask, number of True) pairs."""
    if not has:
        if reliable[1]:
            return _masked_mean(probs, *reliable), True
        return m, False
    if selected[1]:
        return cfg.probs_momentum * m + (1 - cfg.probs_momentum) * _masked_mean(probs, *selected), True
    return m, True


def _masked_mean(rows: Tensor, mask: Tensor, count: int) -> Tensor:
    return torch.where(mask[:, None], rows, 0).sum(0) / count


def _fisher_penalty(handle: ModelHandle, state: AdaptationState, params: dict[str, Tensor]) -> Tensor:
    """sum over parameters of F * (theta - theta_0)^2, on the concatenated parameters (a few kernels,
    not several per BN parameter tensor)."""
    source = handle.source_affine()
    theta = torch.cat([p.reshape(-1) for p in params.values()])
    theta0 = torch.cat([source[n].reshape(-1) for n in params])
    fisher = torch.cat([state.tensors[FISHER_PREFIX + n].reshape(-1) for n in params])
    return (fisher * (theta - theta0).square()).sum()


def fisher_diagonal(
    handle: ModelHandle,
    forward: Forward,
    n: int,
    batch_size: int,
    seed: int,
    cache_key: tuple[str, str, str, int],
) -> dict[str, Tensor]:
    """F = mean over mini-batches of the squared gradient of CE(pseudo-label) at the source parameters."""
    if handle.source_images is None:
        raise IncompatibleModelError(
            f"model {handle.model_id!r} declares no source data, which EATA's Fisher penalty needs; "
            "set fisher_alpha=0 or use the `eta` strategy"
        )
    prefix = prepared_prefix(cache_key)
    names = handle.affine_names()
    if all(prefix + k in handle.prepared for k in names):  # made by `tta-bench prepare-source`
        return {k: handle.prepared[prefix + k] for k in names}
    key = (handle.fingerprint, str(handle.device), *cache_key)
    return _FISHERS.get(key, lambda: _compute_fisher(handle, forward, names, n, batch_size, seed))


def _compute_fisher(
    handle: ModelHandle, forward: Forward, names: list[str], n: int, batch_size: int, seed: int
) -> dict[str, Tensor]:
    assert handle.source_images is not None
    images = handle.source_images(n, seed)
    source = handle.source_affine()
    acc = {k: torch.zeros_like(source[k]) for k in names}
    batches = 0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(handle.device)
        if batch.shape[0] < 2:
            break
        params = {k: source[k].detach().clone().requires_grad_(True) for k in names}
        with torch.enable_grad():
            logits, _ = forward(batch, params, update_stats=False, record=False)
            loss = F.cross_entropy(logits.float(), logits.detach().argmax(1))
            grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(names, grads, strict=True):
            acc[k] += g.detach() ** 2
        batches += 1
    return {k: v / max(batches, 1) for k, v in acc.items()}


def prepared_prefix(cache_key: tuple[str, str, str, int]) -> str:
    """Key prefix of a Fisher in a source artefact: a digest of everything the Fisher depends on besides
    the model (the normaliser, the config, the seed)."""
    digest = hashlib.sha256(json.dumps(list(cache_key)).encode()).hexdigest()[:16]
    return f"{FISHER_PREFIX}{digest}."


def fisher_cache_key(forward: Forward, cfg: EATAConfig, seed: int) -> tuple[str, str, str, int]:
    return (forward.identity, type(cfg).__name__, cfg.model_dump_json(), seed)


# Per process: every stream reset would otherwise cost fisher_size forward+backward passes.
_FISHERS: Memo[tuple[str, str, str, str, str, int], dict[str, Tensor]] = Memo(8)


EATA_SUMMARY = "filtered, reweighted entropy minimisation with Fisher penalty"
ETA_SUMMARY = "EATA without the Fisher penalty (no source data needed)"


@register_strategy
def eata() -> ComposedStrategy:
    updater = EATAUpdater("eata", EATAConfig)
    return ComposedStrategy(
        "eata", f"{EATA_SUMMARY} (test-batch statistics)", BatchStats(required=False), updater
    )


@register_strategy
def eta() -> ComposedStrategy:
    return ComposedStrategy(
        "eta",
        f"{ETA_SUMMARY} (test-batch statistics)",
        BatchStats(required=False),
        EATAUpdater("eta", ETAConfig),
    )


@register_strategy
def unmix_tns_eata() -> ComposedStrategy:
    updater = EATAUpdater("eata", EATAConfig)
    return ComposedStrategy(
        "unmix_tns+eata", f"{EATA_SUMMARY} over UnMix-TNS statistics", UnMixStats(), updater
    )


@register_strategy
def unmix_tns_eta() -> ComposedStrategy:
    updater = EATAUpdater("eta", ETAConfig)
    return ComposedStrategy(
        "unmix_tns+eta", f"{ETA_SUMMARY} over UnMix-TNS statistics", UnMixStats(), updater
    )
