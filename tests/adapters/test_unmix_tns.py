"""`unmix_tns` against a direct (B, K, C) implementation of docs/ALGORITHMS.md §3."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
from adapters.base import AdaptationState, ModelHandle
from adapters.unmix_tns import MEANS, VARS, UnMixTNSConfig, assignment, layer_components, mixture_moments

from ._reference import assert_states_equal, make_batch, replace_bn

TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
STRATEGY = adapters.get_strategy("unmix_tns")


class InstanceNormBN(nn.Module):
    """Instance normalisation with the BN layer's affine parameters."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return F.instance_norm(x, weight=self.bn.weight, bias=self.bn.bias, eps=self.bn.eps)


class ReferenceUnMix(nn.Module):
    """UnMix-TNS written out step by step (§3.2 steps 1-6) with explicit (B, K, C) tensors."""

    def __init__(self, bn: nn.BatchNorm2d, means: Tensor, variances: Tensor, tau: float, lam: float) -> None:
        super().__init__()
        self.bn, self.means, self.variances, self.tau, self.lam = bn, means, variances, tau, lam
        self.new_means: Tensor | None = None
        self.new_variances: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        mu_i = x.mean(dim=(2, 3))
        var_i = ((x - mu_i[:, :, None, None]) ** 2).mean(dim=(2, 3))
        sim = F.cosine_similarity(mu_i[:, None, :], self.means[None, :, :], dim=2)
        p = (sim / self.tau).softmax(dim=1)[:, :, None]
        mu_hat = (1 - p) * self.means[None] + p * mu_i[:, None]
        var_hat = (1 - p) * self.variances[None] + p * var_i[:, None]
        mean = mu_hat.mean(1)
        var = var_hat.mean(1) + (mu_hat**2).mean(1) - mean**2
        y = (x - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + self.bn.eps)
        self.new_means = self.means + self.lam * (p * (mu_i[:, None] - self.means[None])).mean(0)
        self.new_variances = self.variances + self.lam * (p * (var_i[:, None] - self.variances[None])).mean(0)
        return y * self.bn.weight[None, :, None, None] + self.bn.bias[None, :, None, None]


def _reference_step(
    handle: ModelHandle, state: AdaptationState, cfg: UnMixTNSConfig, x: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    lam = 1 - (1 - cfg.bn_momentum) ** (x.shape[0] / cfg.batch_size_max)

    def factory(name: str, bn: nn.BatchNorm2d) -> nn.Module:
        return ReferenceUnMix(bn, *layer_components(handle, state.tensors, name), cfg.tau, lam)

    model, refs = replace_bn(handle, factory)
    with torch.no_grad():
        logits = model(x)
    means, variances = [], []
    for layer in handle.bn_layers:  # the state packs the layers' columns in this order
        ref = refs[layer.name]
        assert isinstance(ref, ReferenceUnMix) and ref.new_means is not None and ref.new_variances is not None
        means.append(ref.new_means)
        variances.append(ref.new_variances)
    return logits, {MEANS: torch.cat(means, 1), VARS: torch.cat(variances, 1)}


def test_single_component_is_instance_normalisation(tiny_handle: ModelHandle) -> None:
    cfg = UnMixTNSConfig(k=1)
    x = make_batch(4, seed=1)
    got = STRATEGY.step(tiny_handle, x, STRATEGY.init_state(tiny_handle, cfg), cfg).logits
    model, _ = replace_bn(tiny_handle, lambda _, bn: InstanceNormBN(bn))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    ("batch_size", "k", "momentum", "batch_size_max"),
    [(5, 4, 0.3, 16), (6, 3, 0.1, 6), (1, 5, 0.5, 4), (4, 2, 1.0, 4)],
)
def test_step_matches_reference(
    tiny_handle: ModelHandle, batch_size: int, k: int, momentum: float, batch_size_max: int
) -> None:
    cfg = UnMixTNSConfig(k=k, bn_momentum=momentum, batch_size_max=batch_size_max)
    state = STRATEGY.init_state(tiny_handle, cfg, seed=3)
    for seed in (10, 11):
        x = make_batch(batch_size, seed=seed)
        expected_logits, expected_components = _reference_step(tiny_handle, state, cfg, x)
        result = STRATEGY.step(tiny_handle, x, state, cfg)
        torch.testing.assert_close(result.logits, expected_logits, **TOL)
        assert set(result.state.tensors) == set(expected_components)
        for key, value in expected_components.items():
            torch.testing.assert_close(result.state.tensors[key], value, rtol=1e-5, atol=1e-6)
        moved = sum(
            float((result.state.tensors[key] - state.tensors[key]).abs().max()) for key in state.tensors
        )
        assert moved > 1e-4
        assert result.stats.updated and result.stats.used == batch_size
        state = result.state


def test_mixture_moments_equal_direct_mixture() -> None:
    gen = torch.Generator().manual_seed(0)
    b, k, c = 5, 7, 11
    mu_i = torch.randn(b, c, generator=gen, dtype=torch.float64)
    var_i = torch.rand(b, c, generator=gen, dtype=torch.float64) + 0.1
    comp_mu = torch.randn(k, c, generator=gen, dtype=torch.float64)
    comp_var = torch.rand(k, c, generator=gen, dtype=torch.float64) + 0.1
    p = torch.randn(b, k, generator=gen, dtype=torch.float64).mul(3).softmax(1)
    mu_hat = (1 - p)[:, :, None] * comp_mu[None] + p[:, :, None] * mu_i[:, None]
    var_hat = (1 - p)[:, :, None] * comp_var[None] + p[:, :, None] * var_i[:, None]
    expected_mean = mu_hat.mean(1)
    expected_var = var_hat.mean(1) + (mu_hat**2).mean(1) - expected_mean**2
    mean, var = mixture_moments(mu_i, var_i, comp_mu, comp_var, p)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)


def test_assignment_is_softmax_of_cosine_over_tau() -> None:
    gen = torch.Generator().manual_seed(1)
    mu_i, comp_mu = torch.randn(4, 9, generator=gen), torch.randn(6, 9, generator=gen)
    cos = torch.tensor([[float(a @ m / (a.norm() * m.norm())) for m in comp_mu] for a in mu_i])
    p = assignment(mu_i, comp_mu, tau=0.07)
    torch.testing.assert_close(p, (cos / 0.07).softmax(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.sum(1), torch.ones(4))


@pytest.mark.parametrize("k", [2, 16, 256])
def test_init_components_spread_around_source(tiny_handle: ModelHandle, k: int) -> None:
    """mu_k = mu_s + sqrt(a K/(K-1)) sigma_s xi_k with xi ~ N(0, 1) per (k, c); var_k = (1 - a) var_s."""
    cfg = UnMixTNSConfig(k=k, init_spread=0.5, init="random")
    spread = math.sqrt(cfg.init_spread * k / (k - 1))
    z_mean, xi, between = [], [], []
    for seed in range(max(4, 512 // k)):
        state = STRATEGY.init_state(tiny_handle, cfg, seed=seed)
        for layer in tiny_handle.bn_layers:
            means, variances = layer_components(tiny_handle, state.tensors, layer.name)
            assert means.shape == variances.shape == (k, layer.num_features)
            sigma = layer.running_var.sqrt()
            expected_var = ((1 - cfg.init_spread) * layer.running_var).expand_as(variances)
            torch.testing.assert_close(variances, expected_var)
            # Mean over K of mu_k - mu_s has standard deviation spread * sigma / sqrt(K).
            z_mean.append((means.mean(0) - layer.running_mean) / (spread * sigma / math.sqrt(k)))
            xi.append(((means - layer.running_mean) / (spread * sigma)).flatten())
            # Spread between components: a * var_s in expectation, completing the source variance.
            between.append(means.var(0, correction=0) / (cfg.init_spread * layer.running_var))
    z, noise, ratio = torch.cat(z_mean), torch.cat(xi), torch.cat(between)
    assert float(z.abs().max()) < 5.5
    assert 0.85 < float((z**2).mean()) < 1.15
    assert abs(float(noise.mean())) < 0.02
    assert abs(float(noise.var()) - 1.0) < 0.03
    assert abs(float(ratio.mean()) - 1.0) < 0.05


@pytest.mark.parametrize("k", [2, 16, 128])
def test_moment_matched_init_matches_source_moments_exactly(tiny_handle: ModelHandle, k: int) -> None:
    """The equal-weight mixture of the initial components has the source mean and variance per channel."""
    cfg = UnMixTNSConfig(k=k, init_spread=0.5, init="moment_matched")
    for seed in range(3):
        state = STRATEGY.init_state(tiny_handle, cfg, seed=seed)
        for layer in tiny_handle.bn_layers:
            means, variances = layer_components(tiny_handle, state.tensors, layer.name)
            torch.testing.assert_close(
                variances, ((1 - cfg.init_spread) * layer.running_var).expand_as(variances)
            )
            torch.testing.assert_close(means.mean(0), layer.running_mean, rtol=1e-5, atol=1e-5)
            total = variances.mean(0) + means.var(0, correction=0)
            torch.testing.assert_close(total, layer.running_var, rtol=1e-4, atol=1e-6)
            # Still a random draw: components differ from each other and between seeds.
            assert float(means.std(0).min()) > 0
    a = STRATEGY.init_state(tiny_handle, cfg, seed=0).tensors
    b = STRATEGY.init_state(tiny_handle, cfg, seed=1).tensors
    assert any(not torch.equal(a[key], b[key]) for key in a if key.endswith(".means"))


def test_moment_matched_init_is_the_reference_draw_centred_and_rescaled(tiny_handle: ModelHandle) -> None:
    ref = STRATEGY.init_state(tiny_handle, UnMixTNSConfig(init="random"), seed=3).tensors
    mm = STRATEGY.init_state(tiny_handle, UnMixTNSConfig(init="moment_matched"), seed=3).tensors
    for layer in tiny_handle.bn_layers:
        ref_means, mm_means = (
            layer_components(tiny_handle, ref, layer.name)[0],
            layer_components(tiny_handle, mm, layer.name)[0],
        )
        d_ref = ref_means - ref_means.mean(0)
        d_mm = mm_means - layer.running_mean
        # Per channel, the centred reference offsets and the moment-matched offsets are proportional.
        scale = (d_mm * d_ref).sum(0) / (d_ref * d_ref).sum(0)
        torch.testing.assert_close(d_mm, d_ref * scale, rtol=1e-4, atol=1e-5)
        assert bool((scale > 0).all())


def test_single_component_starts_at_source_statistics(tiny_handle: ModelHandle) -> None:
    state = STRATEGY.init_state(tiny_handle, UnMixTNSConfig(k=1), seed=5)
    for layer in tiny_handle.bn_layers:
        means, variances = layer_components(tiny_handle, state.tensors, layer.name)
        torch.testing.assert_close(means, layer.running_mean[None], rtol=0, atol=0)
        torch.testing.assert_close(variances, layer.running_var[None], rtol=0, atol=0)


def test_init_is_seeded(tiny_handle: ModelHandle) -> None:
    cfg = UnMixTNSConfig(k=4)
    first = STRATEGY.init_state(tiny_handle, cfg, seed=7)
    assert_states_equal(first, STRATEGY.init_state(tiny_handle, cfg, seed=7))
    other = STRATEGY.init_state(tiny_handle, cfg, seed=8)
    for layer in tiny_handle.bn_layers:
        (first_m, first_v), (other_m, other_v) = (
            layer_components(tiny_handle, st.tensors, layer.name) for st in (first, other)
        )
        assert not torch.equal(first_m, other_m)
        assert torch.equal(first_v, other_v)


def test_no_adapt_leaves_components_unchanged(tiny_handle: ModelHandle) -> None:
    cfg = UnMixTNSConfig(k=4)
    state = STRATEGY.init_state(tiny_handle, cfg)
    x = make_batch(4, seed=2)
    frozen = STRATEGY.step(tiny_handle, x, state, cfg, adapt=False)
    assert_states_equal(frozen.state, state)
    assert not frozen.stats.updated
    adapted = STRATEGY.step(tiny_handle, x, state, cfg)
    # Both calls predict with the same (pre-update) components.
    torch.testing.assert_close(frozen.logits, adapted.logits, rtol=0, atol=0)


def test_each_sample_is_normalised_on_its_own(tiny_handle: ModelHandle) -> None:
    cfg = UnMixTNSConfig(k=4)
    state = STRATEGY.init_state(tiny_handle, cfg)
    x = make_batch(6, seed=3)
    together = STRATEGY.step(tiny_handle, x, state, cfg).logits
    for i in (0, 4):
        alone = STRATEGY.step(tiny_handle, x[i : i + 1], state, cfg).logits
        torch.testing.assert_close(alone[0], together[i], **TOL)
    # Replacing the other samples does not change sample 0's prediction either.
    mixed = torch.cat([x[:1], make_batch(5, seed=4)])
    torch.testing.assert_close(STRATEGY.step(tiny_handle, mixed, state, cfg).logits[0], together[0], **TOL)


def test_drift_statistics_are_each_layers_batch_moments(tiny_handle: ModelHandle) -> None:
    """The BN statistics recorded for drift are every layer input's channel mean and biased variance."""
    cfg = UnMixTNSConfig(k=4)
    state = STRATEGY.init_state(tiny_handle, cfg, seed=1)
    x = make_batch(5, seed=6)
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def factory(name: str, bn: nn.BatchNorm2d) -> nn.Module:
        ref = ReferenceUnMix(bn, *layer_components(tiny_handle, state.tensors, name), cfg.tau, 0.0)
        ref.register_forward_pre_hook(
            lambda _, args: seen.__setitem__(
                name, (args[0].mean(dim=(0, 2, 3)), args[0].var(dim=(0, 2, 3), correction=0))
            )
        )
        return ref

    model, _ = replace_bn(tiny_handle, factory)
    with torch.no_grad():
        model(x)
    forward = STRATEGY._forward_fn(tiny_handle, cfg, state.tensors, adapt=True)
    with torch.no_grad():
        _, plan = forward(x, update_stats=True, record=True)
    assert sorted(plan.batch_stats) == list(range(len(tiny_handle.bn_layers)))
    for layer in tiny_handle.bn_layers:
        mean, var = plan.batch_stats[layer.index]
        torch.testing.assert_close(mean, seen[layer.name][0], **TOL)
        torch.testing.assert_close(var, seen[layer.name][1], **TOL)


def test_result_does_not_depend_on_the_order_of_state_keys(cifar_handle: ModelHandle) -> None:
    """A state read back from storage lists its tensors in another order: the step must be bitwise the same.
    (The real model: with its 37 layers of up to 128 channels the float rounding would show.)"""
    cfg = UnMixTNSConfig()
    state = STRATEGY.init_state(cifar_handle, cfg, seed=2)
    shuffled = AdaptationState(dict(reversed(list(state.tensors.items()))), state.meta)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    a, b = STRATEGY.step(cifar_handle, x, state, cfg), STRATEGY.step(cifar_handle, x, shuffled, cfg)
    assert torch.equal(a.logits, b.logits)
    assert_states_equal(a.state, b.state)


def test_the_state_is_two_packed_tensors_in_layer_order(tiny_handle: ModelHandle) -> None:
    """All layers' components in two (K, sum C) tensors, columns in `handle.bn_layers` order."""
    cfg = UnMixTNSConfig(k=3)
    state = STRATEGY.init_state(tiny_handle, cfg, seed=1)
    channels = sum(layer.num_features for layer in tiny_handle.bn_layers)
    assert {k: tuple(v.shape) for k, v in state.tensors.items()} == {
        MEANS: (3, channels),
        VARS: (3, channels),
    }
    start = 0
    for layer in tiny_handle.bn_layers:
        c = layer.num_features
        means, _ = layer_components(tiny_handle, state.tensors, layer.name)
        assert torch.equal(means, state.tensors[MEANS][:, start : start + c])
        torch.testing.assert_close(means.mean(0), layer.running_mean, rtol=1e-5, atol=1e-5)
        start += c


def test_a_version_1_state_is_upgraded_to_the_packed_layout(tiny_handle: ModelHandle) -> None:
    """A state stored per layer (schema version 1) is read into the packed layout, equal to the original."""
    cfg = UnMixTNSConfig(k=4)
    state = STRATEGY.init_state(tiny_handle, cfg, seed=2)
    v1: dict[str, Tensor] = {}
    for layer in reversed(tiny_handle.bn_layers):  # any key order
        means, variances = layer_components(tiny_handle, state.tensors, layer.name)
        v1[f"unmix.{layer.name}.means"], v1[f"unmix.{layer.name}.vars"] = means.clone(), variances.clone()
    old = AdaptationState(v1, {**state.meta, "schema_version": 1})
    with pytest.raises(adapters.StateMismatchError, match="schema version 1"):
        STRATEGY.check_state(tiny_handle, old)
    upgraded = STRATEGY.upgrade_state(tiny_handle, old)
    STRATEGY.check_state(tiny_handle, upgraded)
    assert_states_equal(upgraded, state)
    # Another model's state, or a version with no upgrade, is left for check_state to refuse.
    other_model = AdaptationState(v1, {**old.meta, "model": "another"})
    assert STRATEGY.upgrade_state(tiny_handle, other_model) is other_model
    unknown = AdaptationState(v1, {**old.meta, "schema_version": 0})
    assert STRATEGY.upgrade_state(tiny_handle, unknown) is unknown
