"""`unmix_tns`: K statistics components per BN layer, mixed per instance (algorithms.md §3).

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

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from adapters._bn import AdaptiveBatchNorm2d, BasePlan, fast_stats_ok
from adapters.base import BatchTooSmallError, ModelHandle, StrategyConfig

PREFIX = "unmix."


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


def _keys(layer_name: str) -> tuple[str, str]:
    return f"{PREFIX}{layer_name}.means", f"{PREFIX}{layer_name}.vars"


class UnMixStats:
    name = "unmix_tns"
    config_cls = UnMixTNSConfig
    min_batch_size = 1  # statistics are per instance

    def init_tensors(self, handle: ModelHandle, cfg: UnMixTNSConfig, seed: int) -> dict[str, Tensor]:
        """Components mu_k = mu_s + sqrt(a K/(K-1)) sigma_s xi_k, var_k = (1-a) var_s (a = 0 when K = 1)."""
        gen = torch.Generator().manual_seed(seed)
        a = cfg.init_spread if cfg.k > 1 else 0.0
        spread = math.sqrt(a * cfg.k / (cfg.k - 1)) if cfg.k > 1 else 0.0
        out: dict[str, Tensor] = {}
        for layer in handle.bn_layers:
            mu_s = layer.running_mean.float().cpu()
            var_s = layer.running_var.float().cpu()
            xi = torch.randn(cfg.k, layer.num_features, generator=gen)
            if cfg.init == "moment_matched" and cfg.k > 1:
                xi = moment_matched(xi)
            means = mu_s[None] + spread * var_s.sqrt()[None] * xi
            variances = ((1 - a) * var_s)[None].expand(cfg.k, -1).clone()
            k_mean, k_var = _keys(layer.name)
            out[k_mean], out[k_var] = means.to(handle.device), variances.to(handle.device)
        return out

    def plan(self, handle, cfg, tensors, affine, update, record):  # type: ignore[no-untyped-def]
        return UnMixPlan(cfg, tensors, affine, update, record)


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
    ) -> None:
        super().__init__(affine, record)
        self.cfg = cfg
        self.tensors = tensors
        self.update = update
        self._updated: dict[str, Tensor] = {}

    def normalize(self, layer: AdaptiveBatchNorm2d, x: Tensor) -> Tensor:
        if x.shape[2] * x.shape[3] < 2:
            raise BatchTooSmallError(f"unmix_tns needs spatial size >= 2 at BN layer {layer.layer_name!r}")
        k_mean, k_var = _keys(layer.layer_name)
        comp_mu, comp_var = self.tensors[k_mean], self.tensors[k_var]
        # Instance statistics in fp32; they keep their graph so Tent-style gradients flow through them.
        mu_i, var_i = instance_mean_var(x)
        p = assignment(mu_i.detach(), comp_mu, self.cfg.tau)
        mean, var = mixture_moments(mu_i, var_i, comp_mu, comp_var, p)
        if self.record:
            batch_mean = mu_i.mean(0)
            self._record(layer, batch_mean, (var_i + (mu_i - batch_mean) ** 2).mean(0))
        if self.update:
            lam = 1 - (1 - self.cfg.bn_momentum) ** (x.shape[0] / self.cfg.batch_size_max)
            with torch.no_grad():
                p_mean = p.mean(0)[:, None]  # (K, 1): average assignment over the batch
                new_mu = comp_mu + lam * (p.T @ mu_i.detach() / x.shape[0] - p_mean * comp_mu)
                new_var = comp_var + lam * (p.T @ var_i.detach() / x.shape[0] - p_mean * comp_var)
            self._updated[k_mean], self._updated[k_var] = new_mu, new_var
        w, b = self.weight_bias(layer)
        return per_sample_normalize(x, mean, var, w, b, layer.eps)

    def updated_tensors(self) -> dict[str, Tensor]:
        return dict(self._updated)


def instance_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and biased variance over (H, W), in float32, shapes (B, C)."""
    x = x.float()
    if not fast_stats_ok(x):
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        return mean, var
    # Two passes (mean, then mean squared deviation), a few samples at a time: with a small temporary this
    # memory-bound work stays in cache. On CPU it is 3-10x faster than var_mean's Welford reduction.
    mean = x.mean(dim=(2, 3), keepdim=True)
    step = max(1, (1 << 18) // x[0].numel())
    chunks = zip(x.split(step), mean.split(step), strict=True)
    parts = [torch.sub(xs, ms).square_().mean(dim=(2, 3)) for xs, ms in chunks]
    return mean.view(x.shape[:2]), torch.cat(parts)


def assignment(mu_i: Tensor, comp_mu: Tensor, tau: float) -> Tensor:
    """p_bk = softmax_k(cos(mu_i_b, mu_k) / tau), shape (B, K)."""
    sim = F.normalize(mu_i, dim=1) @ F.normalize(comp_mu, dim=1).T
    return (sim / tau).softmax(1)


def mixture_moments(
    mu_i: Tensor, var_i: Tensor, comp_mu: Tensor, comp_var: Tensor, p: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance of the equal-weight mixture of mu_hat_bk = (1-p_bk) mu_k + p_bk mu_i_b (same for var).

    Expanded into two (B, K) @ (K, 3C) products so no (B, K, C) tensor is materialised:
    with mu_hat_bk = mu_k + p_bk (mu_i_b - mu_k),
    (1/K) sum_k mu_hat_bk^2 = (1/K) [sum_k mu_k^2 + 2 (mu_i (p mu) - p mu^2) + |p|^2 mu_i^2 - 2 mu_i (p^2 mu) + p^2 mu^2].
    """
    k, c = comp_mu.shape
    comp_sq = comp_mu * comp_mu
    pm, pm2, pv = (p @ torch.cat([comp_mu, comp_sq, comp_var], 1)).split(c, 1)
    p2 = p * p
    p2m, p2m2 = (p2 @ torch.cat([comp_mu, comp_sq], 1)).split(c, 1)
    mean = (mu_i + comp_mu.sum(0) - pm) / k
    mean_var = (var_i + comp_var.sum(0) - pv) / k
    sq = (comp_sq.sum(0) + 2 * (mu_i * (pm - p2m) - pm2) + p2.sum(1, keepdim=True) * mu_i**2 + p2m2) / k
    var = mean_var + (sq - mean**2).clamp_min(0)
    return mean, var


def per_sample_normalize(x: Tensor, mean: Tensor, var: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    scale = w[None] * torch.rsqrt(var + eps)  # (B, C)
    shift = b[None] - mean * scale
    # One fused pass over x (a multiply then an in-place add is two, and 1.5-6x slower on CPU).
    return torch.addcmul(shift[:, :, None, None].to(x.dtype), x, scale[:, :, None, None].to(x.dtype))


__all__ = ["UnMixStats", "UnMixTNSConfig", "assignment", "mixture_moments"]
