"""`ema_tbn`: test-time BN statistics as an exponential moving average across batches (docs/ALGORITHMS.md §8).

Every BN layer keeps a running mean and variance that start at the source statistics. An adapting
batch first moves them, mu <- (1 - m) mu + m mu_B and var <- (1 - m) var + m var_B (unbiased, as
torch's BatchNorm running update), then is normalised with the moved statistics; a batch with
adapt=False is normalised with the stored statistics and changes nothing. Default m = 0.1, torch's
BatchNorm momentum, which the reference's `bnema` setting uses.

Deviation: the reference runs the model twice per batch, once in train mode to move the running
statistics and once in eval mode to normalise with them, so each layer averages the statistics of its
input under *batch*-normalised upstream layers. Here one pass moves and uses the statistics layer by
layer, so each layer averages its input under the already-moved upstream statistics (half the compute;
the two agree in the first BN layer and converge as the averages settle).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field
from torch import Tensor

from adapters._bn import (
    AdaptiveBatchNorm2d,
    BasePlan,
    channel_mean_var,
    check_batch_stats_possible,
    normalize_with,
)
from adapters._strategy import ComposedStrategy
from adapters.base import STAT_KINDS, ModelHandle, StrategyConfig
from adapters.registry import register_strategy

PREFIX = "ema_tbn."


class EMATBNConfig(StrategyConfig):
    momentum: float = Field(0.1, gt=0, le=1, description="weight of each batch's statistics in the average")


def keys(layer_name: str) -> tuple[str, str]:
    return f"{PREFIX}{layer_name}.mean", f"{PREFIX}{layer_name}.var"


class EMAStats:
    name = "ema_tbn"
    config_cls = EMATBNConfig
    # One image still gives H*W values per channel; the unbiased variance needs two.
    min_batch_size = 1
    stat_kinds = STAT_KINDS
    requires_stats = True

    def init_tensors(self, handle: ModelHandle, cfg: EMATBNConfig, seed: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in handle.bn_layers:
            k_mean, k_var = keys(layer.name)
            out[k_mean] = layer.running_mean.detach().float().clone()
            out[k_var] = layer.running_var.detach().float().clone()
        return out

    def plan(
        self,
        handle: ModelHandle,
        cfg: EMATBNConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> EMAPlan:
        return EMAPlan(cfg.momentum, tensors, affine, update, record)

    def edge_stats(
        self, handle: ModelHandle, cfg: EMATBNConfig, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """adapt=false normalises with the stored averages: they are the BN layers' running statistics."""
        out: dict[str, Tensor] = {}
        for layer in handle.bn_layers:
            k_mean, k_var = keys(layer.name)
            out[f"{layer.name}.running_mean"] = tensors[k_mean]
            out[f"{layer.name}.running_var"] = tensors[k_var]
        return out


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
        self.momentum = momentum
        self.tensors = tensors
        self.update = update
        self.updates: dict[str, Tensor] = {}

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        k_mean, k_var = keys(layer.layer_name)
        mean, var = self.tensors[k_mean], self.tensors[k_var]
        if self.update or self.record:
            check_batch_stats_possible(x, layer.layer_name)
            mean_b, var_b = channel_mean_var(x)
            self._record(layer, mean_b, var_b)
            if self.update:
                n = x.shape[0] * x.shape[2] * x.shape[3]
                mean = torch.lerp(mean, mean_b, self.momentum)
                var = torch.lerp(var, var_b * (n / (n - 1)), self.momentum)
                self.updates[k_mean], self.updates[k_var] = mean.detach(), var.detach()
        w, b = self.weight_bias(layer)
        return normalize_with(x, mean, var, w, b, layer.eps)

    def updated_tensors(self) -> dict[str, Tensor]:
        return dict(self.updates)


@register_strategy
def ema_tbn() -> ComposedStrategy:
    return ComposedStrategy("ema_tbn", "test-batch BN statistics averaged across batches (EMA)", EMAStats())
