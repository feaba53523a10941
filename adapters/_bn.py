"""Normalisation plumbing: swap BN2d layers once at load time for a layer whose behaviour is chosen per
call, and give LayerNorm / GroupNorm layers affine parameters chosen per call.

The base model is shared by every stream and never mutated. A strategy describes how each BN layer
normalises for one forward pass with a `NormPlan`, activated through a context variable, so concurrent
requests of different streams (threads or tasks) each see their own statistics and affine parameters.
LayerNorm and GroupNorm layers (of any subclass) keep computing their own statistics; only the
`weight` and `bias` they read come from the plan (`NormPlan.affine_param`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.base import AffineLayer, BatchTooSmallError, BNLayer, IncompatibleModelError, LayerKind


class NormPlan(Protocol):
    """How every adaptive BN layer normalises during one forward pass."""

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor: ...

    def affine_param(self, key: str, source: Tensor) -> Tensor:
        """The tensor a LayerNorm/GroupNorm layer uses as its parameter `key` (`<layer>.weight`)."""
        ...


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
    return _convert_bn(model, [name for name, _ in targets])


def _convert_bn(model: nn.Module, names: Sequence[str]) -> tuple[BNLayer, ...]:
    layers: list[BNLayer] = []
    for index, name in enumerate(names):
        bn = model.get_submodule(name)
        assert isinstance(bn, nn.BatchNorm2d)
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


class _PlannedAffine:
    """Mixed into a LayerNorm/GroupNorm (sub)class: `weight` and `bias` come from the active plan.

    The layer's own forward runs unchanged (whatever the subclass does, e.g. permuting channels), and
    reads `self.weight` / `self.bias`, which these properties answer; the parameters themselves stay
    in `_parameters`, so state_dict keys, loading and `.to()` are unaffected.
    """

    _parameters: dict[str, nn.Parameter | None]
    tta_layer_name: str

    def _planned(self, key: str) -> Tensor | None:
        param = self._parameters[key]
        plan = _ACTIVE_PLAN.get()
        if plan is None or param is None:
            return param
        return plan.affine_param(f"{self.tta_layer_name}.{key}", param)

    @property
    def weight(self) -> Tensor | None:
        return self._planned("weight")

    @property
    def bias(self) -> Tensor | None:
        return self._planned("bias")


_PLANNED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _planned_class(cls: type[nn.Module]) -> type[nn.Module]:
    planned = _PLANNED_CLASSES.get(cls)
    if planned is None:
        planned = type(f"Planned{cls.__name__}", (_PlannedAffine, cls), {"__module__": __name__})
        _PLANNED_CLASSES[cls] = planned
    return planned


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The normalisation kind of a module (subclasses included), or None."""
    if isinstance(module, nn.BatchNorm2d):
        return "batchnorm2d"
    if isinstance(module, nn.BatchNorm1d):
        return "batchnorm1d"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    return None


def convert_norm_layers(
    model: nn.Module, used: set[str] | None = None
) -> tuple[tuple[BNLayer, ...], tuple[AffineLayer, ...], dict[str, int]]:
    """Prepare every normalisation layer of `model` (in place, once, at load time) for adaptation.

    BatchNorm2d layers that are affine and track running statistics become `AdaptiveBatchNorm2d`
    (as `convert_batchnorm`); affine LayerNorm and GroupNorm layers read their parameters from the
    active plan. `used` (module names the forward runs; None: all) leaves the others alone, so no
    layer is trained that never receives a gradient. Returns the BN layers, every layer with
    trainable affine parameters (module order), and the used normalisation layers counted by kind
    (a BN2d layer without running statistics or affine parameters counts as "batchnorm2d" but is
    not adapted; BatchNorm1d is counted, never adapted).
    """
    found: list[tuple[str, nn.Module, LayerKind]] = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None and (used is None or name in used):
            found.append((name, module, kind))
    counts: dict[str, int] = {}
    for _, _, kind in found:
        counts[kind] = counts.get(kind, 0) + 1
    bn_targets = [n for n, m, _ in found if _adaptable_bn(m)]
    bn_layers = _convert_bn(model, bn_targets) if bn_targets else ()
    by_name = {layer.name: layer for layer in bn_layers}
    affine: list[AffineLayer] = []
    for name, module, kind in found:
        if name in by_name:
            bn = by_name[name]
            affine.append(AffineLayer(name, "batchnorm2d", bn.weight, bn.bias))
        elif kind in ("layernorm", "groupnorm"):
            weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
            if weight is None or bias is None:
                continue  # no affine parameters: nothing to adapt
            module.__class__ = _planned_class(type(module))
            setattr(module, "tta_layer_name", name)  # noqa: B010 - a plain attribute, not a submodule
            affine.append(AffineLayer(name, kind, weight.detach(), bias.detach()))
    return bn_layers, tuple(affine), counts


def _adaptable_bn(m: nn.Module) -> bool:
    """A BatchNorm2d whose statistics a plan can set: affine, with running statistics, and not a
    subclass with a forward of its own (e.g. BN fused with an activation, which a swap would drop)."""
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is nn.BatchNorm2d.forward
        and m.affine
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    )


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


def instance_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and biased variance over (H, W), in float32, shapes (B, C)."""
    x = x.float()
    if not fast_stats_ok(x):
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        return mean, var
    # Two passes (mean, then mean squared deviation), a few samples at a time: with a small temporary this
    # memory-bound work stays in cache. On CPU it is 3-10x faster than var_mean's Welford reduction.
    mean = x.mean(dim=(2, 3), keepdim=True)
    step = max(1, (1 << 20) // x[0].numel())
    chunks = zip(x.split(step), mean.split(step), strict=True)
    parts = [torch.sub(xs, ms).square_().mean(dim=(2, 3)) for xs, ms in chunks]
    return mean.view(x.shape[:2]), torch.cat(parts)


class Segments:
    """The row segments of a batch stacked from several streams (`sizes[i]` rows of stream i, in order).

    Segment reductions are matrix products with a (streams, rows) 0/1 membership matrix: one kernel
    for all streams, deterministic (unlike scatter-adds on a GPU), and no per-stream slicing.
    `memo` keeps what several layers of one forward share (e.g. the streams' stacked tables).
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.rows = sum(self.sizes)
        self.singletons = all(n == 1 for n in self.sizes)
        self.memo: dict[str, Any] = {}
        self._device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(membership (S, B), rows per stream (S, 1), stream of each row (B,)) on `device`."""
        got = self._device.get(device)
        if got is None:
            # Built from Python lists on the host: nothing reads device data (no host synchronisation).
            counts = torch.tensor([[n] for n in self.sizes], dtype=torch.float32)
            owner = torch.tensor([i for i, n in enumerate(self.sizes) for _ in range(n)])
            member = torch.zeros(len(self.sizes), self.rows)
            member[owner, torch.arange(self.rows)] = 1.0
            got = (member.to(device), counts.to(device), owner.to(device))
            self._device[device] = got
        return got

    def counts(self, device: torch.device) -> Tensor:
        """Rows per stream, (S, 1) float32."""
        return self._on(device)[1]

    def owner(self, device: torch.device) -> Tensor:
        """The stream index of every row, (B,)."""
        return self._on(device)[2]

    def sum(self, rows: Tensor) -> Tensor:
        """Per-stream sums of per-row values (B, ...) -> (S, ...)."""
        if self.singletons:
            return rows
        member = self._on(rows.device)[0]
        return (member @ rows.reshape(self.rows, -1)).view(len(self.sizes), *rows.shape[1:])

    def pool(self, mu_i: Tensor, var_i: Tensor) -> tuple[Tensor, Tensor]:
        """Each stream's batch mean and biased variance from its rows' instance statistics (B, C): the mean
        of mu_i, and the mean of var_i + (mu_i - mean)^2 (law of total variance; every row has the same
        number of values)."""
        if self.singletons:
            return mu_i, var_i
        if len(self.sizes) == 1:  # one stream: plain means over the rows
            mean = mu_i.mean(0, keepdim=True)
            return mean, (var_i + (mu_i - mean).square_()).mean(0, keepdim=True)
        counts = self.counts(mu_i.device)
        mean = self.sum(mu_i) / counts
        return mean, self.sum(var_i + (mu_i - self.expand(mean)).square_()) / counts

    def expand(self, per_stream: Tensor) -> Tensor:
        """Per-stream values (S, ...) -> per-row values (B, ...)."""
        if self.singletons:
            return per_stream
        return per_stream.index_select(0, self.owner(per_stream.device))

    def split(self, rows: Tensor) -> tuple[Tensor, ...]:
        return rows.split(self.sizes)

    def check_batch_stats_possible(self, x: Tensor, layer_name: str) -> None:
        """`check_batch_stats_possible` for the smallest stream's rows."""
        check_batch_stats_possible(x[: min(self.sizes)], layer_name)


def stacked_affine(
    plans: Sequence[BasePlan], layer: AdaptiveBatchNorm2d, seg: Segments
) -> tuple[Tensor, Tensor]:
    """The plans' affine parameters of `layer`: the shared (C,) tensors when every plan uses the same
    ones (the common case: source parameters), else per row (B, C)."""
    pairs = [plan.weight_bias(layer) for plan in plans]
    if all(w is pairs[0][0] and b is pairs[0][1] for w, b in pairs):
        return pairs[0]
    return seg.expand(torch.stack([w for w, _ in pairs])), seg.expand(torch.stack([b for _, b in pairs]))


class ManyPlan(Protocol):
    """A plan class that normalises the rows of several streams' plans (all of its type) in one pass."""

    @staticmethod
    def normalize_many(
        plans: Sequence[NormPlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor: ...


class GroupedPlan:
    """Several streams in one forward pass: each BN layer normalises each stream's rows with that stream's plan.

    Everything else in an eval-mode network acts on each sample alone, so a forward under this plan
    gives every stream exactly what its own forward would (up to float rounding): statistics, updates
    and drift are per plan. Plans of one type with a `normalize_many` (source, norm, alpha_bn,
    unmix_tns) are served in one pass over the stacked batch, with segmented reductions; any other
    mix, one plan at a time on its rows.
    """

    def __init__(self, plans: Sequence[NormPlan], sizes: list[int]) -> None:
        self.plans = plans
        self.sizes = sizes
        self.segments = Segments(sizes)
        kinds = {type(plan) for plan in plans}
        many = getattr(next(iter(kinds)), "normalize_many", None) if len(kinds) == 1 else None
        self._many: ManyPlan | None = type(plans[0]) if many is not None else None  # type: ignore[assignment]

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        if self._many is not None:
            return self._many.normalize_many(self.plans, layer, x, self.segments)
        parts = x.split(self.sizes)  # views: the batch is the outermost dimension in both memory layouts
        return torch.cat([plan.normalize(layer, part) for plan, part in zip(self.plans, parts, strict=True)])

    def affine_param(self, key: str, source: Tensor) -> Tensor:
        # One tensor serves the whole batch, so the plans must agree (the strategies only group
        # streams whose LayerNorm/GroupNorm parameters are the source ones: `can_step_many`).
        chosen = {id(t): t for t in (plan.affine_param(key, source) for plan in self.plans)}
        if len(chosen) != 1:
            raise ValueError(f"streams in one forward pass have different parameters {key!r}")
        return next(iter(chosen.values()))


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

    def affine_param(self, key: str, source: Tensor) -> Tensor:
        return self.affine.get(key, source)

    def _record(self, layer: AdaptiveBatchNorm2d, mean: Tensor, var_biased: Tensor) -> None:
        if self.record:
            self.batch_stats[layer.layer_index] = (mean.detach(), var_biased.detach())


def grid_stride(height: int, width: int, positions: int | None) -> int:
    """The stride, in both directions, of an even grid of at least `positions` of a (height, width) feature
    map (1: every position; also when `positions` is None)."""
    if positions is None:
        return 1
    return max(1, math.isqrt(height * width // positions))


def on_grid(x: Tensor, stride: int, rows: Tensor | None = None) -> Tensor:
    """`x` (N, C, H, W) read every `stride` rows and columns (and only its batch rows `rows`, None: all) as one
    compact copy (`x` itself when nothing is dropped): the reductions over a strided view are slower than the
    full pass they replace, over a copy of it they are not. The grid view is taken before the rows are
    selected, so only the sample is copied."""
    grid = x if stride == 1 else x[:, :, ::stride, ::stride]
    if rows is not None:
        return grid.index_select(0, rows)
    return grid if stride == 1 else grid.clone(memory_format=torch.preserve_format)


class SourcePlan(BasePlan):
    """Normalise with the frozen source running statistics (eval-mode BN).

    The recorded statistics serve only the drift figures, and are the one pass over each layer's input
    this plan adds to the stock forward, so they are taken from a sample of it: the batch's first
    `drift_images` images (None: every image), each read on an even grid of at least `drift_positions`
    positions per layer (None: every position). The grid depends only on the layer, so a stream's figures
    are the same in its own step and in a shared forward.
    """

    def __init__(
        self,
        affine: Mapping[str, Tensor] | None = None,
        record: bool = False,
        drift_images: int | None = None,
        drift_positions: int | None = None,
    ) -> None:
        super().__init__(affine, record)
        self.drift_images = drift_images
        self.drift_positions = drift_positions

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        if self.record:
            k = self.drift_images
            stride = grid_stride(x.shape[2], x.shape[3], self.drift_positions)
            mean, var = channel_mean_var(on_grid((x if k is None else x[:k]).detach(), stride))
            self._record(layer, mean, var)
        w, b = self.weight_bias(layer)
        return F.batch_norm(x, layer.running_mean, layer.running_var, w, b, False, 0.0, layer.eps)

    @staticmethod
    def normalize_many(
        plans: Sequence[SourcePlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor:
        if any(plan.record for plan in plans):
            rows, sample = SourcePlan._drift_sample(plans, seg, x.device)
            # One grid for all: the streams of a shared forward share their config.
            stride = grid_stride(x.shape[2], x.shape[3], plans[0].drift_positions)
            xs = on_grid(x.detach(), stride, rows)
            record_many(plans, layer, *sample.pool(*instance_mean_var(xs)))
        w, b = stacked_affine(plans, layer, seg)
        if w.ndim == 1:
            return F.batch_norm(x, layer.running_mean, layer.running_var, w, b, False, 0.0, layer.eps)
        return normalize_with(x, layer.running_mean, layer.running_var, w, b, layer.eps)

    @staticmethod
    def _drift_sample(
        plans: Sequence[SourcePlan], seg: Segments, device: torch.device
    ) -> tuple[Tensor | None, Segments]:
        """The rows whose statistics each stream records (its first `drift_images`), as in `normalize`:
        None and `seg` itself when that is every row. Made once per forward."""
        got: tuple[Tensor | None, Segments] | None = seg.memo.get("source_drift_sample")
        if got is None:
            kept = [
                n if plan.drift_images is None else min(n, plan.drift_images)
                for plan, n in zip(plans, seg.sizes, strict=True)
            ]
            if kept == seg.sizes:
                got = (None, seg)
            else:
                starts = itertools.accumulate(seg.sizes[:-1], initial=0)
                rows = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, kept, strict=True)])
                got = (rows.to(device), Segments(kept))
            seg.memo["source_drift_sample"] = got
        return got


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

    @staticmethod
    def normalize_many(
        plans: Sequence[BatchStatsPlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor:
        seg.check_batch_stats_possible(x, layer.layer_name)
        mean, var = seg.pool(*instance_mean_var(x))
        record_many(plans, layer, mean, var)
        w, b = stacked_affine(plans, layer, seg)
        return normalize_with(x, seg.expand(mean), seg.expand(var), w, b, layer.eps)


def record_many(plans: Sequence[BasePlan], layer: AdaptiveBatchNorm2d, mean: Tensor, var: Tensor) -> None:
    """Give each recording plan its row of the per-stream (S, C) statistics."""
    for plan, m, v in zip(plans, mean, var, strict=True):
        plan._record(layer, m, v)
