"""BatchNorm plumbing: swap BN2d layers once at load time for a layer whose behaviour is chosen per call.

The base model is shared by every stream and never mutated. A strategy describes how each BN layer
normalises for one forward pass with a `NormPlan`, activated through a context variable, so concurrent
requests of different streams (threads or tasks) each see their own statistics and affine parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.base import BatchTooSmallError, BNLayer, IncompatibleModelError


class NormPlan(Protocol):
    """How every adaptive BN layer normalises during one forward pass."""

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor: ...


_ACTIVE_PLAN: ContextVar[NormPlan | None] = ContextVar("tta_norm_plan", default=None)


class AdaptiveBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that defers to the active NormPlan, or behaves as plain eval-mode BN without one."""

    layer_index: int = -1
    layer_name: str = ""
    # Always set: `convert_batchnorm` only converts layers that track running statistics.
    running_mean: Tensor
    running_var: Tensor

    def forward(self, x: Tensor) -> Tensor:
        plan = _ACTIVE_PLAN.get()
        if plan is None:
            return super().forward(x)
        return plan.normalize(self, x)


@contextmanager
def active_plan(plan: NormPlan) -> Iterator[None]:
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield
    finally:
        _ACTIVE_PLAN.reset(token)


def convert_batchnorm(model: nn.Module) -> tuple[BNLayer, ...]:
    """Replace every BatchNorm2d in `model` (in place, once, at load time) and index the layers.

    Parameters and buffers are shared with the original layers, so state_dict keys are unchanged.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not targets:
        raise IncompatibleModelError("model has no BatchNorm2d layers; test-time BN adaptation needs them")
    layers: list[BNLayer] = []
    for index, (name, bn) in enumerate(targets):
        if not (bn.affine and bn.track_running_stats) or bn.running_mean is None or bn.running_var is None:
            raise IncompatibleModelError(f"BN layer {name!r} must be affine and track running statistics")
        new = AdaptiveBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.layer_index, new.layer_name = index, name
        new.eval()
        _set_submodule(model, name, new)
        layers.append(
            BNLayer(
                name=name,
                index=index,
                num_features=bn.num_features,
                eps=bn.eps,
                running_mean=bn.running_mean.detach(),
                running_var=bn.running_var.detach(),
                weight=bn.weight.detach(),
                bias=bn.bias.detach(),
            )
        )
    return tuple(layers)


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_batch_stats_possible(x: Tensor, layer_name: str) -> None:
    """Batch statistics need at least two values per channel (PyTorch's own limit)."""
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise BatchTooSmallError(
            f"BN layer {layer_name!r} sees one value per channel (batch {x.shape[0]}, "
            f"spatial {x.shape[2]}x{x.shape[3]}); send a larger batch or use a strategy that "
            "supports single samples (source, alpha_bn, unmix_tns)"
        )


def _bcast(v: Tensor) -> Tensor:
    """Per-channel (C) or per-sample, per-channel (B, C) values, shaped to broadcast over (B, C, H, W)."""
    return v.reshape(-1 if v.ndim == 2 else 1, v.shape[-1], 1, 1)


def normalize_with(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Affine normalisation with given statistics, per channel (C,) or per sample and channel (B, C);
    differentiable in all of them."""
    scale = weight * torch.rsqrt(var + eps)
    shift = torch.addcmul(bias, mean, scale, value=-1)
    # One fused pass over x (a multiply then an add is two, and up to 6x slower on CPU at cache-sized shapes).
    return torch.addcmul(_bcast(shift).to(x.dtype), x, _bcast(scale).to(x.dtype))


def fast_stats_ok(x: Tensor) -> bool:
    """Whether statistics of `x` may skip `torch.var_mean`, whose Welford reduction is slow on CPU.

    The replacements (the fused BatchNorm statistics kernel, which has no autograd formula, or a plain
    two-pass mean and variance) give the same moments up to float rounding, 3-10x faster on CPU.
    """
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def channel_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, H, W), in float32."""
    x = x.float()
    if fast_stats_ok(x):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean, var
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


class GroupedPlan:
    """Several streams in one forward pass: each BN layer normalises each stream's rows with that stream's plan.

    Everything else in an eval-mode network acts on each sample alone, so a forward under this plan
    gives every stream exactly what its own forward would: statistics, updates and drift are per plan.
    """

    def __init__(self, plans: Sequence[NormPlan], sizes: list[int]) -> None:
        self.plans = plans
        self.sizes = sizes

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        parts = x.split(self.sizes)  # views: the batch is the outermost dimension in both memory layouts
        return torch.cat([plan.normalize(layer, part) for plan, part in zip(self.plans, parts, strict=True)])


class BasePlan:
    """Shared bookkeeping: per-layer affine overrides and (optionally) recorded batch statistics.

    `affine` maps `<layer>.weight` / `<layer>.bias` to tensors that replace the source parameters.
    With `record=True` each layer stores the batch mean and biased variance it saw, for drift signals.
    """

    def __init__(self, affine: Mapping[str, Tensor] | None = None, record: bool = False) -> None:
        self.affine = affine or {}
        self.record = record
        self.batch_stats: dict[int, tuple[Tensor, Tensor]] = {}

    def weight_bias(self, layer: AdaptiveBatchNorm2d) -> tuple[Tensor, Tensor]:
        w = self.affine.get(f"{layer.layer_name}.weight", layer.weight)
        b = self.affine.get(f"{layer.layer_name}.bias", layer.bias)
        return w, b

    def _record(self, layer: AdaptiveBatchNorm2d, mean: Tensor, var_biased: Tensor) -> None:
        if self.record:
            self.batch_stats[layer.layer_index] = (mean.detach(), var_biased.detach())


class SourcePlan(BasePlan):
    """Normalise with the frozen source running statistics (eval-mode BN)."""

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        if self.record:
            mean, var = channel_mean_var(x.detach())
            self._record(layer, mean, var)
        w, b = self.weight_bias(layer)
        return F.batch_norm(x, layer.running_mean, layer.running_var, w, b, False, 0.0, layer.eps)


class BatchStatsPlan(BasePlan):
    """Normalise with the current batch's mean and biased variance (TBN; Tent/EATA/SAR forward)."""

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        check_batch_stats_possible(x, layer.layer_name)
        w, b = self.weight_bias(layer)
        if not self.record:
            return F.batch_norm(x, None, None, w, b, True, 0.0, layer.eps)
        # momentum 1.0 makes the fused kernel copy the batch mean and unbiased variance into scratch buffers.
        c = x.shape[1]
        rm = torch.zeros(c, device=x.device, dtype=torch.float32)
        rv = torch.ones(c, device=x.device, dtype=torch.float32)
        y = F.batch_norm(x, rm, rv, w, b, True, 1.0, layer.eps)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        self._record(layer, rm, rv * ((n - 1) / n))
        return y
