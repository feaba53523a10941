"""`alpha_bn`: mix source and test-batch statistics, docs/ALGORITHMS.md §2.

mu = (1 - w) * mu_s + w * mu_B and var = (1 - w) * var_s + w * var_B(unbiased), where w = `test_weight`
(the references' BN.ALPHA, default 0.1 = 90 % source). Stateless across batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor

from adapters._bn import (
    AdaptiveBatchNorm2d,
    BasePlan,
    Segments,
    channel_mean_var,
    check_batch_stats_possible,
    instance_mean_var,
    normalize_with,
    record_many,
    stacked_affine,
)
from adapters._strategy import ComposedStrategy
from adapters.base import STAT_KINDS, ModelHandle, StrategyConfig
from adapters.edge import NotExportableError
from adapters.registry import register_strategy


class AlphaBNConfig(StrategyConfig):
    test_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="weight of the test batch's statistics (1 - weight on the source's)"
    )


class AlphaStats:
    name = "alpha_bn"
    config_cls = AlphaBNConfig
    min_batch_size = 1  # a single image still gives H*W values per channel
    stat_kinds = STAT_KINDS
    requires_stats = True

    def init_tensors(self, handle: ModelHandle, cfg: AlphaBNConfig, seed: int) -> dict[str, Tensor]:
        return {}

    def plan(
        self,
        handle: ModelHandle,
        cfg: AlphaBNConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> AlphaPlan:
        return AlphaPlan(cfg.test_weight, affine, record)

    def edge_stats(
        self, handle: ModelHandle, cfg: AlphaBNConfig, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        if cfg.test_weight > 0:
            raise NotExportableError(
                f"it mixes each batch's BN statistics into the source ones (test_weight {cfg.test_weight:g})"
            )
        return {}


class AlphaPlan(BasePlan):
    def __init__(self, test_weight: float, affine: Mapping[str, Tensor] | None, record: bool) -> None:
        super().__init__(affine, record)
        self.w = test_weight

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        check_batch_stats_possible(x, layer.layer_name)
        mean_b, var_b = channel_mean_var(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        self._record(layer, mean_b, var_b)
        # lerp(a, b, w) = (1 - w) a + w b, one kernel each; the unbiased variance's factor folds into the weight.
        mean = torch.lerp(layer.running_mean, mean_b, self.w)
        var = torch.add(layer.running_var * (1 - self.w), var_b, alpha=self.w * n / (n - 1))
        w, b = self.weight_bias(layer)
        return normalize_with(x, mean, var, w, b, layer.eps)

    @staticmethod
    def normalize_many(
        plans: Sequence[AlphaPlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor:
        """`normalize` for several streams' rows at once (their plans share the weight in practice:
        streams share a forward only under one config)."""
        seg.check_batch_stats_possible(x, layer.layer_name)
        mean_b, var_b = seg.pool(*instance_mean_var(x))
        record_many(plans, layer, mean_b, var_b)
        n = seg.counts(x.device) * (x.shape[2] * x.shape[3])  # values per channel, (S, 1)
        if "alpha_bn.w" not in seg.memo:  # once per forward, not per layer (a host-to-device copy on a GPU)
            seg.memo["alpha_bn.w"] = torch.tensor([[plan.w] for plan in plans], device=x.device)
        w = seg.memo["alpha_bn.w"]
        mean = torch.lerp(layer.running_mean, mean_b, w)
        var = torch.addcmul(layer.running_var * (1 - w), var_b, w * n / (n - 1))
        weight, bias = stacked_affine(plans, layer, seg)
        return normalize_with(x, seg.expand(mean), seg.expand(var), weight, bias, layer.eps)

    def updated_tensors(self) -> dict[str, Tensor]:
        return {}


@register_strategy
def alpha_bn() -> ComposedStrategy:
    return ComposedStrategy("alpha_bn", "mix of source and test-batch BN statistics", AlphaStats())
