"""A stream's adapted state as a patch of the source network's `state_dict`, for a forward-only copy of
the model at the edge (the server adapts, the edge only predicts).

The patch always holds every tensor an eval-mode copy of the source network reads in the layers the
strategies adapt, under the network's own names: for each adapted BatchNorm2d `running_mean`,
`running_var`, `weight` and `bias`; for each adapted LayerNorm/GroupNorm `weight` and `bias` (CoTTA: every
parameter, its teacher's). Unadapted tensors keep their source values, so a patch is complete on its own:
loading it replaces whatever an earlier patch set. Loaded into the source network in eval mode, it gives
the strategy's `adapt=false` predictions for the stream.

`edge_stats(handle, cfg, tensors)` of a normaliser returns the BN statistics it predicts with
(`<layer>.running_mean` / `.running_var`; {} for the source ones) or raises NotExportableError saying
why they depend on the batch; an updater's adapted affine parameters are the state's `affine_names()`
tensors, unless it predicts by itself (`predict`), when its `edge_params(handle, state)` names them.

That needs a prediction that depends on the image alone. A strategy whose adapt=false prediction uses the
batch itself (test-batch BN statistics: `norm`, `alpha_bn`, and `tent`/`eata`/`eta`/`sar`/`roid`/`cotta`
on a model with BatchNorm; per-sample mixtures: UnMix-TNS) raises `NotExportableError`. A strategy part
says how its state maps onto the network with an `edge_stats` (normaliser) or `edge_params` (updater
that predicts by itself) method; a part without one is refused the same way.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from adapters._strategy import ComposedStrategy
from adapters.base import AdaptationState, AdaptError, ModelHandle, StrategyConfig

#: The safetensors metadata entry that holds the manifest (JSON).
MANIFEST_KEY = "tta_edge_manifest"
#: Bumped when the layout of the patch (names, what it holds) changes.
FORMAT_VERSION = 1


class NotExportableError(AdaptError):
    """The stream's predictions cannot be reproduced by a static patch of the source network."""

    error_type = "not_exportable"


def network_name(handle: ModelHandle, name: str) -> str:
    """A parameter name of `handle.model` as the declared network names it: the served model wraps the
    network as `net` (after its input normalisation), which the edge's copy of the network lacks."""
    return name.removeprefix("net.") if hasattr(handle.model, "net") else name


def source_patch(handle: ModelHandle) -> dict[str, Tensor]:
    """The source values of every tensor a patch holds (the patch of a fresh stream)."""
    out: dict[str, Tensor] = {}
    for bn in handle.bn_layers:
        out[f"{bn.name}.running_mean"] = bn.running_mean
        out[f"{bn.name}.running_var"] = bn.running_var
    out.update(handle.source_affine())
    return out


def edge_patch(
    strategy: ComposedStrategy, handle: ModelHandle, state: AdaptationState, config: StrategyConfig
) -> dict[str, Tensor]:
    """The patch that makes the source network predict as `strategy` does with adapt=false on `state`.

    Raises NotExportableError when that prediction depends on the batch, or a part cannot say.
    """
    cfg = strategy.parse_config(config)
    strategy.check_state(handle, state)
    patch = source_patch(handle)
    norm = strategy.normalizer
    edge_stats = getattr(norm, "edge_stats", None)
    if edge_stats is None:
        raise NotExportableError(f"{strategy.name}: its normaliser {norm.name!r} declares no static export")
    try:
        patch.update(edge_stats(handle, strategy.part_config(norm, cfg), state.tensors))
    except NotExportableError as exc:
        raise NotExportableError(
            f"{strategy.name} cannot be exported: {exc}, so its predictions depend on the batch and no "
            "static patch of the model reproduces them (strategies that export: source, ema_tbn, and the "
            "gradient strategies on models without BatchNorm)"
        ) from None
    updater = strategy.updater
    if updater is not None:
        if hasattr(updater, "predict"):
            # An updater that predicts by itself (CoTTA's teacher) says which weights it predicts with.
            edge_params = getattr(updater, "edge_params", None)
            if edge_params is None:
                raise NotExportableError(f"{strategy.name}: its updater declares no static export")
            patch.update(edge_params(handle, state))
        else:
            patch.update({k: state.tensors[k] for k in handle.affine_names()})
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in patch.items()}


def manifest(
    strategy: ComposedStrategy, handle: ModelHandle, state: AdaptationState, config: StrategyConfig
) -> dict[str, Any]:
    """What the patch is (JSON-able): the model it fits, the strategy and the stream step it comes from."""
    return {
        "format": "tta-edge-patch",
        "format_version": FORMAT_VERSION,
        "model": handle.model_id,
        "fingerprint": handle.fingerprint,
        "precision": "bf16" if handle.autocast_dtype is not None else "fp32",
        "strategy": strategy.name,
        "config": strategy.parse_config(config).model_dump(mode="json"),
        "steps": int(state.meta.get("steps", 0)),
        "updates": int(state.meta.get("updates", 0)),
        "samples_seen": int(state.meta.get("samples_seen", 0)),
    }
