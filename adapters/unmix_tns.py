"""`unmix_tns`: K statistics components per BN layer, mixed per instance (docs/ALGORITHMS.md §3).

Each sample is normalised with the moments of an equal-weight mixture of K components, in which the
component nearest to the sample (by cosine similarity of channel means, temperature tau) is pulled
towards the sample's own instance statistics; the components then drift towards the instances they
were assigned. Nothing is pooled across the batch, so label-correlated batches do not bias it.

Deviations from the reference, both measured (docs/BENCHMARKS.md):
* The component momentum is computed from the *actual* batch size of each request,
  lambda = 1 - (1 - m)^(B / B_max), instead of once from a configured batch size, so a service
  receiving batches of varying size updates at a consistent rate per sample.
* `init="moment_matched"` (default): the reference's random component draw is centred and rescaled per
  channel, so the K initial components match the source mean and variance exactly instead of in
  expectation. The reference draw leaves a random offset of about sqrt(a/K) sigma_s per channel in
  every layer, which short streams do not wash out (on 1000 clean CIFAR-10 images it cost 5 points
  of error against source; the moment-matched draw costs 1-2). `init="random"` is the reference.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adapters._bn import (
    AdaptiveBatchNorm2d,
    BasePlan,
    Segments,
    instance_mean_var,
    normalize_with,
    record_many,
    stacked_affine,
)
from adapters._strategy import ComposedStrategy
from adapters.base import STAT_KINDS, BatchTooSmallError, ModelHandle, StrategyConfig
from adapters.edge import NotExportableError
from adapters.registry import register_strategy

PREFIX = "unmix."
# The state: every BN layer's K components packed side by side, (K, sum of channels) each, columns in
# `handle.bn_layers` order (`Layout`). Two tensors per stream instead of two per layer: a stream's state is
# copied, checked and serialised at every step, and on WRN-40-2 74 small tensors cost 1.6 ms per stream.
MEANS, VARS = f"{PREFIX}means", f"{PREFIX}vars"
#: Version 1 held two tensors per layer, `unmix.<layer>.means` / `.vars` (`UnMixStats.upgrade_tensors`).
STATE_VERSION = 2


class UnMixTNSConfig(StrategyConfig):
    k: int = Field(16, ge=1, le=512, description="number of statistics components per BN layer")
    tau: float = Field(0.07, gt=0, description="softmax temperature of the component assignment")
    init_spread: float = Field(
        0.5, ge=0, lt=1, description="share of source variance spread between components"
    )
    init: Literal["random", "moment_matched"] = Field(
        "moment_matched",
        description=(
            "component draw: 'random' (reference: i.i.d. noise, source moments matched in expectation) or "
            "'moment_matched' (noise centred and scaled per channel so the K components match them exactly)"
        ),
    )
    bn_momentum: float = Field(0.1, gt=0, le=1, description="component momentum at batch size batch_size_max")
    batch_size_max: int = Field(64, ge=1, description="reference batch size B_max of the momentum scaling")


@dataclass(frozen=True)
class Layout:
    """Where each BN layer's channels sit in the packed (..., K, sum C) component tensors."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, handle: ModelHandle) -> Layout:
        return cls(tuple(b.name for b in handle.bn_layers), tuple(b.num_features for b in handle.bn_layers))

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        starts = itertools.accumulate(self.sizes[:-1], initial=0)
        return {n: (start, c) for n, start, c in zip(self.names, starts, self.sizes, strict=True)}

    def column(self, name: str, packed: Tensor) -> Tensor:
        """One layer's (..., K, C) components: a view of the packed tensor."""
        start, c = self.offsets[name]
        return packed[..., start : start + c]

    def pack(
        self, updated: Mapping[str, tuple[Tensor, Tensor]], means: Tensor, variances: Tensor
    ) -> tuple[Tensor, Tensor]:
        """New packed means and variances from per-layer `updated` (means, variances); the layers without an
        update keep their columns of `means` and `variances`."""

        def packed(part: int, old: Tensor) -> Tensor:
            pieces = [updated[n][part] if n in updated else self.column(n, old) for n in self.names]
            return torch.cat(pieces, -1)

        return packed(0, means), packed(1, variances)


def layer_components(handle: ModelHandle, tensors: Mapping[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
    """One BN layer's (K, C) component means and variances in an `unmix_tns` state (views)."""
    layout = Layout.of(handle)
    return layout.column(layer, tensors[MEANS]), layout.column(layer, tensors[VARS])


class UnMixStats:
    name = "unmix_tns"
    config_cls = UnMixTNSConfig
    min_batch_size = 1  # statistics are per instance
    stat_kinds = STAT_KINDS
    requires_stats = True
    state_version = STATE_VERSION

    def upgrade_tensors(
        self, handle: ModelHandle, tensors: Mapping[str, Tensor], version: int
    ) -> dict[str, Tensor]:
        """A state of an older schema version in this one's layout (KeyError: not a state of that version)."""
        if version != 1:
            raise KeyError(f"no upgrade from unmix_tns state version {version}")
        names = Layout.of(handle).names
        own = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
        for key, part in ((MEANS, "means"), (VARS, "vars")):
            own[key] = torch.cat([tensors[f"{PREFIX}{n}.{part}"] for n in names], -1)
        return own

    def init_tensors(self, handle: ModelHandle, cfg: UnMixTNSConfig, seed: int) -> dict[str, Tensor]:
        """Components mu_k = mu_s + sqrt(a K/(K-1)) sigma_s xi_k, var_k = (1-a) var_s (a = 0 when K = 1)."""
        gen = torch.Generator().manual_seed(seed)
        a = cfg.init_spread if cfg.k > 1 else 0.0
        spread = math.sqrt(a * cfg.k / (cfg.k - 1)) if cfg.k > 1 else 0.0
        means_all, vars_all = [], []
        for layer in handle.bn_layers:
            mu_s = layer.running_mean.float().cpu()
            var_s = layer.running_var.float().cpu()
            xi = torch.randn(cfg.k, layer.num_features, generator=gen)
            if cfg.init == "moment_matched" and cfg.k > 1:
                xi = moment_matched(xi)
            means = mu_s[None] + spread * var_s.sqrt()[None] * xi
            means_all.append(means)
            vars_all.append(((1 - a) * var_s)[None].expand(cfg.k, -1))
        return {
            MEANS: torch.cat(means_all, 1).to(handle.device),
            VARS: torch.cat(vars_all, 1).to(handle.device),
        }

    def plan(
        self,
        handle: ModelHandle,
        cfg: UnMixTNSConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> UnMixPlan:
        return UnMixPlan(cfg, tensors, affine, update, record, Layout.of(handle))

    def edge_stats(
        self, handle: ModelHandle, cfg: UnMixTNSConfig, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        raise NotExportableError(
            "it normalises every sample with its own mixture of statistics components, weighted by that "
            "sample's instance statistics (no single running mean and variance per layer)"
        )


def moment_matched(xi: Tensor) -> Tensor:
    """Centre the (K, C) draws over K and scale them to a per-channel mean square of (K-1)/K.

    The equal-weight mixture of the components then has exactly the source mean and variance in every
    channel, which the reference draw only has in expectation (its finite-K error is a random offset
    of about sqrt(a/K) sigma_s per channel, which a short stream does not wash out).
    """
    k = xi.shape[0]
    xi = xi - xi.mean(0, keepdim=True)
    rms = xi.square().mean(0, keepdim=True).sqrt().clamp_min(1e-12)
    return xi / rms * math.sqrt((k - 1) / k)


class UnMixPlan(BasePlan):
    def __init__(
        self,
        cfg: UnMixTNSConfig,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        update: bool,
        record: bool,
        layout: Layout,
    ) -> None:
        super().__init__(affine, record)
        self.cfg = cfg
        self.tensors = tensors
        self.update = update
        self.layout = layout
        # Updated (K, C) components per layer, packed into the new state by `updated_tensors`.
        self._updated: dict[str, tuple[Tensor, Tensor]] = {}
        # In a shared forward: the streams' joint update and this stream's row in it.
        self._shared: tuple[_SharedUpdate, int] | None = None
        # Per-instance statistics of every layer; the batch statistics for drift are pooled from them
        # once, after the forward pass, for all layers together.
        self._instances: list[tuple[int, Tensor, Tensor]] = []
        self._pooled: dict[int, tuple[Tensor, Tensor]] = {}

    @functools.cached_property
    def _tables(self) -> ComponentTables:
        # Built at the first single-stream `normalize` (a shared forward builds all streams' at once).
        return ComponentTables.build(self.layout, self.tensors[MEANS], self.tensors[VARS], self.cfg.tau)

    @property
    def batch_stats(self) -> dict[int, tuple[Tensor, Tensor]]:
        if self._instances:
            self._pooled.update(pool_instances(self._instances))
            self._instances = []
        return self._pooled

    @batch_stats.setter
    def batch_stats(self, value: dict[int, tuple[Tensor, Tensor]]) -> None:
        self._pooled = value  # BasePlan.__init__ starts it empty

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        _check_spatial(x, layer)
        table = self._tables[layer.layer_name]
        # Statistics in float32 even under autocast (whose matrix products would be bf16). The instance
        # statistics keep their graph so Tent-style gradients flow through them.
        with torch.autocast(x.device.type, enabled=False):
            mu_i, var_i = instance_mean_var(x)
            p = table.assignment(mu_i.detach())
            mean, var = table.moments(mu_i, var_i, p)
            if self.record:
                self._instances.append((layer.layer_index, mu_i.detach(), var_i.detach()))
            if self.update:
                name = layer.layer_name
                self._updated[name] = component_update(
                    self.layout.column(name, self.tensors[MEANS]),
                    self.layout.column(name, self.tensors[VARS]),
                    mu_i.detach(),
                    var_i.detach(),
                    p,
                    self.cfg,
                )
        w, b = self.weight_bias(layer)
        return normalize_with(x, mean, var, w, b, layer.eps)

    @staticmethod
    def normalize_many(
        plans: Sequence[UnMixPlan], layer: AdaptiveBatchNorm2d, x: Tensor, seg: Segments
    ) -> Tensor:
        """`normalize` for several streams' rows in one pass: the streams' component tables stacked
        (once per forward, for all layers) and read per row, the component updates reduced per stream."""
        _check_spatial(x, layer)
        with torch.autocast(x.device.type, enabled=False):
            mu_i, var_i = instance_mean_var(x)
            if "unmix" not in seg.memo:  # the first layer: every stream's components, stacked once
                layout = plans[0].layout
                means = torch.stack([plan.tensors[MEANS] for plan in plans])
                variances = torch.stack([plan.tensors[VARS] for plan in plans])
                shared = _SharedUpdate(layout, means, variances)
                for i, plan in enumerate(plans):
                    if plan.update:  # this stream's new state is its row of the joint update
                        plan._shared = (shared, i)
                seg.memo["unmix"] = (
                    shared,
                    ComponentTables.build(layout, means, variances, plans[0].cfg.tau),
                )
            shared, tables = seg.memo["unmix"]
            table = tables[layer.layer_name].rows(seg)
            p = table.assignment(mu_i.detach())
            mean, var = table.moments(mu_i, var_i, p)
            if any(plan.record for plan in plans):
                record_many(plans, layer, *seg.pool(mu_i.detach(), var_i.detach()))
            updating = [plan for plan in plans if plan.update]
            if updating:
                if len(updating) != len(plans):
                    raise ValueError("streams in one forward pass must all update or all not")
                name = layer.layer_name
                shared.updated[name] = component_update_many(
                    shared.layout.column(name, shared.means),
                    shared.layout.column(name, shared.variances),
                    mu_i.detach(),
                    var_i.detach(),
                    p,
                    seg,
                    plans[0].cfg,
                )
        w, b = stacked_affine(plans, layer, seg)
        return normalize_with(x, mean, var, w, b, layer.eps)

    def updated_tensors(self) -> dict[str, Tensor]:
        if self._shared is not None:
            shared, row = self._shared
            return shared.stream(row)
        if not self._updated:
            return {}
        means, variances = self.layout.pack(self._updated, self.tensors[MEANS], self.tensors[VARS])
        return {MEANS: means, VARS: variances}


class _SharedUpdate:
    """The stacked (S, K, sum C) components of the streams in one shared forward and their per-layer updates
    (S, K, C), packed and split per stream once, when the first stream asks for its new state."""

    def __init__(self, layout: Layout, means: Tensor, variances: Tensor) -> None:
        self.layout, self.means, self.variances = layout, means, variances
        self.updated: dict[str, tuple[Tensor, Tensor]] = {}
        self._streams: list[dict[str, Tensor]] | None = None

    def stream(self, row: int) -> dict[str, Tensor]:
        if self._streams is None:
            means, variances = self.layout.pack(self.updated, self.means, self.variances)
            # Own storage per stream: a view would keep the whole stacked tensor alive in its state.
            self._streams = [
                {MEANS: m.clone(), VARS: v.clone()} for m, v in zip(means, variances, strict=True)
            ]
        return self._streams[row]


def _check_spatial(x: Tensor, layer: AdaptiveBatchNorm2d) -> None:
    if x.shape[2] * x.shape[3] < 2:
        raise BatchTooSmallError(f"unmix_tns needs spatial size >= 2 at BN layer {layer.layer_name!r}")


def _rowwise(a: Tensor, m: Tensor) -> Tensor:
    """a @ m for a (B, K) with one (K, N) matrix, or row b of a times matrix b of a (B, K, N) stack."""
    return a @ m if m.ndim == 2 else torch.bmm(a[:, None, :], m).squeeze(1)


class LayerTable:
    """What the mixture needs from one layer's K components, precomputed (all divided by K).

    `rhs` is [M | M^2 | V] / K of shape (K, 3C), `sums` its column sums, `unit` the components'
    channel-mean vectors normalised to unit length and divided by tau. Stacked over several streams
    (a leading dimension: (S, K, 3C), (S, 3C), (S, K, C)), `rows` gives every row its stream's table.
    """

    def __init__(self, rhs: Tensor, sums: Tensor, unit: Tensor, k: int) -> None:
        self.rhs, self.sums, self.unit, self.k = rhs, sums, unit, k
        self.c = unit.shape[-1]

    def rows(self, seg: Segments) -> LayerTable:
        """A stacked table read per row of the segmented batch."""
        return LayerTable(seg.expand(self.rhs), seg.expand(self.sums), seg.expand(self.unit), self.k)

    def assignment(self, mu_i: Tensor) -> Tensor:
        """p_bk = softmax_k(cos(mu_i_b, mu_k) / tau), shape (B, K)."""
        return _rowwise(F.normalize(mu_i, dim=1), self.unit.transpose(-1, -2)).softmax(1)

    def moments(self, mu_i: Tensor, var_i: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the equal-weight mixture of mu_hat_bk = (1-p_bk) mu_k + p_bk mu_i_b (same for var).

        Two (B, K) @ (K, <=3C) products and no (B, K, C) tensor. With sum_k p_bk = 1 (a softmax):
        mean = (sum_k mu_k - p mu + mu_i) / K, the same for the mean of the variances, and
        (1/K) sum_k mu_hat_bk^2 = (1/K) [sum_k mu_k^2 - 2 p mu^2 + p^2 mu^2 + 2 mu_i (p mu - p^2 mu) + |p_b|^2 mu_i^2].
        """
        c, inv_k = self.c, 1.0 / self.k
        pm, pm2, pv = _rowwise(p, self.rhs).split(c, 1)
        p2 = p * p
        p2m, p2m2 = _rowwise(p2, self.rhs[..., : 2 * c]).split(c, 1)
        sum_m, sum_m2, sum_v = self.sums.split(c, -1)
        mean = torch.sub(sum_m, pm).add_(mu_i, alpha=inv_k)
        mean_var = torch.sub(sum_v, pv).add_(var_i, alpha=inv_k)
        sq = torch.sub(sum_m2, pm2, alpha=2).add_(p2m2).addcmul_(mu_i, pm - p2m, value=2)
        sq = sq.addcmul_(p2.sum(1, keepdim=True), mu_i * mu_i, value=inv_k)
        # Out of place: clamp's gradient needs its input.
        return mean, mean_var + sq.addcmul_(mean, mean, value=-1).clamp_min(0)


class ComponentTables(dict[str, LayerTable]):
    """The `LayerTable` of every layer, computed with a few kernels for all layers together (per layer
    it would be about twenty small ones each, which would dominate a GPU step)."""

    @classmethod
    def build(cls, layout: Layout, m_all: Tensor, v_all: Tensor, tau: float) -> ComponentTables:
        """Tables from packed (K, sum C) components, or stacked ones (S, K, sum C) for S streams at once."""
        if not layout.names:
            return cls()
        k = m_all.shape[-2]
        sizes = list(layout.sizes)
        m2_all = m_all * m_all
        # Per layer blocks [M_l | M_l^2 | V_l], so every layer's right-hand side is one column slice.
        pieces = zip(m_all.split(sizes, -1), m2_all.split(sizes, -1), v_all.split(sizes, -1), strict=True)
        rhs = torch.cat([t for block in pieces for t in block], -1).div_(k)
        unit = m_all * _segment_inverse_norms(m2_all, sizes).mul_(1.0 / tau)
        sums = rhs.sum(-2)
        tables = cls()
        offset = 0
        for name, c, u in zip(layout.names, sizes, unit.split(sizes, -1), strict=True):
            tables[name] = LayerTable(
                rhs[..., offset : offset + 3 * c], sums[..., offset : offset + 3 * c], u, k
            )
            offset += 3 * c
        return tables


def _segment_inverse_norms(squares: Tensor, sizes: list[int]) -> Tensor:
    """1 / max(||row segment||, 1e-12) of every (row, layer) segment, broadcast back to its columns.

    Two matrix products with a 0/1 layer-membership matrix (deterministic, unlike scatter-adds on a GPU);
    the same clamp as `F.normalize`.
    """
    member = _membership(tuple(sizes), squares.device, squares.dtype)
    return (squares @ member).clamp_min_(1e-24).rsqrt_() @ member.T


@functools.lru_cache(maxsize=16)
def _membership(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(sum of sizes, len(sizes)) matrix with a 1 where a column belongs to a layer."""
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return F.one_hot(layer_of, len(sizes)).to(device=device, dtype=dtype)


def component_update(
    comp_mu: Tensor, comp_var: Tensor, mu_i: Tensor, var_i: Tensor, p: Tensor, cfg: UnMixTNSConfig
) -> tuple[Tensor, Tensor]:
    """mu_k += lam * mean_b p_bk (mu_i_b - mu_k) (same for var): one fused matrix product each."""
    b = mu_i.shape[0]
    lam = 1 - (1 - cfg.bn_momentum) ** (b / cfg.batch_size_max)
    with torch.no_grad():
        keep = torch.mul(p.mean(0), -lam).add_(1)[:, None]  # 1 - lam * (average assignment over the batch)
        new_mu = torch.addmm(comp_mu * keep, p.T, mu_i, alpha=lam / b)
        new_var = torch.addmm(comp_var * keep, p.T, var_i, alpha=lam / b)
    return new_mu, new_var


def component_update_many(
    comp_mu: Tensor,
    comp_var: Tensor,
    mu_i: Tensor,
    var_i: Tensor,
    p: Tensor,
    seg: Segments,
    cfg: UnMixTNSConfig,
) -> tuple[Tensor, Tensor]:
    """`component_update` of S streams at once: stacked (S, K, C) components, rows (B, C) and (B, K)
    segmented by `seg`; each stream's momentum from its own row count."""
    counts = seg.counts(mu_i.device)  # (S, 1)
    lam = (1 - (1 - cfg.bn_momentum) ** (counts / cfg.batch_size_max))[:, :, None]  # (S, 1, 1)
    with torch.no_grad():
        keep = 1 - lam * (seg.sum(p) / counts)[:, :, None]  # (S, K, 1)
        scale = lam / counts[:, :, None]
        new_mu = comp_mu * keep + scale * seg.sum(p[:, :, None] * mu_i[:, None, :])
        new_var = comp_var * keep + scale * seg.sum(p[:, :, None] * var_i[:, None, :])
    return new_mu, new_var


def pool_instances(instances: list[tuple[int, Tensor, Tensor]]) -> dict[int, tuple[Tensor, Tensor]]:
    """Each layer's batch mean and biased variance from its per-instance (B, C) statistics, all layers at once:
    mean over b of mu_i, and mean over b of var_i + (mu_i - mean)^2 (law of total variance)."""
    if not instances:
        return {}
    sizes = [mu.shape[1] for _, mu, _ in instances]
    mu = torch.cat([mu for _, mu, _ in instances], 1)
    var = torch.cat([var for _, _, var in instances], 1)
    mean, pooled = (t[0] for t in Segments([mu.shape[0]]).pool(mu, var))
    layers = [index for index, _, _ in instances]
    return dict(zip(layers, zip(mean.split(sizes), pooled.split(sizes), strict=True), strict=True))


def assignment(mu_i: Tensor, comp_mu: Tensor, tau: float) -> Tensor:
    """p_bk = softmax_k(cos(mu_i_b, mu_k) / tau) for one layer's components, shape (B, K)."""
    return _single(comp_mu, comp_mu, tau).assignment(mu_i)


def mixture_moments(
    mu_i: Tensor, var_i: Tensor, comp_mu: Tensor, comp_var: Tensor, p: Tensor
) -> tuple[Tensor, Tensor]:
    """`LayerTable.moments` for one layer's components."""
    return _single(comp_mu, comp_var, 1.0).moments(mu_i, var_i, p)


def _single(comp_mu: Tensor, comp_var: Tensor, tau: float) -> LayerTable:
    layout = Layout(("layer",), (comp_mu.shape[-1],))
    return ComponentTables.build(layout, comp_mu, comp_var, tau)["layer"]


@register_strategy
def unmix_tns() -> ComposedStrategy:
    return ComposedStrategy("unmix_tns", "per-instance mixture of K BN statistics components", UnMixStats())


__all__ = ["UnMixStats", "UnMixTNSConfig", "assignment", "layer_components", "mixture_moments", "unmix_tns"]
