"""Declared models: architecture, local weights, classes, input geometry and normalisation.

Weights are only ever read from local files (no hub downloads) with `weights_only` loading or
safetensors, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from adapters._bn import convert_batchnorm
from adapters.base import IncompatibleModelError, ModelHandle
from adapters.models.wide_resnet import WideResNet

log = logging.getLogger(__name__)


class ModelSpec(BaseModel):
    """One served model, as declared in the server's model config file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    arch: Literal["wide_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    weights: Path | None = Field(None, description="local .pt/.pth/.safetensors; None = seeded random init")
    num_classes: int = Field(10, ge=2)
    classes: tuple[str, ...] = ()
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    depth: int = 28
    widen_factor: int = 10
    source_data: Path | None = Field(
        None, description="clean in-distribution images (JPEG npz or uint8 .npy)"
    )
    random_init_seed: int | None = Field(None, description="required to allow weights=None (benchmarks)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "compute dtype of the forward pass: bf16 runs it under autocast (BN statistics, losses and "
            "state stay float32); turn it on per model once its accuracy is measured"
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if self.weights is None and self.random_init_seed is None:
            raise ValueError(
                "a model needs `weights`, or `random_init_seed` to allow random weights explicitly"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        return self


class _Classifier(nn.Module):
    """Input normalisation (if any) in front of the network; inputs are floats in [0, 1]."""

    mean: Tensor  # buffers, registered when the spec normalises its inputs
    std: Tensor

    def __init__(self, net: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        super().__init__()
        self.net = net
        self.normalize = mean is not None
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)


def build_network(spec: ModelSpec) -> nn.Module:
    if spec.arch == "wide_resnet":
        return WideResNet(spec.depth, spec.widen_factor, spec.num_classes)
    import torchvision.models as tvm

    return getattr(tvm, spec.arch)(weights=None, num_classes=spec.num_classes)


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """A state_dict from a local file: plain or wrapped in `state_dict`, `module.`/`model.` prefixes stripped."""
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _fingerprint(spec: ModelSpec, state: dict[str, Tensor]) -> str:
    # Everything that changes what a state means: architecture, classes, input geometry and normalisation.
    h = hashlib.sha256(repr((spec.arch, spec.num_classes, spec.input_size, spec.mean, spec.std)).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def build_classifier(spec: ModelSpec) -> _Classifier:
    """The declared network with its weights (or seeded random ones) and input normalisation, frozen.

    Its BatchNorm layers are still the stock ones: `build_handle` converts them for adaptation.
    """
    if spec.weights is not None:
        net = build_network(spec)
        net.load_state_dict(load_checkpoint(spec.weights), strict=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.random_init_seed or 0)
            net = build_network(spec)
    model = _Classifier(net, spec.mean, spec.std)
    model.eval()
    model.requires_grad_(False)
    return model


def build_handle(
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    channels_last: bool | None = None,
    precision: Literal["fp32", "bf16"] | None = None,
) -> ModelHandle:
    """Build the network, load weights, freeze it and convert its BN layers (once).

    `precision` overrides the spec's (benchmarks compare both on one declared model).
    """
    device = torch.device(device)
    model = build_classifier(spec)
    net = model.net
    fingerprint = _fingerprint(spec, net.state_dict())
    layers = convert_batchnorm(net)
    if not layers:  # pragma: no cover - convert_batchnorm raises already
        raise IncompatibleModelError(f"model {spec.id} has no BN layers")
    use_cl = device.type == "cuda" if channels_last is None else channels_last
    # Module.to takes a device and a memory format together; torch's overloads do not say so.
    model.to(device, memory_format=torch.channels_last if use_cl else torch.contiguous_format)  # type: ignore[call-overload]
    layers = tuple(_relocate(layer, device) for layer in layers)
    return ModelHandle(
        model_id=spec.id,
        model=model,
        bn_layers=layers,
        num_classes=spec.num_classes,
        fingerprint=fingerprint,
        device=device,
        classes=spec.classes or tuple(str(i) for i in range(spec.num_classes)),
        input_size=spec.input_size,
        source_images=_source_loader(spec) if spec.source_data else None,
        channels_last=use_cl,
        autocast_dtype=torch.bfloat16 if (precision or spec.precision) == "bf16" else None,
    )


def _relocate(layer: Any, device: torch.device) -> Any:
    from dataclasses import replace

    return replace(
        layer,
        running_mean=layer.running_mean.to(device),
        running_var=layer.running_var.to(device),
        weight=layer.weight.to(device),
        bias=layer.bias.to(device),
    )


def _source_loader(spec: ModelSpec) -> Callable[[int, int], Tensor]:
    path = spec.source_data
    if path is None:
        raise ValueError(f"model {spec.id} declares no source data")

    def load(n: int, seed: int) -> Tensor:
        images = read_images(path, n, seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
        if tuple(x.shape[2:]) != tuple(spec.input_size):
            x = torch.nn.functional.interpolate(x, size=spec.input_size, mode="bilinear", antialias=True)
        return x

    return load


def read_images(path: Path, n: int, seed: int) -> np.ndarray:
    """n random images (uint8 NHWC RGB) of a source-data file, in ascending index order.

    The file is a uint8 NHWC ``.npy`` array, or a JPEG ``.npz`` archive: ``jpeg`` (uint8, every file
    concatenated) and ``offsets`` (int64, N + 1 boundaries); other fields (labels, classes) are not read.
    The indices are ``sort(default_rng(seed).choice(N, min(n, N), replace=False))``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"source data not found: {path}")
    rng = np.random.default_rng(seed)
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        idx = np.sort(rng.choice(len(arr), size=min(n, len(arr)), replace=False))
        return np.ascontiguousarray(arr[idx])
    with np.load(path, allow_pickle=False) as archive:
        missing = [f for f in ("jpeg", "offsets") if f not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the field(s) {missing} of a JPEG archive (jpeg, offsets)")
        jpeg = np.asarray(archive["jpeg"], dtype=np.uint8).reshape(-1)
        offsets = np.asarray(archive["offsets"], dtype=np.int64).reshape(-1)
    count = offsets.shape[0] - 1
    if count < 0 or (count and (offsets[0] != 0 or offsets[-1] != jpeg.shape[0])):
        raise ValueError(f"{path}: offsets must hold N + 1 boundaries from 0 to len(jpeg)")
    idx = np.sort(rng.choice(count, size=min(n, count), replace=False))
    return _decode_jpegs(jpeg, offsets, idx, path)


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, idx: np.ndarray, path: Path) -> np.ndarray:
    """Images `idx` of a concatenated-JPEG buffer, decoded to RGB by torchvision (libjpeg-turbo)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its codecs in favour of TorchCodec; the pinned one still ships them
    # (as tta_server.codec notes). Filtered per process, like there, so every decode call stays quiet.
    warnings.filterwarnings(
        "ignore",
        message="The image decoding and encoding capabilities of TorchVision",
        category=DeprecationWarning,
    )
    decoded = []
    for i in idx.tolist():
        start, end = int(offsets[i]), int(offsets[i + 1])
        if end <= start:
            raise ValueError(f"{path}: image {i} has no bytes")
        data = torch.from_numpy(jpeg[start:end].copy())
        decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0))
    if not decoded:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    shapes = {tuple(t.shape) for t in decoded}
    if len(shapes) != 1:
        raise ValueError(f"{path}: source images differ in size ({sorted(shapes)})")
    return torch.stack(decoded).numpy()
