"""`source` (no adaptation) and `norm` (test-batch statistics, TBN): docs/ALGORITHMS.md §1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field
from torch import Tensor

from adapters._bn import AdaptiveBatchNorm2d, BatchStatsPlan, Segments, SourcePlan
from adapters._strategy import ComposedStrategy
from adapters.base import STAT_KINDS, ModelHandle, StrategyConfig
from adapters.edge import NotExportableError
from adapters.registry import register_strategy


class _Stateless:
    config_cls = StrategyConfig

    def init_tensors(self, handle: ModelHandle, cfg: StrategyConfig, seed: int) -> dict[str, Tensor]:
        return {}


class SourceConfig(StrategyConfig):
    drift_images: int | None = Field(
        16,
        ge=1,
        description="Drift figures (bn_distance) from at most this many images of each batch, its first "
        "ones; null: every image. Predictions never depend on it: it only bounds the one pass over each "
        "BatchNorm input that measuring drift adds to a source forward.",
    )
    drift_positions: int | None = Field(
        256,
        ge=1,
        description="Drift figures read each of those images on an even grid of at least this many positions "
        "of every BatchNorm input (stride floor(sqrt(H*W / drift_positions)) in both directions); null: every "
        "position. Predictions never depend on it: on 224x224 inputs it makes the drift pass a small fraction "
        "of the forward.",
    )


class SourceStats(_Stateless):
    """Frozen source running statistics: the control arm."""

    name = "source"
    config_cls = SourceConfig
    min_batch_size = 1
    stat_kinds: frozenset[str] = frozenset()
    requires_stats = False

    def plan(
        self,
        handle: ModelHandle,
        cfg: SourceConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> _StatelessPlan:
        return _StatelessPlan(SourcePlan(affine, record, cfg.drift_images, cfg.drift_positions))

    def edge_stats(
        self, handle: ModelHandle, cfg: SourceConfig, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {}  # the source statistics


class BatchStats(_Stateless):
    """Current test batch's statistics (biased variance), source affine parameters.

    `required=False` (under the gradient updaters): a model without BatchNorm2d is accepted, and its
    LayerNorm/GroupNorm layers keep computing their own statistics.
    """

    name = "norm"
    # A single 2-D sample still has H*W values per channel (instance normalisation, poor but defined).
    min_batch_size = 1
    stat_kinds = STAT_KINDS

    def __init__(self, required: bool = True) -> None:
        self.requires_stats = required

    def plan(
        self,
        handle: ModelHandle,
        cfg: StrategyConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> _StatelessPlan:
        return _StatelessPlan(BatchStatsPlan(affine, record))

    def edge_stats(
        self, handle: ModelHandle, cfg: StrategyConfig, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        if handle.bn_layers:
            raise NotExportableError("its BatchNorm layers normalise each batch with that batch's statistics")
        return {}  # no BatchNorm: LayerNorm/GroupNorm compute per-sample statistics, as at the edge


class _StatelessPlan:
    """Adapts a BasePlan to the StatPlan protocol: it changes no stored tensors."""

    def __init__(self, inner: SourcePlan | BatchStatsPlan) -> None:
        self.inner = inner
        self.batch_stats = inner.batch_stats
        self.normalize = inner.normalize
        self.affine_param = inner.affine_param

    @staticmethod
    def normalize_many(
        plans: Sequence[_StatelessPlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor:
        inner = [plan.inner for plan in plans]
        kind = type(inner[0])
        if any(type(plan) is not kind for plan in inner):
            raise ValueError("streams in one forward pass have different normalisers")
        return kind.normalize_many(inner, layer, x, seg)  # type: ignore[arg-type]

    def updated_tensors(self) -> dict[str, Tensor]:
        return {}


@register_strategy
def source() -> ComposedStrategy:
    return ComposedStrategy("source", "no adaptation (source statistics)", SourceStats())


@register_strategy
def norm() -> ComposedStrategy:
    return ComposedStrategy("norm", "test-batch BN statistics", BatchStats())
