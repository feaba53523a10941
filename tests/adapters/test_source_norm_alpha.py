"""`source`, `norm` and `alpha_bn` against plain torch models and the alpha-BN closed form (docs/ALGORITHMS.md §1-2)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapters
from adapters._bn import grid_stride, on_grid
from adapters.alpha_bn import AlphaBNConfig
from adapters.base import ModelHandle
from adapters.source import SourceConfig

from ._reference import batch_stat_bn, make_batch, replace_bn

TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


class MixedStatsBN(nn.Module):
    """Normalise with (1-w) * source + w * batch statistics; the batch variance is biased or unbiased."""

    def __init__(self, bn: nn.BatchNorm2d, test_weight: float, unbiased: bool = True) -> None:
        super().__init__()
        self.bn, self.w, self.unbiased = bn, test_weight, unbiased

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean_b = x.mean(dim=(0, 2, 3))
        var_b = ((x - mean_b[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / (n - 1 if self.unbiased else n)
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        mean = (1 - self.w) * self.bn.running_mean + self.w * mean_b
        var = (1 - self.w) * self.bn.running_var + self.w * var_b
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.bn.eps)
        return y * self.bn.weight[None, :, None, None] + self.bn.bias[None, :, None, None]


def _step_logits(handle: ModelHandle, name: str, x: Tensor, **config: float) -> Tensor:
    strategy = adapters.get_strategy(name)
    cfg = strategy.config_cls(**config)
    return strategy.step(handle, x, strategy.init_state(handle, cfg), cfg).logits


def _alpha_reference(handle: ModelHandle, x: Tensor, test_weight: float, unbiased: bool = True) -> Tensor:
    model, _ = replace_bn(handle, lambda _, bn: MixedStatsBN(bn, test_weight, unbiased))
    with torch.no_grad():
        return model(x)


def test_source_equals_plain_eval_model(tiny_handle: ModelHandle) -> None:
    x = make_batch(6, seed=1)
    model, _ = replace_bn(tiny_handle)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_step_logits(tiny_handle, "source", x), expected, **TOL)


def test_source_prediction_does_not_depend_on_batch(tiny_handle: ModelHandle) -> None:
    x = make_batch(6, seed=2)
    together = _step_logits(tiny_handle, "source", x)
    alone = _step_logits(tiny_handle, "source", x[3:4])
    torch.testing.assert_close(alone[0], together[3], **TOL)


def test_norm_equals_model_with_batch_statistics(tiny_handle: ModelHandle) -> None:
    x = make_batch(6, seed=3)
    model, _ = replace_bn(tiny_handle, batch_stat_bn)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_step_logits(tiny_handle, "norm", x), expected, **TOL)
    source = _step_logits(tiny_handle, "source", x)
    assert not torch.allclose(source, expected, rtol=1e-2, atol=1e-2), "fixture must have source != norm"


def test_norm_equals_train_mode_batchnorm(tiny_handle: ModelHandle) -> None:
    x = make_batch(5, seed=4)
    model, bns = replace_bn(tiny_handle)
    for bn in bns.values():
        bn.train()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_step_logits(tiny_handle, "norm", x), expected, **TOL)


def test_alpha_zero_test_weight_equals_source(tiny_handle: ModelHandle) -> None:
    x = make_batch(6, seed=5)
    torch.testing.assert_close(
        _step_logits(tiny_handle, "alpha_bn", x, test_weight=0.0),
        _step_logits(tiny_handle, "source", x),
        **TOL,
    )


def test_alpha_full_test_weight_uses_unbiased_batch_variance(tiny_handle: ModelHandle) -> None:
    x = make_batch(2, seed=6)
    got = _step_logits(tiny_handle, "alpha_bn", x, test_weight=1.0)
    unbiased = _alpha_reference(tiny_handle, x, 1.0, unbiased=True)
    biased = _alpha_reference(tiny_handle, x, 1.0, unbiased=False)
    torch.testing.assert_close(got, unbiased, **TOL)
    # The biased variant is `norm`; the two must be far enough apart for this check to discriminate.
    torch.testing.assert_close(_step_logits(tiny_handle, "norm", x), biased, **TOL)
    assert (unbiased - biased).abs().max() > 20 * TOL["atol"]


@pytest.mark.parametrize("test_weight", [0.1, 0.35, 0.8])
def test_alpha_mixes_source_and_batch_statistics(tiny_handle: ModelHandle, test_weight: float) -> None:
    x = make_batch(4, seed=7)
    got = _step_logits(tiny_handle, "alpha_bn", x, test_weight=test_weight)
    torch.testing.assert_close(got, _alpha_reference(tiny_handle, x, test_weight), **TOL)


def test_alpha_default_weights_test_batch_by_a_tenth() -> None:
    cfg = adapters.get_strategy("alpha_bn").config_cls()
    assert isinstance(cfg, AlphaBNConfig) and cfg.test_weight == pytest.approx(0.1)


def test_alpha_single_image(tiny_handle: ModelHandle) -> None:
    x = make_batch(1, seed=8)
    got = _step_logits(tiny_handle, "alpha_bn", x, test_weight=0.1)
    assert got.shape == (1, tiny_handle.num_classes)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _alpha_reference(tiny_handle, x, 0.1), **TOL)


def test_stateless_strategies_keep_an_empty_state(tiny_handle: ModelHandle) -> None:
    for name in ("source", "norm", "alpha_bn"):
        strategy = adapters.get_strategy(name)
        cfg = strategy.config_cls()
        state = strategy.init_state(tiny_handle, cfg)
        result = strategy.step(tiny_handle, make_batch(3, seed=9), state, cfg)
        assert dict(result.state.tensors) == {}
        assert result.stats.updated is False


def _kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor) -> Tensor:
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5


def test_bn_distance_is_mean_symmetric_kl_to_source(tiny_handle: ModelHandle) -> None:
    x = make_batch(6, seed=10)
    model, bns = replace_bn(tiny_handle)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for name, bn in bns.items():
        bn.register_forward_pre_hook(
            lambda _, args, name=name: seen.__setitem__(
                name, (args[0].mean(dim=(0, 2, 3)), args[0].var(dim=(0, 2, 3), correction=0))
            )
        )
    with torch.no_grad():
        model(x)
    per_layer = []
    for layer in tiny_handle.bn_layers:
        mu_b, var_b = seen[layer.name]
        mu_s, var_s = layer.running_mean, layer.running_var
        per_layer.append((0.5 * (_kl(mu_b, var_b, mu_s, var_s) + _kl(mu_s, var_s, mu_b, var_b))).mean())
    expected = float(torch.stack(per_layer).mean())
    strategy = adapters.get_strategy("source")
    cfg = strategy.config_cls()
    stats = strategy.step(tiny_handle, x, strategy.init_state(tiny_handle, cfg), cfg).stats
    assert stats.bn_distance == pytest.approx(expected, rel=1e-4)
    assert expected > 0.01


def test_the_drift_grid_strides_each_bn_input_to_at_least_drift_positions() -> None:
    assert [grid_stride(h, h, 256) for h in (112, 56, 32, 28, 16, 14, 7)] == [7, 3, 2, 1, 1, 1, 1]
    assert grid_stride(112, 112, None) == 1 and grid_stride(3, 3, 1) == 3
    for h in (7, 16, 28, 32, 56, 112):
        s = grid_stride(h, h, 256)
        assert math.ceil(h / s) ** 2 >= min(256, h * h)  # at least that many positions (or every one)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    sample = on_grid(x, 4)
    assert torch.equal(sample, x[:, :, ::4, ::4]) and sample.shape[2:] == (3, 3)
    assert sample.is_contiguous(memory_format=torch.channels_last)  # compact, in the input's layout
    assert on_grid(x, 1) is x
    rows = torch.tensor([1])
    assert torch.equal(on_grid(x, 4, rows), x[1:, :, ::4, ::4]) and torch.equal(on_grid(x, 1, rows), x[1:])


def test_source_drift_figures_on_a_position_grid_leave_predictions_alone(tiny_handle: ModelHandle) -> None:
    """`drift_positions` samples each BN input's positions for bn_distance; the logits never change."""
    strategy = adapters.get_strategy("source")
    x = make_batch(6, seed=12)

    def step(positions: int | None) -> adapters.StepResult:
        cfg = SourceConfig(drift_positions=positions)
        return strategy.step(tiny_handle, x, strategy.init_state(tiny_handle, cfg), cfg)

    every, grid, whole = step(None), step(16), step(16 * 16)  # the tiny model's maps are at most 16x16
    assert torch.equal(grid.logits, every.logits)
    assert whole.stats.bn_distance == every.stats.bn_distance
    assert grid.stats.bn_distance != pytest.approx(every.stats.bn_distance, rel=1e-3)
    assert grid.stats.bn_distance == pytest.approx(every.stats.bn_distance, rel=0.5)  # an estimate of it
    with pytest.raises(ValueError):
        SourceConfig(drift_positions=0)


def test_source_drift_figures_come_from_the_first_drift_images(tiny_handle: ModelHandle) -> None:
    """`drift_images` bounds the images whose statistics make bn_distance; predictions never change."""
    strategy = adapters.get_strategy("source")
    x = make_batch(6, seed=11)

    def step(batch: Tensor, drift_images: int | None) -> adapters.StepResult:
        cfg = SourceConfig(drift_images=drift_images)
        return strategy.step(tiny_handle, batch, strategy.init_state(tiny_handle, cfg), cfg)

    every, first_two, head = step(x, None), step(x, 2), step(x[:2], None)
    assert torch.equal(first_two.logits, every.logits)
    assert first_two.stats.bn_distance == pytest.approx(head.stats.bn_distance, rel=1e-5)
    assert first_two.stats.bn_distance != pytest.approx(every.stats.bn_distance, rel=1e-3)
    assert step(x, 6).stats.bn_distance == every.stats.bn_distance
    assert strategy.config_cls is SourceConfig and SourceConfig().model_dump() == {
        "drift_images": 16,
        "drift_positions": 256,
    }
    with pytest.raises(ValueError):
        SourceConfig(drift_images=0)
