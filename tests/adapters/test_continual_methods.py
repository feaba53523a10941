"""`ema_tbn`, `roid` and the open-set confidence filter against torch references and closed forms
(docs/ALGORITHMS.md §8-§10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters import losses
from adapters.base import ModelHandle
from adapters.ema_tbn import EMATBNConfig, keys
from adapters.roid import (
    PROBS_KEY,
    ROIDConfig,
    prior_correct,
    sample_weights,
    soft_likelihood_ratio,
    symmetric_cross_entropy,
)
from adapters.serialization import state_from_bytes, state_to_bytes
from adapters.tent import TentConfig

from ._reference import affine_leaves, assert_states_equal, batch_stat_bn, eval_bn, make_batch, replace_bn

EMA = adapters.get_strategy("ema_tbn")
ROID = adapters.get_strategy("roid")


class _MovingBN(torch.nn.BatchNorm2d):
    """torch's BatchNorm running update (momentum 0.1, unbiased variance) on each input, then eval-mode
    normalisation with the moved statistics, in one pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.running_mean is not None and self.running_var is not None
        with torch.no_grad():
            F.batch_norm(x, self.running_mean, self.running_var, None, None, True, 0.1, self.eps)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def _moving_bn(name: str, bn: torch.nn.BatchNorm2d) -> torch.nn.Module:
    src = eval_bn(name, bn)
    new = _MovingBN(bn.num_features, eps=bn.eps)
    new.load_state_dict(src.state_dict())
    return new.eval()


def test_ema_tbn_is_torch_batchnorm_running_update_then_eval(tiny_handle: ModelHandle) -> None:
    model, bns = replace_bn(tiny_handle, _moving_bn)
    cfg = EMATBNConfig()
    state = EMA.init_state(tiny_handle, cfg)
    for seed in range(3):
        x = make_batch(8, seed=seed)
        with torch.no_grad():
            expected = model(x)
        result = EMA.step(tiny_handle, x, state, cfg)
        state = result.state
        torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-5)
        for name, bn in bns.items():
            k_mean, k_var = keys(name)
            torch.testing.assert_close(state.tensors[k_mean], bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state.tensors[k_var], bn.running_var, rtol=1e-5, atol=1e-6)


def test_ema_tbn_serves_single_images_and_predicts_without_moving(tiny_handle: ModelHandle) -> None:
    cfg = EMATBNConfig()
    state = EMA.init_state(tiny_handle, cfg)
    one = EMA.step(tiny_handle, make_batch(1, seed=3), state, cfg)
    assert one.stats.updated and one.logits.shape == (1, tiny_handle.num_classes)
    still = EMA.step(tiny_handle, make_batch(4, seed=4), one.state, cfg, adapt=False)
    assert_states_equal(still.state, one.state)
    # adapt=False normalises with the stored statistics: the source model's prediction on a fresh state.
    source = adapters.get_strategy("source")
    fresh = EMA.step(tiny_handle, make_batch(4, seed=4), state, cfg, adapt=False)
    src = source.step(
        tiny_handle,
        make_batch(4, seed=4),
        source.init_state(tiny_handle, source.parse_config({})),
        source.parse_config({}),
    )
    torch.testing.assert_close(fresh.logits, src.logits, rtol=1e-4, atol=1e-5)


def test_soft_likelihood_ratio_and_symmetric_cross_entropy_closed_forms() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    p = logits.softmax(1)
    pc = p.clamp(max=0.99)
    expected = -(pc * torch.log(pc / (1 - pc) + 1e-5)).sum(1)
    torch.testing.assert_close(soft_likelihood_ratio(logits), expected)
    # Uniform over 3: each term is (1/3) log(1/2): -log(1/2) = ln 2 in total.
    assert math.isclose(float(soft_likelihood_ratio(logits)[1]), math.log(2), rel_tol=1e-4)
    other = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    q = other.softmax(1)
    sce = -0.5 * (q * p.log()).sum(1) - 0.5 * (p * q.log()).sum(1)
    torch.testing.assert_close(symmetric_cross_entropy(logits, other), sce)
    torch.testing.assert_close(symmetric_cross_entropy(logits, other), symmetric_cross_entropy(other, logits))


def test_prior_correction_closed_form() -> None:
    logits = torch.tensor([[3.0, 0.0], [2.0, 1.0], [0.0, 1.0], [4.0, 0.0]])
    prior = logits.softmax(1).mean(0)
    s = max(1 / 4, 1 / 2) / float(prior.max())
    expected = logits * ((prior + s) / (1 + 2 * s))
    torch.testing.assert_close(prior_correct(logits), expected)


def test_roid_sample_weights() -> None:
    """Dropped: diversity below the batch mean; kept: exp(w_div * w_cert / T) with min-max normalised parts."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0], [4.0, 0.1, 0.0]])
    ema = torch.tensor([0.8, 0.1, 0.1])
    weights, keep = sample_weights(logits, ema, 1 / 3)
    p = logits.softmax(1)
    div = 1 - F.cosine_similarity(ema[None], p, dim=1)
    div = (div - div.min()) / (div.max() - div.min())
    cert = -losses.softmax_entropy(logits)
    cert = (cert - cert.min()) / (cert.max() - cert.min())
    assert keep.tolist() == (div >= div.mean()).tolist()
    assert not keep[0] and keep[1]  # the sample agreeing with the running prediction is dropped
    torch.testing.assert_close(weights, torch.where(keep, torch.exp(3 * div * cert), 0))


def test_roid_step_is_adam_then_weight_ensembling(tiny_handle: ModelHandle) -> None:
    """Without weighting, consistency and prior correction: SLR mean, torch Adam, then m theta + (1-m) theta_0."""
    cfg = ROIDConfig(
        use_weighting=False, use_consistency=False, use_prior_correction=False, lr=1e-2, momentum_src=0.9
    )
    model, bns = replace_bn(tiny_handle, batch_stat_bn)
    params = affine_leaves(bns)
    source = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    state = ROID.init_state(tiny_handle, cfg)
    for seed in range(3):
        x = make_batch(8, seed=seed)
        logits = model(x)
        loss = soft_likelihood_ratio(logits).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(0.9 * p + 0.1 * source[k])
        result = ROID.step(tiny_handle, x, state, cfg)
        state = result.state
        torch.testing.assert_close(result.logits, logits.detach(), rtol=1e-4, atol=1e-5)
        for k, p in params.items():
            torch.testing.assert_close(state.tensors[k], p.detach(), rtol=1e-4, atol=1e-6)


def test_roid_defaults_full_step_and_round_trip(tiny_handle: ModelHandle) -> None:
    cfg = ROIDConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum_src, cfg.momentum_probs) == ("adam", 1e-3, 0.99, 0.9)
    assert math.isclose(cfg.temperature, 1 / 3)
    state = ROID.init_state(tiny_handle, cfg)
    torch.testing.assert_close(state.tensors[PROBS_KEY], torch.full((10,), 0.1))
    first = ROID.step(tiny_handle, make_batch(8, seed=1), state, cfg)
    assert 0 < first.stats.used <= 8 and first.stats.used + first.stats.filtered == 8
    restored = state_from_bytes(state_to_bytes(first.state))
    assert_states_equal(first.state, restored)
    # The same step from the restored state is the same step (the augmentation is seeded by the state).
    a = ROID.step(tiny_handle, make_batch(8, seed=2), first.state, cfg)
    b = ROID.step(tiny_handle, make_batch(8, seed=2), restored, cfg)
    assert_states_equal(a.state, b.state)
    with pytest.raises(adapters.BatchTooSmallError):
        ROID.step(tiny_handle, make_batch(1, seed=3), state, cfg)


@pytest.mark.parametrize("name", ["tent", "eata"])
def test_confidence_filter_drops_samples_whose_confidence_fell(tiny_handle: ModelHandle, name: str) -> None:
    strategy = adapters.get_strategy(name)
    overrides = {"confidence_filter": True, "lr": 0.05}
    if name == "eata":
        overrides.update(fisher_alpha=0.0, e_margin=1.0, d_margin=1.0)
    cfg = strategy.parse_config(overrides)
    state = strategy.init_state(tiny_handle, cfg)
    first = strategy.step(tiny_handle, make_batch(8, seed=1), state, cfg)
    assert first.stats.used == 8  # at the source parameters no confidence has fallen
    x = make_batch(8, seed=2)
    second = strategy.step(tiny_handle, x, first.state, cfg)
    # The samples kept are exactly those whose confidence in the source's class did not fall.
    norm = adapters.get_strategy("norm")
    src = norm.step(
        tiny_handle, x, norm.init_state(tiny_handle, norm.parse_config({})), norm.parse_config({})
    )
    kept = losses.confidence_kept(second.logits, src.logits)
    assert 0 < int(kept.sum()) < 8
    assert second.stats.used == int(kept.sum())
    assert TentConfig().confidence_filter is False
