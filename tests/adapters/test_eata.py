"""`eata` / `eta` against a direct torch implementation of docs/ALGORITHMS.md §5 (filters, weights, Fisher)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import adapters
from adapters.base import AdaptationState, IncompatibleModelError, ModelHandle
from adapters.eata import EATAConfig, ETAConfig
from adapters.models import ModelSpec, build_handle

from ._reference import (
    affine_leaves,
    batch_stat_bn,
    entropy,
    load_affine,
    make_batch,
    margin_keeping,
    replace_bn,
    source_entropies,
)

EATA = adapters.get_strategy("eata")
ETA = adapters.get_strategy("eta")
assert EATA.config_cls is EATAConfig and ETA.config_cls is ETAConfig
FISHER: dict[str, Any] = {"fisher_size": 20, "fisher_batch_size": 8}
PARAM_TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 2e-6}


def _reference_fisher(handle: ModelHandle, cfg: Any, seed: int) -> dict[str, Tensor]:
    """F = mean over mini-batches of squared gradients of CE(pseudo-labels) at the source parameters."""
    model, bns = replace_bn(handle, batch_stat_bn)
    params = affine_leaves(bns)
    assert handle.source_images is not None
    images = handle.source_images(cfg.fisher_size, seed)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    batches = list(images.split(cfg.fisher_batch_size))
    for batch in batches:
        logits = model(batch)
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), list(params.values()))
        for key, g in zip(params, grads, strict=True):
            total[key] += g**2
    return {k: v / len(batches) for k, v in total.items()}


def _reference_eata(
    handle: ModelHandle, batches: list[Tensor], cfg: Any, fisher: dict[str, Tensor] | None = None
) -> list[dict[str, Any]]:
    """EATA step by step with torch.optim.Adam; one record (used, probs_ema, params) per batch."""
    model, bns = replace_bn(handle, batch_stat_bn)
    params = affine_leaves(bns)
    anchor = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(
        list(params.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps
    )
    e0 = cfg.e_margin * math.log(handle.num_classes)
    m: Tensor | None = None
    records = []
    for x in batches:
        logits = model(x)
        ent = entropy(logits)
        probs = logits.detach().softmax(1)
        reliable = ent.detach() < e0
        selected = reliable.clone()
        if m is not None:
            cos = probs @ m / (probs.norm(dim=1) * m.norm())
            selected &= cos.abs() < cfg.d_margin
        if m is None:
            m = probs[reliable].mean(0) if reliable.any() else None
        elif selected.any():
            m = cfg.probs_momentum * m + (1 - cfg.probs_momentum) * probs[selected].mean(0)
        if selected.any():
            weights = torch.exp(e0 - ent[selected].detach())
            loss = (weights * ent[selected]).sum() / int(selected.sum())
            if fisher is not None:
                loss = loss + cfg.fisher_alpha * sum(
                    (fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in params.items()
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        records.append(
            {
                "used": int(selected.sum()),
                "redundant": int((reliable & ~selected).sum()),
                "probs_ema": m,
                "params": {k: v.detach().clone() for k, v in params.items()},
            }
        )
    return records


def _run(strategy: Any, handle: ModelHandle, batches: list[Tensor], cfg: Any) -> list[Any]:
    state = strategy.init_state(handle, cfg)
    results = []
    for x in batches:
        result = strategy.step(handle, x, state, cfg)
        state = result.state
        results.append(result)
    return results


def _assert_matches_reference(results: list[Any], records: list[dict[str, Any]], batch_size: int) -> None:
    for result, record in zip(results, records, strict=True):
        assert result.stats.used == record["used"]
        assert result.stats.filtered == batch_size - record["used"]
        assert result.stats.updated == (record["used"] > 0)
        if record["probs_ema"] is not None:
            torch.testing.assert_close(
                result.state.tensors["eata.probs_ema"], record["probs_ema"], **PARAM_TOL
            )
        for key, expected in record["params"].items():
            torch.testing.assert_close(result.state.tensors[key], expected, **PARAM_TOL)


def test_filters_reweights_and_updates_like_reference(tiny_handle: ModelHandle) -> None:
    batches = [make_batch(8, seed=s) for s in range(4)]
    cfg = ETAConfig(e_margin=margin_keeping(tiny_handle, batches[0], keep=5), d_margin=0.978, lr=5e-3)
    records = _reference_eata(tiny_handle, batches, cfg)
    results = _run(ETA, tiny_handle, batches, cfg)
    _assert_matches_reference(results, records, batch_size=8)
    assert results[0].stats.used == 5 and results[0].stats.filtered == 3
    # The case must exercise both filters and at least one update after the first.
    assert sum(r["redundant"] for r in records) > 0
    assert sum(r["used"] > 0 for r in records[1:]) > 0


def test_first_batch_sets_probs_average_from_reliable_samples(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=0)
    cfg = ETAConfig(e_margin=margin_keeping(tiny_handle, x, keep=3))
    result = ETA.step(tiny_handle, x, ETA.init_state(tiny_handle, cfg), cfg)
    ent = entropy(result.logits)
    reliable = ent < cfg.e_margin * math.log(10)
    assert int(reliable.sum()) == 3 == result.stats.used
    expected = result.logits.softmax(1)[reliable].mean(0)
    torch.testing.assert_close(result.state.tensors["eata.probs_ema"], expected)
    assert result.state.meta["has_probs"] is True


def test_no_update_when_every_sample_is_filtered(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=1)
    lowest = float(source_entropies(tiny_handle, x).min())
    cfg = ETAConfig(e_margin=0.5 * lowest / math.log(10))
    state = ETA.init_state(tiny_handle, cfg)
    result = ETA.step(tiny_handle, x, state, cfg)
    assert (result.stats.used, result.stats.filtered, result.stats.updated) == (0, 8, False)
    assert result.stats.loss is None
    for key, value in state.tensors.items():
        assert torch.equal(result.state.tensors[key], value), key
    assert result.state.meta["has_probs"] is False
    assert result.state.meta["opt_steps"] == 0 and result.state.meta["updates"] == 0


def test_redundancy_filter_starts_after_first_batch(tiny_handle: ModelHandle) -> None:
    # d_margin = 0 marks every sample redundant (|cos| >= 0), but only once an average exists.
    x1, x2 = make_batch(8, seed=2), make_batch(8, seed=3)
    cfg = ETAConfig(e_margin=1.0, d_margin=0.0)
    first = ETA.step(tiny_handle, x1, ETA.init_state(tiny_handle, cfg), cfg)
    assert first.stats.used == 8 and first.stats.updated
    second = ETA.step(tiny_handle, x2, first.state, cfg)
    assert (second.stats.used, second.stats.filtered, second.stats.updated) == (0, 8, False)
    for key, value in first.state.tensors.items():
        assert torch.equal(second.state.tensors[key], value), key


def test_fisher_is_mean_squared_pseudo_label_gradient(tiny_handle: ModelHandle) -> None:
    cfg = EATAConfig(**FISHER)
    state = EATA.init_state(tiny_handle, cfg, seed=3)
    expected = _reference_fisher(tiny_handle, cfg, seed=3)
    for key, value in expected.items():
        torch.testing.assert_close(state.tensors[f"eata.fisher.{key}"], value, rtol=1e-4, atol=1e-9)
    assert max(float(v.max()) for v in expected.values()) > 0


def test_fisher_penalty_adds_its_gradient(tiny_handle: ModelHandle) -> None:
    """theta' = theta - lr * (grad of the weighted entropy + 2 beta F (theta - theta0)) with plain SGD."""
    x = make_batch(8, seed=4)
    base = EATAConfig(**FISHER, optimizer="sgd", momentum=0.0, lr=0.01, e_margin=1.0)
    fisher = {
        k[len("eata.fisher.") :]: v
        for k, v in EATA.init_state(tiny_handle, base).tensors.items()
        if "fisher" in k
    }
    beta = 0.5 / float(torch.cat([f.flatten() for f in fisher.values()]).mean())
    cfg = base.model_copy(update={"fisher_alpha": beta})
    state = EATA.init_state(tiny_handle, cfg)
    gen = torch.Generator().manual_seed(0)
    theta = {k: state.tensors[k] + 0.05 * torch.randn(state.tensors[k].shape, generator=gen) for k in fisher}
    state = AdaptationState({**state.tensors, **theta}, state.meta)
    result = EATA.step(tiny_handle, x, state, cfg)
    assert result.stats.used == 8

    model, bns = replace_bn(tiny_handle, batch_stat_bn)
    load_affine(bns, theta)
    params = affine_leaves(bns)
    ent = entropy(model(x))
    e0 = math.log(10)
    loss = (torch.exp(e0 - ent.detach()) * ent).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    source = tiny_handle.source_affine()
    penalty_step = {k: cfg.lr * 2 * beta * fisher[k] * (theta[k] - source[k]) for k in fisher}
    for key in fisher:
        expected = theta[key] - cfg.lr * grads[key] - penalty_step[key]
        torch.testing.assert_close(result.state.tensors[key], expected, rtol=1e-5, atol=1e-6)
    assert max(float(v.abs().max()) for v in penalty_step.values()) > 1e-3


def test_fisher_penalty_over_several_steps(tiny_handle: ModelHandle) -> None:
    batches = [make_batch(8, seed=s) for s in range(5, 8)]
    cfg = EATAConfig(**FISHER, fisher_alpha=2000.0, e_margin=1.0, d_margin=0.95, lr=1e-2)
    fisher = _reference_fisher(tiny_handle, cfg, seed=0)
    records = _reference_eata(tiny_handle, batches, cfg, fisher=fisher)
    results = _run(EATA, tiny_handle, batches, cfg)
    _assert_matches_reference(results, records, batch_size=8)
    without = _reference_eata(tiny_handle, batches, cfg.model_copy(update={"fisher_alpha": 0.0}))
    key = tiny_handle.affine_names()[0]
    assert (records[-1]["params"][key] - without[-1]["params"][key]).abs().max() > 1e-4


def test_eta_needs_no_source_data_but_eata_does(tiny_spec: ModelSpec) -> None:
    handle = build_handle(tiny_spec.model_copy(update={"source_data": None}))
    assert handle.source_images is None
    state = ETA.init_state(handle, ETAConfig())
    assert not any(k.startswith("eata.fisher.") for k in state.tensors)
    ETA.step(handle, make_batch(4, seed=0), state, ETAConfig())
    with pytest.raises(IncompatibleModelError, match=r"source data.*(fisher_alpha=0|`eta`)"):
        EATA.init_state(handle, EATAConfig(**FISHER))
    # EATA without the penalty is ETA and needs no source data either.
    EATA.init_state(handle, EATAConfig(fisher_alpha=0.0))


def test_eta_config_refuses_a_fisher_weight() -> None:
    with pytest.raises(ValueError, match="fisher_alpha"):
        ETAConfig(fisher_alpha=1.0)
