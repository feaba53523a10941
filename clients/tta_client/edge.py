"""The edge side of a stream's export: apply it to a local torch model, choose which samples to upload.

The server adapts, the edge only predicts: ``Client.export_stream`` downloads a stream's adapted state as
a safetensors patch of the model's network (normalisation statistics and affine parameters under its own
``state_dict`` names, a manifest in the metadata), and ``load_export`` writes it into a local copy of
the source network, which in eval mode then predicts as the server does with ``adapt=false``.
``select_uploads`` picks the samples worth sending back for adaptation by their entropy under that
local model, so confident samples cost no bandwidth. ``build_net`` makes the local copy of the source
network (a ``package.module:callable`` and its weights file) and ``predict_probs`` runs it on a uint8 batch;
``tta replay --edge-net`` (``tta_client.replay.EdgeConfig``) plays a whole stream this way.

torch and safetensors are imported when ``load_export``, ``build_net`` or ``predict_probs`` is called
(``pip install 'tta-client[edge]'``); ``select_uploads`` needs numpy only.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

__all__ = [
    "MANIFEST_KEY",
    "ExportMismatchError",
    "build_net",
    "load_export",
    "predict_probs",
    "read_export",
    "select_uploads",
    "set_threads",
]

#: The safetensors metadata entry holding the export's manifest (JSON).
MANIFEST_KEY = "tta_edge_manifest"
#: The export layouts this loader understands.
FORMAT_VERSIONS = (1,)
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ExportMismatchError(ValueError):
    """An export does not fit the model it is loaded into (names, shapes) or is not an export at all."""


def read_export(data_or_path: bytes | str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, manifest)`` of an export, from its bytes or a file; tensors are torch CPU tensors."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        if isinstance(data_or_path, bytes | bytearray | memoryview):
            blob = bytes(data_or_path)
            tensors = load(blob)
            header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
            meta = header.get("__metadata__") or {}
        else:
            with safe_open(os.fspath(data_or_path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        manifest = json.loads(meta[MANIFEST_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise ExportMismatchError(f"not a stream export: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") not in FORMAT_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ExportMismatchError(f"unsupported export format version {version!r} (known: {FORMAT_VERSIONS})")
    return tensors, manifest


def load_export(model: nn.Module, data_or_path: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """Write an export into ``model`` (the source network, as the model's weights file names its tensors)
    in place and return its manifest (model id and fingerprint, strategy and config, stream version...).

    Strict: every tensor of the export must exist in ``model.state_dict()`` with the same shape, or
    nothing is changed and ``ExportMismatchError`` names the offending keys. Tensors the export does not
    hold (convolutions, the classifier) keep their values. Put the model in eval mode to predict.
    """
    import torch

    tensors, manifest = read_export(data_or_path)
    own = model.state_dict()
    unknown = sorted(k for k in tensors if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in tensors.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    problems = _key_problems(("not in the model", unknown), ("of another shape", shapes))
    if problems:
        raise ExportMismatchError(
            f"export of model {manifest.get('model')!r} does not fit this model: keys " + "; ".join(problems)
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))
    return manifest


def select_uploads(
    probs: np.ndarray, *, max_entropy: float | None = None, fraction: float | None = None
) -> np.ndarray:
    """Indices of the samples to upload for adaptation, by their prediction entropy under the edge model.

    ``probs``: (N, C) class probabilities of the local (patched) model. ``max_entropy`` (nats): upload the
    samples whose entropy is at most this, the reliable ones entropy-based strategies learn from (EATA's
    margin is 0.4 ln C); ``fraction``: upload the ``ceil(fraction * N)`` lowest-entropy samples. Give one
    of them. The indices are in ascending order.
    """
    import numpy as np

    if (max_entropy is None) == (fraction is None):
        raise ValueError("give exactly one of max_entropy and fraction")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    if max_entropy is not None:
        return np.flatnonzero(entropy <= max_entropy)
    assert fraction is not None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = int(np.ceil(fraction * len(p)))
    return np.sort(np.argsort(entropy, kind="stable")[:count])


def _resolve(factory: str) -> Any:
    if not _FACTORY.fullmatch(factory):
        raise ValueError(f"the edge network must be named as package.module:callable, got {factory!r}")
    module_name, _, attr = factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for the edge network {factory!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"edge network {factory!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"edge network {factory!r} is not callable")
    return obj


def _read_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state_dict from a local file, as the server reads a model's weights: safetensors, or a torch file
    loaded with ``weights_only``; a ``state_dict`` wrapper and ``module.``/``model.`` prefixes removed."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"edge weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw: Any = load_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    out = {}
    for key, value in raw.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def build_net(
    factory: str, kwargs: dict[str, Any] | None = None, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """The edge's copy of the source network: ``factory`` (``package.module:callable``) called with
    ``kwargs``, the ``weights`` file (the model's weights file on the server) loaded strictly, in eval mode
    without gradients. It must be the served network itself, under the names its weights file uses (for
    the WRN-40-2 of models.yaml: ``adapters.models.wide_resnet:WideResNet`` with ``depth: 40,
    widen_factor: 2``), so that ``load_export`` finds every tensor of a stream's export in it. Without
    ``weights`` the network keeps its constructor's initialisation.
    """
    import torch
    from torch import nn

    build = _resolve(factory)
    try:
        net = build(**dict(kwargs or {}))
    except Exception as exc:
        raise ValueError(f"cannot build the edge network {factory}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise ValueError(f"edge network {factory!r} built a {type(net).__name__}, not a torch nn.Module")
    if weights is not None:
        state = _read_weights(weights)
        own = net.state_dict()
        for key, value in own.items():  # older checkpoints lack BN's counter, which inference never reads
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros_like(value)
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        problems = _key_problems(("missing", missing), ("unexpected", unexpected))
        if problems:
            raise ValueError(
                f"weights {os.fspath(weights)} do not fit {factory}: keys " + "; ".join(problems)
            )
        net.load_state_dict(state, strict=True)
    net.eval()
    net.requires_grad_(False)
    return net


def predict_probs(
    net: nn.Module,
    images: np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) of ``net`` for a uint8 NHWC RGB batch, scaled to [0, 1] as the server
    does, then normalised by ``mean``/``std`` where the served model declares them."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        x = (x - torch.tensor(list(mean)).view(1, -1, 1, 1)) / torch.tensor(list(std)).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = net(x)
    probs: np.ndarray = logits.float().softmax(1).numpy()
    return probs


def set_threads(threads: int) -> None:
    """torch's intra-op threads for the edge's forward passes (``torch.set_num_threads``)."""
    import torch

    torch.set_num_threads(threads)


def _key_problems(*groups: tuple[str, list[str]]) -> list[str]:
    """'N what: k1, k2, ...' for each non-empty group of state_dict keys (the first five named)."""
    return [
        f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in groups
        if items
    ]
