"""A strategy that is not built in, defined and registered in this one file: a moving average of test-batch
statistics with the biased variance (the built-in `ema_tbn`, docs/ALGORITHMS.md §8, is the reference's).

Each BN layer normalises with an exponential moving average of test-batch statistics, the current
batch included: mu <- (1 - m) mu + m mu_B, var <- (1 - m) var + m var_B (biased), starting from the
source statistics. `ema_plugin` is the normaliser alone, `ema_plugin+tent` adds Tent's update; its config
nests per part, so the normaliser's `momentum` and the optimiser's `momentum` are different fields.

Importing this module registers both (tests/adapters/conftest.py does), and the contract suite, which
is parametrised over the registry, covers them like the built-ins.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field
from torch import Tensor

from adapters import ComposedStrategy, ModelHandle, StrategyConfig, register_strategy
from adapters._bn import (
    AdaptiveBatchNorm2d,
    BasePlan,
    channel_mean_var,
    check_batch_stats_possible,
    normalize_with,
)
from adapters.base import STAT_KINDS
from adapters.tent import TentUpdater

PREFIX = "ema_plugin."


class EMAPluginConfig(StrategyConfig):
    momentum: float = Field(
        0.1, gt=0, le=1, description="weight of each test batch in the running statistics"
    )


def _keys(layer_name: str) -> tuple[str, str]:
    return f"{PREFIX}{layer_name}.mean", f"{PREFIX}{layer_name}.var"


class EMAStats:
    name = "ema_plugin"
    config_cls = EMAPluginConfig
    min_batch_size = 1
    stat_kinds = STAT_KINDS
    requires_stats = True

    def init_tensors(self, handle: ModelHandle, cfg: EMAPluginConfig, seed: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in handle.bn_layers:
            k_mean, k_var = _keys(layer.name)
            out[k_mean], out[k_var] = layer.running_mean.float().clone(), layer.running_var.float().clone()
        return out

    def plan(
        self,
        handle: ModelHandle,
        cfg: EMAPluginConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> EMAPlan:
        return EMAPlan(cfg.momentum, tensors, affine, update, record)


class EMAPlan(BasePlan):
    def __init__(
        self,
        momentum: float,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        update: bool,
        record: bool,
    ) -> None:
        super().__init__(affine, record)
        self.momentum, self.tensors, self.update = momentum, tensors, update
        self._updated: dict[str, Tensor] = {}

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        check_batch_stats_possible(x, layer.layer_name)
        mean_b, var_b = channel_mean_var(x)
        self._record(layer, mean_b, var_b)
        k_mean, k_var = _keys(layer.layer_name)
        mean = torch.lerp(self.tensors[k_mean], mean_b, self.momentum)
        var = torch.lerp(self.tensors[k_var], var_b, self.momentum)
        if self.update:
            self._updated[k_mean], self._updated[k_var] = mean.detach(), var.detach()
        w, b = self.weight_bias(layer)
        return normalize_with(x, mean, var, w, b, layer.eps)

    def updated_tensors(self) -> dict[str, Tensor]:
        return dict(self._updated)


@register_strategy
def ema_plugin() -> ComposedStrategy:
    return ComposedStrategy("ema_plugin", "moving average of test-batch BN statistics", EMAStats())


@register_strategy
def ema_plugin_tent() -> ComposedStrategy:
    summary = "entropy minimisation of BN affine parameters over EMA-TBN statistics"
    return ComposedStrategy("ema_plugin+tent", summary, EMAStats(), TentUpdater())
