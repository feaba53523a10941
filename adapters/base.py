"""Core types shared by every strategy: the model handle, the adaptation state and step results."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class AdaptError(Exception):
    """Base class of every error raised by the adaptation core."""

    error_type = "adaptation_error"


class IncompatibleModelError(AdaptError):
    """The model cannot be adapted by this strategy (for example it has no BatchNorm layers)."""

    error_type = "incompatible_model"


class ModelLoadError(AdaptError):
    """A declared model cannot be built: unknown architecture, unusable weights or input size."""

    error_type = "model_load_error"


class BatchTooSmallError(AdaptError):
    """The batch is too small for the statistics a strategy needs."""

    error_type = "batch_too_small"


class StateMismatchError(AdaptError):
    """A stored state belongs to another model, strategy or schema version."""

    error_type = "state_mismatch"


class UnknownStrategyError(AdaptError):
    """No strategy is registered under the requested name."""

    error_type = "unknown_strategy"


class StrategyConfig(BaseModel):
    """Base of every strategy's hyper-parameters: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# The kinds of normalisation layer a model may have. Statistics strategies replace the statistics of
# "batchnorm2d" layers; gradient updaters train the affine parameters of the `AFFINE_KINDS`.
# "batchnorm1d" layers are counted but not adapted (they keep their source statistics and parameters).
LayerKind = Literal["batchnorm2d", "batchnorm1d", "layernorm", "groupnorm"]
STAT_KINDS: frozenset[LayerKind] = frozenset({"batchnorm2d"})
AFFINE_KINDS: frozenset[LayerKind] = frozenset({"batchnorm2d", "layernorm", "groupnorm"})


def merge_config(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid over `base`, recursing where both hold a mapping under the same key."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = (
            merge_config(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
        )
    return out


@dataclass(frozen=True, eq=False)
class AffineLayer:
    """A normalisation layer of the base model whose affine parameters an updater may train."""

    name: str
    kind: LayerKind
    weight: Tensor
    bias: Tensor


@dataclass(frozen=True, eq=False)
class BNLayer:
    """One BatchNorm2d layer of the base model with its frozen source statistics."""

    name: str
    index: int
    num_features: int
    eps: float
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor
    bias: Tensor


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A loaded, frozen base model and what strategies need to know about it.

    `model` maps float images in [0, 1] (NCHW) to logits; input normalisation is inside it.
    `source_images(n, seed)` returns n clean in-distribution images for strategies that need source
    data (EATA's Fisher); it is None when the model was declared without source data. `source_labels(n,
    seed)` returns the class labels of the same draw (RMT's prototypes and replay); None when the source
    data has no labels.
    `autocast_dtype`: when set, forward passes run under torch.autocast with this dtype.
    `bn_layers` are the BatchNorm2d layers (statistics strategies adapt them); `affine_layers` every
    normalisation layer with trainable affine parameters (BN2d, LayerNorm, GroupNorm), in module order
    (empty: the BN layers); `layer_counts` counts the normalisation layers the forward runs, by kind.
    `top_modules`: module-name prefixes of the top of the network, whose layers SAR leaves frozen.
    `strategy_defaults`: per strategy name, the hyper-parameters it starts from on this model (models.yaml),
    under whatever a stream's own config sets (`strategy_config`).
    """

    model_id: str
    model: nn.Module
    bn_layers: tuple[BNLayer, ...]
    num_classes: int
    fingerprint: str
    device: torch.device
    classes: tuple[str, ...] = ()
    input_size: tuple[int, int] = (32, 32)
    source_images: Callable[[int, int], Tensor] | None = None
    source_labels: Callable[[int, int], Tensor] | None = None
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    affine_layers: tuple[AffineLayer, ...] = ()
    layer_counts: Mapping[str, int] = field(default_factory=dict)
    top_modules: tuple[str, ...] = ()
    # Source-dependent tensors made once by `tta-bench prepare-source` (the model's `source_artifact`), e.g.
    # EATA's Fisher under `eata.fisher.<key digest>.<parameter>`; empty: computed at first use.
    prepared: Mapping[str, Tensor] = field(default_factory=dict)
    strategy_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    _moments: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def strategy_config(self, strategy: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """`config` laid over this model's declared defaults for `strategy`; a composite's part configs
        (nested mappings) merge key by key, so a stream that sets one field keeps the model's others."""
        return merge_config(self.strategy_defaults.get(strategy, {}), config or {})

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's reduced-precision context (a no-op for float32 models)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def source_moments(self, indices: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """BN layers `indices`' source running means and variances, each concatenated over the layers, and
        every channel's weight 1 / (layers x its layer's channels): a weighted sum over the concatenation is
        the mean over layers of per-layer channel means. Memoised, because the model never changes."""
        cached = self._moments.get(indices)
        if cached is None:
            layers = [self.bn_layers[i] for i in indices]
            share = [torch.full((bn.num_features,), 1.0 / (bn.num_features * len(layers))) for bn in layers]
            cached = (
                torch.cat([bn.running_mean.float() for bn in layers]),
                torch.cat([bn.running_var.float() for bn in layers]),
                torch.cat(share).to(self.device),
            )
            self._moments[indices] = cached
        return cached

    def trainable_layers(self) -> tuple[AffineLayer, ...]:
        """The normalisation layers whose affine parameters updaters train, in module order."""
        if self.affine_layers:
            return self.affine_layers
        return tuple(AffineLayer(bn.name, "batchnorm2d", bn.weight, bn.bias) for bn in self.bn_layers)

    def layer_kinds(self) -> frozenset[str]:
        """The kinds of normalisation layer (`LayerKind`) that strategies can adapt in this model."""
        return frozenset(layer.kind for layer in self.trainable_layers()) | (
            frozenset({"batchnorm2d"}) if self.bn_layers else frozenset()
        )

    def affine_names(self) -> list[str]:
        """State keys of every trainable normalisation layer's affine parameters, in layer order."""
        return [f"{layer.name}.{p}" for layer in self.trainable_layers() for p in ("weight", "bias")]

    def source_affine(self) -> dict[str, Tensor]:
        """The source model's affine parameters keyed like `affine_names()`."""
        out: dict[str, Tensor] = {}
        for layer in self.trainable_layers():
            out[f"{layer.name}.weight"] = layer.weight
            out[f"{layer.name}.bias"] = layer.bias
        return out


@dataclass(frozen=True)
class AdaptationState:
    """A stream's whole adaptive state: a flat mapping of tensors plus JSON-able meta."""

    tensors: Mapping[str, Tensor]
    meta: Mapping[str, Any]

    def with_updates(self, tensors: Mapping[str, Tensor] | None = None, **meta: Any) -> AdaptationState:
        """A copy with some tensors and meta entries replaced."""
        new_tensors = dict(self.tensors)
        if tensors:
            new_tensors.update(tensors)
        new_meta = dict(self.meta)
        new_meta.update(meta)
        return AdaptationState(new_tensors, new_meta)


@dataclass(frozen=True)
class StepStats:
    """Plain numbers describing one step, turned into metrics by the server."""

    samples: int
    used: int = 0
    filtered: int = 0
    updated: bool = False
    mean_entropy: float = 0.0
    mean_confidence: float = 0.0
    loss: float | None = None
    bn_distance: float | None = None
    reset: bool = False
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """`logits` are on the host (float32): the step's one device-to-host copy brings them with the stats."""

    logits: Tensor
    state: AdaptationState
    stats: StepStats
