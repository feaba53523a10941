"""`sar` against a two-pass SAM + torch.optim.SGD reference (docs/ALGORITHMS.md §6)."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

import adapters
from adapters.base import ModelHandle
from adapters.sar import SARConfig, reset_threshold
from adapters.tent import TentConfig

from ._reference import (
    affine_leaves,
    assert_states_equal,
    batch_stat_bn,
    entropy,
    make_batch,
    margin_keeping,
    replace_bn,
)

SAR = adapters.get_strategy("sar")
assert SAR.config_cls is SARConfig


def _grad(p: Tensor) -> Tensor:
    assert p.grad is not None
    return p.grad


def _reference_sar(handle: ModelHandle, batches: list[Tensor], cfg: Any) -> list[dict[str, Any]]:
    """SAM (rho g / ||g||, gradient at the perturbed point) with SGD momentum, filters S1 and S2."""
    model, bns = replace_bn(handle, batch_stat_bn)
    params = affine_leaves(bns)
    optimizer = torch.optim.SGD(list(params.values()), lr=cfg.lr, momentum=cfg.momentum)
    e0 = cfg.e_margin * math.log(handle.num_classes)
    records = []
    for x in batches:
        ent = entropy(model(x))
        s1 = ent.detach() < e0
        optimizer.zero_grad()
        ent[s1].mean().backward()
        with torch.no_grad():
            grads = {k: _grad(p) for k, p in params.items()}
            norm = torch.sqrt(cast(Tensor, sum((g**2).sum() for g in grads.values())))
            eps = {k: cfg.rho * grads[k] / (norm + 1e-12) for k in params}
            for k, p in params.items():
                p.add_(eps[k])
        optimizer.zero_grad()
        ent2 = entropy(model(x))[s1]
        s2 = ent2.detach() < e0
        loss2 = ent2[s2].mean()
        loss2.backward()
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(eps[k])
        optimizer.step()
        records.append(
            {
                "reliable": int(s1.sum()),
                "used": int(s2.sum()),
                "loss": float(loss2.detach()),
                "params": {k: v.detach().clone() for k, v in params.items()},
            }
        )
    return records


def test_sam_step_matches_reference(tiny_handle: ModelHandle) -> None:
    batches = [make_batch(8, seed=s) for s in range(3)]
    cfg = SARConfig(e_margin=margin_keeping(tiny_handle, batches[0], keep=5), lr=0.05, rho=0.2)
    records = _reference_sar(tiny_handle, batches, cfg)
    state = SAR.init_state(tiny_handle, cfg)
    source = tiny_handle.source_affine()
    for x, record in zip(batches, records, strict=True):
        result = SAR.step(tiny_handle, x, state, cfg)
        assert result.stats.updated and not result.stats.reset
        assert result.stats.used == record["used"] and result.stats.filtered == 8 - record["used"]
        assert result.stats.loss is not None and math.isclose(result.stats.loss, record["loss"], rel_tol=1e-5)
        for key, expected in record["params"].items():
            torch.testing.assert_close(result.state.tensors[key], expected, rtol=1e-5, atol=2e-6)
        state = result.state
    assert records[0]["reliable"] == 5
    assert any(0 < r["used"] < r["reliable"] for r in records), "the second filter must drop some samples"
    moved = max(float((state.tensors[k] - source[k]).abs().max()) for k in source)
    assert moved > 1e-2


def test_sam_uses_the_gradient_at_the_perturbed_point(tiny_handle: ModelHandle) -> None:
    """A plain SGD step with the unperturbed gradient differs measurably from SAR's step."""
    x = make_batch(8, seed=3)
    cfg = SARConfig(e_margin=1.0, lr=0.05, rho=0.5)
    result = SAR.step(tiny_handle, x, SAR.init_state(tiny_handle, cfg), cfg)
    plain = adapters.get_strategy("tent")
    plain_cfg = TentConfig(optimizer="sgd", lr=0.05, momentum=0.9)
    tent = plain.step(tiny_handle, x, plain.init_state(tiny_handle, plain_cfg), plain_cfg)
    key = tiny_handle.affine_names()[0]
    assert (result.state.tensors[key] - tent.state.tensors[key]).abs().max() > 1e-5


def test_state_unchanged_when_every_sample_is_unreliable(tiny_handle: ModelHandle) -> None:
    x = make_batch(8, seed=4)
    cfg = SARConfig(e_margin=1e-4)
    state = SAR.init_state(tiny_handle, cfg)
    result = SAR.step(tiny_handle, x, state, cfg)
    assert (result.stats.used, result.stats.filtered, result.stats.updated) == (0, 8, False)
    for key, value in state.tensors.items():
        assert torch.equal(result.state.tensors[key], value), key
    assert result.state.meta["loss_ema"] is None and result.state.meta["opt_steps"] == 0


def test_loss_ema_and_recovery_reset(tiny_handle: ModelHandle) -> None:
    x1, x2 = make_batch(8, seed=5), make_batch(8, seed=6)
    keep = SARConfig(e_margin=1.0, reset_criterion="reference", reset_constant=0.0)
    init = SAR.init_state(tiny_handle, keep)
    first = SAR.step(tiny_handle, x1, init, keep)
    second = SAR.step(tiny_handle, x2, first.state, keep)
    assert first.state.meta["loss_ema"] == first.stats.loss
    assert first.stats.loss is not None and second.stats.loss is not None
    expected = 0.9 * first.stats.loss + 0.1 * second.stats.loss
    assert math.isclose(second.state.meta["loss_ema"], expected, rel_tol=1e-12)

    # Any finite entropy is below 10: the first update signals collapse and the state returns to init.
    collapse = SARConfig(e_margin=1.0, reset_criterion="reference", reset_constant=10.0)
    reset = SAR.step(tiny_handle, x2, first.state, collapse)
    assert reset.stats.reset and reset.stats.updated
    fresh = SAR.init_state(tiny_handle, collapse)
    assert set(reset.state.tensors) == set(fresh.tensors)
    for key, value in fresh.tensors.items():
        assert torch.equal(reset.state.tensors[key], value), key
    assert reset.state.meta["loss_ema"] is None and reset.state.meta["opt_steps"] == 0
    assert not second.stats.reset


def test_frozen_layers_stay_at_source(tiny_handle: ModelHandle) -> None:
    cfg = SARConfig(e_margin=1.0, lr=0.05, frozen_layers=("block3", "bn1"))
    state = SAR.init_state(tiny_handle, cfg)
    frozen = [k for k in tiny_handle.affine_names() if "block3" in k or "bn1" in k]
    assert frozen
    result = SAR.step(tiny_handle, make_batch(8, seed=7), state, cfg)
    assert result.stats.updated
    for key in tiny_handle.affine_names():
        changed = not torch.equal(result.state.tensors[key], state.tensors[key])
        assert changed != (key in frozen), key
    assert not any(k == f"opt.momentum_buffer.{name}" for k in result.state.tensors for name in frozen)


def test_default_is_benchmark_sgd_setting() -> None:
    cfg = SARConfig()
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.rho) == ("sgd", 0.9, False, 0.05)
    assert math.isclose(cfg.e_margin, 0.4) and math.isclose(cfg.reset_constant, 0.2)
    assert cfg.reset_criterion == "relative"


def test_relative_reset_threshold_scales_with_ln_classes() -> None:
    cfg = SARConfig()
    # The reference's 0.2 nats at ImageNet's 1000 classes; 0.2 * ln 10 / ln 1000 = 0.0667 at 10 classes.
    assert math.isclose(reset_threshold(cfg, 1000), 0.2, rel_tol=1e-12)
    assert math.isclose(reset_threshold(cfg, 10), 0.2 / 3, rel_tol=1e-12)
    assert reset_threshold(SARConfig(reset_criterion="reference"), 10) == 0.2


def test_relative_criterion_decides_the_reset(tiny_handle: ModelHandle) -> None:
    """A loss between the two thresholds resets under the reference criterion only."""
    x = make_batch(8, seed=5)
    probe = SARConfig(e_margin=1.0, reset_criterion="reference", reset_constant=0.0)
    loss = SAR.step(tiny_handle, x, SAR.init_state(tiny_handle, probe), probe).stats.loss
    assert loss is not None and loss > 0
    ln_c = math.log(tiny_handle.num_classes)
    relative = SARConfig(e_margin=1.0, reset_fraction=0.5 * loss / ln_c, reset_constant=2 * loss)
    reference = relative.model_copy(update={"reset_criterion": "reference"})
    assert not SAR.step(tiny_handle, x, SAR.init_state(tiny_handle, relative), relative).stats.reset
    assert SAR.step(tiny_handle, x, SAR.init_state(tiny_handle, reference), reference).stats.reset


def test_reset_equals_init(tiny_handle: ModelHandle) -> None:
    cfg = SARConfig()
    assert_states_equal(SAR.init_state(tiny_handle, cfg), SAR.init_state(tiny_handle, cfg))


def test_recovery_also_resets_unmix_components(tiny_handle: ModelHandle) -> None:
    """Model recovery restores the whole adaptive model, normalisation statistics included."""
    strategy = adapters.get_strategy("unmix_tns+sar")
    cfg = strategy.parse_config(
        {
            "unmix_tns": {"k": 4},
            "sar": {"e_margin": 1.0, "reset_criterion": "reference", "reset_constant": 10.0},
        }
    )
    no_reset = strategy.parse_config(
        {
            "unmix_tns": {"k": 4},
            "sar": {"e_margin": 1.0, "reset_criterion": "reference", "reset_constant": 0.0},
        }
    )
    init = strategy.init_state(tiny_handle, cfg, seed=2)
    drifted = strategy.step(tiny_handle, make_batch(8, seed=8), init, no_reset)
    assert not drifted.stats.reset
    assert any(
        not torch.equal(drifted.state.tensors[k], init.tensors[k])
        for k in init.tensors
        if k.startswith("unmix.")
    )
    reset = strategy.step(tiny_handle, make_batch(8, seed=9), drifted.state, cfg)
    assert reset.stats.reset
    for key, value in init.tensors.items():
        assert torch.equal(reset.state.tensors[key], value), key
