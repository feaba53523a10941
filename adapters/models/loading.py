"""Declared models: architecture, local weights, classes, input geometry and normalisation.

An architecture is named by `arch`: `wide_resnet` (the project's WRN), `torchvision:<name>` (any
torchvision classification model, built with `torchvision.models.get_model(name, weights=None, ...)`;
`resnet18` ... `resnet152` are kept as aliases), `timm:<name>` (with the optional `timm` extra), or
`factory` with `factory: "package.module:callable"` for a user-defined module. `kwargs` go to the
constructor. Weights are only ever read from local files (no hub downloads) with `weights_only`
loading or safetensors, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from adapters._bn import convert_norm_layers, layer_kind
from adapters.base import ModelHandle, ModelLoadError
from adapters.models.wide_resnet import WideResNet

log = logging.getLogger(__name__)

# Plain torchvision names accepted as `arch` (the first served ResNets); any other model is `torchvision:<name>`.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Constructor arguments the spec sets itself.
_RESERVED_KWARGS = ("weights", "pretrained", "num_classes")
# torchvision models whose defaults would add auxiliary heads (never run in eval mode, so their BN
# layers would never see a batch) or warn about weight initialisation.
_TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_FACTORY_PATTERN = (
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models."""
    import torchvision.models as tvm

    names: list[str] = tvm.list_models(module=tvm)
    return names


def _torchvision_min_size(name: str) -> tuple[int, int] | None:
    """The smallest input torchvision documents for a model (from its weights' metadata), if any."""
    import torchvision.models as tvm

    try:
        weights = list(tvm.get_model_weights(name))
    except (KeyError, ValueError):  # pragma: no cover - every classification model has weights
        return None
    size = weights[0].meta.get("min_size") if weights else None
    return (int(size[0]), int(size[1])) if size else None


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} model {name!r}{hint}")


class ModelSpec(BaseModel):
    """One served model, as declared in the server's model config file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    arch: str = Field(
        description=(
            "wide_resnet, torchvision:<name> (any torchvision classification model; resnet18..resnet152 "
            "also plain), timm:<name> (needs the timm extra), or factory (see `factory`)"
        )
    )
    factory: str | None = Field(
        None,
        pattern=_FACTORY_PATTERN,
        description="`package.module:callable` building a user-defined nn.Module (arch: factory, implied)",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="constructor keyword arguments (torchvision/timm/factory/wide_resnet), e.g. width_mult",
    )
    top_modules: tuple[str, ...] | None = Field(
        None,
        description=(
            "module-name prefixes of the top of the network, whose normalisation layers SAR leaves "
            "frozen; default: layer4 for ResNets, the last three blocks and the final norm for ViTs, "
            "none otherwise"
        ),
    )
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
    source_artifact: Path | None = Field(
        None,
        description=(
            "what source-dependent strategies need, made once from source_data by `tta-bench prepare-source "
            "--model <id>` (safetensors: EATA's Fisher); a missing file is computed at first use instead"
        ),
    )
    strategy_defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "per strategy name, the hyper-parameters it starts from on this model, under what a stream's own "
            "config sets, e.g. {tent: {lr: 2.5e-4}}; a composite's part configs nest under the part's name"
        ),
    )
    max_cached_streams: int | None = Field(
        None,
        ge=0,
        description=(
            "streams of this model whose states a replica keeps on its device between steps, at most (a few "
            "for mean-teacher strategies on a large network: 0.4 GB per ResNet-50 cotta stream); None = only "
            "the replica's TTA_STATE_CACHE_SIZE / TTA_STATE_CACHE_BYTES bounds"
        ),
    )
    random_init_seed: int | None = Field(None, description="required to allow weights=None (benchmarks)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "compute dtype of the forward pass: bf16 runs it under autocast (BN statistics, losses and "
            "state stay float32); turn it on per model once its accuracy is measured"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _factory_implies_arch(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("factory") and "arch" not in data:
            return {**data, "arch": "factory"}
        return data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        source, sep, name = arch.partition(":")
        if not sep:
            if arch in ("wide_resnet", "factory", *TORCHVISION_ARCHS):
                return arch
            raise ValueError(
                f"unknown arch {arch!r}: use wide_resnet, torchvision:<name>, timm:<name> or factory"
                + (f" (did you mean torchvision:{arch}?)" if arch in torchvision_models() else "")
            )
        if source == "torchvision":
            if name not in torchvision_models():
                raise _unknown("torchvision classification", name, torchvision_models())
            return arch
        if source == "timm":
            try:
                import timm
            except ImportError:
                raise ValueError(
                    f"arch {arch!r} needs timm, which is not installed: pip install 'tta-service[timm]'"
                ) from None
            if not timm.is_model(name):
                raise _unknown("timm", name, list(timm.list_models()))
            return arch
        raise ValueError(f"unknown arch source {source!r} in {arch!r}: use torchvision:<name> or timm:<name>")

    @field_validator("strategy_defaults")
    @classmethod
    def _known_strategies(cls, defaults: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import adapters  # the registry imports this module: look it up at validation time

        for name, config in defaults.items():
            try:
                adapters.get_strategy(name).parse_config(config)
            except adapters.UnknownStrategyError as exc:
                raise ValueError(f"strategy_defaults: {exc}") from None
            except ValueError as exc:  # pydantic.ValidationError: name each bad field
                errors = getattr(exc, "errors", None)
                bad = (
                    [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors()]
                    if errors
                    else [str(exc)]
                )
                raise ValueError(f"strategy_defaults.{name}: {'; '.join(bad)}") from None
        return defaults

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if (self.arch == "factory") != (self.factory is not None):
            raise ValueError("`factory` goes with arch: factory (and arch: factory needs a `factory`)")
        reserved = [k for k in _RESERVED_KWARGS if k in self.kwargs]
        if reserved:
            raise ValueError(f"kwargs may not set {reserved}: the spec sets them (weights, num_classes)")
        if self.arch.startswith("torchvision:"):
            minimum = _torchvision_min_size(self.arch.partition(":")[2])
            if minimum and (self.input_size[0] < minimum[0] or self.input_size[1] < minimum[1]):
                raise ValueError(
                    f"{self.arch} needs an input_size of at least {minimum[0]}x{minimum[1]}, "
                    f"got {self.input_size[0]}x{self.input_size[1]}"
                )
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
    """The declared architecture with freshly initialised weights (the global RNG's)."""
    try:
        net = _construct(spec)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.id!r}: cannot build {spec.arch}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"model {spec.id!r}: {spec.arch} built a {type(net).__name__}, not an nn.Module")
    return net


def _construct(spec: ModelSpec) -> Any:
    source, _, name = spec.arch.partition(":")
    if spec.arch == "wide_resnet":
        return WideResNet(spec.depth, spec.widen_factor, spec.num_classes, **spec.kwargs)
    if spec.arch in TORCHVISION_ARCHS or source == "torchvision":
        import torchvision.models as tvm

        name = name or spec.arch
        kwargs = {**_TORCHVISION_DEFAULTS.get(name, {}), **spec.kwargs}
        return tvm.get_model(name, weights=None, num_classes=spec.num_classes, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=spec.num_classes, **spec.kwargs)
    assert spec.factory is not None
    return _resolve_factory(spec)(**_factory_kwargs(spec))


def _resolve_factory(spec: ModelSpec) -> Callable[..., Any]:
    assert spec.factory is not None
    module_name, _, attr = spec.factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {spec.id!r}: cannot import {module_name!r} for factory {spec.factory!r}: {exc}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(
                f"model {spec.id!r}: factory {spec.factory!r}: {module_name} has no {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"model {spec.id!r}: factory {spec.factory!r} is not callable")
    factory: Callable[..., Any] = obj
    return factory


def _factory_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The spec's kwargs, plus `num_classes` when the factory takes it and kwargs do not set it."""
    kwargs = dict(spec.kwargs)
    try:
        params = inspect.signature(_resolve_factory(spec)).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return kwargs
    if "num_classes" in params:
        kwargs["num_classes"] = spec.num_classes
    return kwargs


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


def load_weights(net: nn.Module, spec: ModelSpec, path: Path) -> None:
    """Load a checkpoint strictly; a mismatch names the file and a few of the keys that differ."""
    state = load_checkpoint(path)
    expected = net.state_dict()
    for key, value in expected.items():
        # Checkpoints of older PyTorch versions lack BN's counter, which inference does not use.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if items
    ]
    if problems:
        raise ModelLoadError(
            f"model {spec.id!r}: weights {path} do not fit {spec.arch}: keys " + "; ".join(problems)
        )
    # Module versions (state_dict metadata, which e.g. MNASNet's loader requires) are the architecture's
    # own: a checkpoint that matches every key and shape is in its current layout.
    fitted: Any = OrderedDict(state)
    fitted._metadata = getattr(expected, "_metadata", None)
    net.load_state_dict(fitted, strict=True)


def _fingerprint(spec: ModelSpec, state: dict[str, Tensor]) -> str:
    # Everything that changes what a state means: architecture, classes, input geometry and normalisation
    # (and, only where declared, so that older models keep their fingerprints: constructor arguments,
    # the factory, and SAR's top modules).
    identity: tuple[Any, ...] = (spec.arch, spec.num_classes, spec.input_size, spec.mean, spec.std)
    if spec.factory or spec.kwargs or spec.top_modules is not None:
        identity = (*identity, spec.factory, sorted(spec.kwargs.items()), spec.top_modules)
    h = hashlib.sha256(repr(identity).encode())
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
        load_weights(net, spec, spec.weights)
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
    used = _probe(net, spec)
    layers, affine, counts = convert_norm_layers(net, used)
    top = spec.top_modules if spec.top_modules is not None else default_top_modules(net)
    use_cl = device.type == "cuda" if channels_last is None else channels_last
    # Module.to takes a device and a memory format together; torch's overloads do not say so.
    model.to(device, memory_format=torch.channels_last if use_cl else torch.contiguous_format)  # type: ignore[call-overload]
    layers = tuple(_relocate(layer, device) for layer in layers)
    bn_by_name = {layer.name: layer for layer in layers}
    affine = tuple(
        replace(a, weight=bn_by_name[a.name].weight, bias=bn_by_name[a.name].bias)
        if a.name in bn_by_name
        else replace(a, weight=a.weight.to(device), bias=a.bias.to(device))
        for a in affine
    )
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
        source_labels=_label_loader(spec.source_data) if spec.source_data else None,
        channels_last=use_cl,
        autocast_dtype=torch.bfloat16 if (precision or spec.precision) == "bf16" else None,
        affine_layers=affine,
        layer_counts=counts,
        top_modules=tuple(top),
        prepared=_read_source_artifact(spec, fingerprint, device),
        strategy_defaults=spec.strategy_defaults,
    )


def _read_source_artifact(spec: ModelSpec, fingerprint: str, device: torch.device) -> dict[str, Tensor]:
    """The tensors of the model's prepared source artefact; {} when none is declared or the file is missing
    (source-dependent state is then computed at first use, as without an artefact). An artefact made for other
    weights is refused: its Fisher would silently be another model's."""
    path = spec.source_artifact
    if path is None:
        return {}
    if not path.is_file():
        log.warning(
            "model %s: source artefact %s not found; source-dependent state is computed at first use "
            "(make it with `tta-bench prepare-source --model %s`)",
            spec.id,
            path,
            spec.id,
        )
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:
        raise ModelLoadError(f"model {spec.id!r}: cannot read source artefact {path}: {exc}") from exc
    if meta.get("fingerprint") != fingerprint:
        raise ModelLoadError(
            f"model {spec.id!r}: source artefact {path} was made for other weights (fingerprint "
            f"{meta.get('fingerprint')!r}, model {fingerprint!r}); remake it with `tta-bench prepare-source "
            f"--model {spec.id}`"
        )
    return {k: v.to(device) for k, v in tensors.items()}


def _probe(net: nn.Module, spec: ModelSpec) -> set[str]:
    """Run the network once on a batch of two at the declared input size: it must give (2, num_classes)
    logits. Returns the names of the normalisation layers the forward runs (the others, such as
    auxiliary heads that only training uses, are not adapted)."""
    used: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: used.add(name))
        for name, m in net.named_modules()
        if layer_kind(m) is not None
    ]
    height, width = spec.input_size
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.id!r} ({spec.arch}) cannot run on its input_size {height}x{width}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, spec.num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelLoadError(
            f"model {spec.id!r} ({spec.arch}) returns {got} for 2 images; expected logits of shape "
            f"(2, {spec.num_classes}) (num_classes)"
        )
    return used


def default_top_modules(net: nn.Module) -> tuple[str, ...]:
    """Where SAR's reference stops adapting (docs/ALGORITHMS.md §6): ResNets' `layer4`; for ViTs (a
    sequence of blocks with LayerNorm) the last three blocks and the final norm; nothing otherwise."""
    modules = dict(net.named_modules())
    if "layer4" in modules:
        return ("layer4",)
    for blocks in ("blocks", "encoder.layers"):
        seq = modules.get(blocks)
        if not isinstance(seq, nn.Sequential | nn.ModuleList) or len(seq) < 4:
            continue
        if any(isinstance(m, nn.LayerNorm) for m in seq.modules()):
            last = [f"{blocks}.{child}" for child in list(seq._modules)[-3:]]
            final = [n for n in ("norm", "encoder.ln") if n in modules]
            return (*last, *final)
    return ()


def _relocate(layer: Any, device: torch.device) -> Any:
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


def _label_loader(path: Path) -> Callable[[int, int], Tensor] | None:
    """Labels of `read_images`' draws from a JPEG archive with a `labels` field; None for a file without."""
    if path.suffix == ".npy":
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "labels" not in archive.files:
                return None
    except (OSError, ValueError):
        return None  # read_images reports the broken file when a strategy asks for images

    def load(n: int, seed: int) -> Tensor:
        with np.load(path, allow_pickle=False) as archive:
            labels = np.asarray(archive["labels"]).astype(np.int64).reshape(-1)
        idx = np.random.default_rng(seed).choice(len(labels), size=min(n, len(labels)), replace=False)
        return torch.from_numpy(labels[idx])

    return load


def read_images(path: Path, n: int, seed: int) -> np.ndarray:
    """n random images (uint8 NHWC RGB) of a source-data file, in the seeded random (shuffled) order.

    The file is a uint8 NHWC ``.npy`` array, or a JPEG ``.npz`` archive: ``jpeg`` (uint8, every file
    concatenated) and ``offsets`` (int64, N + 1 boundaries); other fields (labels, classes) are not read.
    The indices are ``default_rng(seed).choice(N, min(n, N), replace=False)``, in the order drawn: never
    sorted, because training archives are stored class by class, and batches of consecutive sorted indices
    would then hold one or two classes each (EATA's Fisher from such batches is about 54x larger than from
    the shuffled batches of the reference's data loader).
    """
    if not path.is_file():
        raise FileNotFoundError(f"source data not found: {path}")
    rng = np.random.default_rng(seed)
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        idx = rng.choice(len(arr), size=min(n, len(arr)), replace=False)
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
    idx = rng.choice(count, size=min(n, count), replace=False)
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
