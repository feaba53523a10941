"""A strategy that is not built in, defined and registered in this one file: DUA's running statistics with a
decaying momentum (Mirza et al., "The Norm Must Go On: Dynamic Unsupervised Domain Adaptation by
Normalization", CVPR 2022; reference: github.com/jmiemirza/DUA).

Each BN layer keeps running statistics, starting from the source ones, and moves them towards every test batch
with a momentum that decays with the number of batches seen: m_t = momentum * decay^(t+1) + min_momentum, so the
first batches adapt the statistics quickly and later ones only refine them. Deviations from the reference: no
augmented copies of each image (the reference adapts on a batch of augmentations of one image), and the biased
batch variance. `dua_plugin` is the normaliser alone, `dua_plugin+tent` adds Tent's update; its config nests
per part, so the normaliser's `momentum` and the optimiser's `momentum` are different fields.

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

PREFIX = "dua_plugin."
STEPS = f"{PREFIX}batches"


class DUAConfig(StrategyConfig):
    momentum: float = Field(0.1, gt=0, le=1, description="initial momentum of the running statistics")
    decay: float = Field(0.94, gt=0, le=1, description="factor applied to the momentum after every batch")
    min_momentum: float = Field(0.005, ge=0, le=1, description="floor added to the decayed momentum")

    def momentum_at(self, batches_seen: Tensor) -> Tensor:
        return (self.momentum * self.decay ** (batches_seen + 1) + self.min_momentum).clamp(max=1.0)


def _keys(layer_name: str) -> tuple[str, str]:
    return f"{PREFIX}{layer_name}.mean", f"{PREFIX}{layer_name}.var"


class DUAStats:
    name = "dua_plugin"
    config_cls = DUAConfig
    min_batch_size = 1
    stat_kinds = STAT_KINDS
    requires_stats = True

    def init_tensors(self, handle: ModelHandle, cfg: DUAConfig, seed: int) -> dict[str, Tensor]:
        out = {STEPS: torch.zeros((), device=handle.device)}
        for layer in handle.bn_layers:
            k_mean, k_var = _keys(layer.name)
            out[k_mean], out[k_var] = layer.running_mean.float().clone(), layer.running_var.float().clone()
        return out

    def plan(
        self,
        handle: ModelHandle,
        cfg: DUAConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> DUAPlan:
        return DUAPlan(cfg.momentum_at(tensors[STEPS]), tensors, affine, update, record)


class DUAPlan(BasePlan):
    def __init__(
        self,
        momentum: Tensor,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        update: bool,
        record: bool,
    ) -> None:
        super().__init__(affine, record)
        self.momentum, self.tensors, self.update = momentum, tensors, update
        self._updated: dict[str, Tensor] = {STEPS: tensors[STEPS] + 1} if update else {}

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
def dua_plugin() -> ComposedStrategy:
    return ComposedStrategy("dua_plugin", "DUA: running BN statistics with a decaying momentum", DUAStats())


@register_strategy
def dua_plugin_tent() -> ComposedStrategy:
    summary = "entropy minimisation of BN affine parameters over DUA's running statistics"
    return ComposedStrategy("dua_plugin+tent", summary, DUAStats(), TentUpdater())
