"""Independent reference pieces the strategies are checked against: plain torch modules and direct formulas.

Nothing here goes through the adapters' normalisation plans: models are deep copies of a handle's network
in which every adaptive BN layer is replaced by a plain module built by the test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters._bn import AdaptiveBatchNorm2d
from adapters._strategy import ComposedStrategy
from adapters.base import AdaptationState, ModelHandle, StrategyConfig

BNFactory = Callable[[str, nn.BatchNorm2d], nn.Module]


def make_batch(batch_size: int, seed: int, size: int = 16) -> Tensor:
    """Smooth random colour images in [0, 1] (varied enough to give varied predictions)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(batch_size, 3, 4, 4, generator=gen)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(batch_size, 3, size, size, generator=gen)).clamp(0, 1)


def entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy -sum p log p of p = softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def source_entropies(handle: ModelHandle, x: Tensor) -> Tensor:
    """Entropies of the source parameters' predictions with test-batch statistics."""
    model, _ = replace_bn(handle, batch_stat_bn)
    with torch.no_grad():
        return entropy(model(x))


def margin_keeping(handle: ModelHandle, x: Tensor, keep: int) -> float:
    """An e_margin whose threshold E0 lies midway between the keep-th and (keep+1)-th lowest entropy."""
    ent = source_entropies(handle, x).sort().values
    assert float(ent[keep] - ent[keep - 1]) > 1e-3, "entropies too close to split reliably"
    return float(ent[keep - 1] + ent[keep]) / 2 / math.log(handle.num_classes)


def eval_bn(name: str, bn: nn.BatchNorm2d) -> nn.Module:
    """A plain torch BatchNorm2d with the layer's source statistics, in eval mode."""
    new = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    assert bn.running_mean is not None and bn.running_var is not None
    assert new.running_mean is not None and new.running_var is not None
    with torch.no_grad():
        new.weight.copy_(bn.weight)
        new.bias.copy_(bn.bias)
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
    return new.eval()


def batch_stat_bn(name: str, bn: nn.BatchNorm2d) -> nn.Module:
    """A plain torch BatchNorm2d without running statistics: normalises with the batch (biased variance)."""
    new = nn.BatchNorm2d(bn.num_features, eps=bn.eps, track_running_stats=False)
    with torch.no_grad():
        new.weight.copy_(bn.weight)
        new.bias.copy_(bn.bias)
    return new.eval()


def replace_bn(handle: ModelHandle, factory: BNFactory = eval_bn) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A deep copy of the handle's model with each BN layer replaced by `factory(layer_name, layer)`.

    Returns the copy (eval mode, no gradients) and its new BN modules keyed by the handle's layer names.
    """
    model = copy.deepcopy(handle.model)
    model.requires_grad_(False)
    replaced: dict[str, nn.Module] = {}
    for full_name, module in list(model.named_modules()):
        if isinstance(module, AdaptiveBatchNorm2d):
            new = factory(module.layer_name, module)
            parent_name, _, child = full_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            replaced[module.layer_name] = new
    assert list(replaced) == [layer.name for layer in handle.bn_layers]
    return model.eval(), replaced


def affine_leaves(bns: Mapping[str, nn.Module], names: list[str] | None = None) -> dict[str, nn.Parameter]:
    """Make the BN affine parameters of a reference copy trainable; keyed like the adapters' state."""
    out: dict[str, nn.Parameter] = {}
    for layer, module in bns.items():
        for p in ("weight", "bias"):
            key = f"{layer}.{p}"
            if names is None or key in names:
                param = getattr(module, p)
                param.requires_grad_(True)
                out[key] = param
    return out


def load_affine(bns: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]) -> None:
    """Copy affine values (keyed `<layer>.weight` / `<layer>.bias`) into a reference copy."""
    with torch.no_grad():
        for layer, module in bns.items():
            weight, bias = module.weight, module.bias
            assert isinstance(weight, Tensor) and isinstance(bias, Tensor), layer
            weight.copy_(tensors[f"{layer}.weight"])
            bias.copy_(tensors[f"{layer}.bias"])


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about a module that a strategy must not change."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "types": {k: type(m) for k, m in model.named_modules()},
    }


def assert_snapshot_equal(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["types"] == after["types"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert value.dtype == after["state"][key].dtype, key
        assert torch.equal(value, after["state"][key]), f"shared model tensor {key} changed"


def assert_states_equal(a: AdaptationState, b: AdaptationState) -> None:
    """Bit-exact equality of two adaptation states (tensor names, dtypes, values and meta)."""
    assert set(a.tensors) == set(b.tensors)
    for key, value in a.tensors.items():
        other = b.tensors[key]
        assert value.dtype == other.dtype, key
        assert value.shape == other.shape, key
        assert torch.equal(value, other), f"state tensor {key} differs"
    assert dict(a.meta) == dict(b.meta)


SMALL = {
    "fisher_size": 16,
    "fisher_batch_size": 8,
    "k": 4,
    "n_augmentations": 2,
    "warmup_samples": 16,
    "source_size": 16,
    "source_batch_size": 8,
    "posterior_size": 16,
    "posterior_batch_size": 8,
    "warmup_steps": 2,
    "warmup_batch_size": 8,
}


def small_config(strategy: ComposedStrategy, **overrides: Any) -> StrategyConfig:
    """A strategy's default config, shrunk where a field exists so tests stay fast.

    `overrides` are fields of a flat config, or for a nested one, each part's fields by part name."""
    cls = strategy.config_cls
    if not strategy.config_parts:
        return cls(**{k: v for k, v in SMALL.items() if k in cls.model_fields}, **overrides)
    values: dict[str, dict[str, Any]] = {}
    for part, part_cls in strategy.config_parts.items():
        values[part] = {k: v for k, v in SMALL.items() if k in part_cls.model_fields}
        values[part].update(overrides.pop(part, {}))
    assert not overrides, f"{strategy.name} has no config parts {sorted(overrides)}"
    return strategy.parse_config(values)
