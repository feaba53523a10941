"""Architectures beyond the served WRN: torchvision classification models, user factories, and models
normalised by GroupNorm or LayerNorm instead of BatchNorm.

Every architecture is built with seeded random weights, saved, loaded back through `ModelSpec`, and
then every registered strategy either steps two batches (finite logits of the right shape) or, where
the model lacks the layer kinds it adapts, refuses with IncompatibleModelError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import adapters
from adapters import BatchTooSmallError, IncompatibleModelError, ModelHandle
from adapters.base import ModelLoadError
from adapters.models import ModelSpec, build_handle, build_network
from adapters.tent import TentConfig
from tests.conftest import require_timm

from ._reference import SMALL

# (torchvision name, input size): the smallest variant of each family, at 64x64 so that the last stage
# of an ImageNet network (stride 32) still has 2x2 values per channel for UnMix-TNS's instance
# statistics; Inception-v3 at its documented minimum, 75x75 (1x1 at the end: UnMix-TNS refuses).
# EfficientNet B1-B7 and the larger ResNets, RegNets, DenseNets, VGGs are the same code at other widths
# and depths; they are validated by name below but not run (their weights alone are 100s of MB).
TORCHVISION = [
    ("resnet18", 64),
    ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64),
    ("mobilenet_v2", 64),
    ("mobilenet_v3_small", 64),
    ("mobilenet_v3_large", 64),
    ("efficientnet_b0", 64),
    ("efficientnet_v2_s", 64),
    ("regnet_x_400mf", 64),
    ("regnet_y_400mf", 64),
    ("densenet121", 64),
    ("shufflenet_v2_x0_5", 64),
    ("mnasnet0_5", 64),
    ("googlenet", 64),
    ("inception_v3", 75),
    ("vgg11_bn", 64),
]
# ecotta needs one chain of residual blocks to cut into parts: GoogLeNet's blocks are parallel branches,
# Inception-v3 and VGG have no Sequential stages of convolution+norm blocks. It refuses those, naming why.
ECOTTA_REFUSES = {"googlenet", "inception_v3", "vgg11_bn"}
STATISTICS = ("norm", "alpha_bn", "unmix_tns")
UPDATERS = ("tent", "eata", "eta", "sar")
FACTORY = "tests.adapters._user_models"
BATCH = 4


@pytest.fixture(autouse=True)
def _return_freed_memory() -> Iterator[None]:
    """After each test, give the freed tensors of its networks back to the OS: the mean-teacher strategies
    hold several copies of a 67 M-parameter network at their peak, and glibc keeps freed chunks below its
    (raised) mmap threshold in the heap, so without a trim the suite's resident memory grows test by test."""
    yield
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only
    if trim is not None:
        trim(0)


def _config(strategy: adapters.ComposedStrategy) -> adapters.StrategyConfig:
    """Small configs; e_margin 1 lets random-weight models pass the entropy filters, so updates happen."""
    small = {**SMALL, "e_margin": 1.0}
    if not strategy.config_parts:
        fields = strategy.config_cls.model_fields
        return strategy.config_cls(**{k: v for k, v in small.items() if k in fields})
    return strategy.parse_config(
        {
            part: {k: v for k, v in small.items() if k in cls.model_fields}
            for part, cls in strategy.config_parts.items()
        }
    )


def _saved_spec(tmp: Path, spec: ModelSpec, seed: int = 0) -> ModelSpec:
    """`spec` with seeded random weights saved to a file, and 16 source images for EATA's Fisher."""
    torch.manual_seed(seed)
    net = build_network(spec)
    weights = tmp / f"{spec.id}.pt"
    torch.save(net.state_dict(), weights)
    source = tmp / f"{spec.id}_source.npy"
    h, w = spec.input_size
    np.save(source, np.random.default_rng(seed).integers(0, 255, size=(16, h, w, 3), dtype=np.uint8))
    return spec.model_copy(update={"weights": weights, "source_data": source})


def _batches(size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(BATCH, 3, size, size, generator=gen) for _ in range(2)]


def _exercise(handle: ModelHandle, size: int, too_small: tuple[str, ...] = ()) -> dict[str, str]:
    """Run every registered strategy on the handle; returns strategy -> outcome."""
    outcomes: dict[str, str] = {}
    for name in adapters.list_strategies():
        strategy = adapters.get_strategy(name)
        cfg = _config(strategy)
        if not strategy.applies_to(handle):
            with pytest.raises(IncompatibleModelError, match=r"has none it can adapt"):
                strategy.init_state(handle, cfg)
            outcomes[name] = "refused"
            continue
        try:
            try:
                state = strategy.init_state(handle, cfg)  # EATA's Fisher pass already runs the normaliser
            except IncompatibleModelError as exc:
                # The one strategy that also refuses by the network's structure, not its layer kinds.
                assert name == "ecotta" and ("residual blocks" in str(exc) or "chain" in str(exc)), (
                    name,
                    exc,
                )
                outcomes[name] = "refused"
                continue
            for x in _batches(size):
                result = strategy.step(handle, x, state, cfg)
                state = result.state
        except BatchTooSmallError:
            assert name.startswith(too_small), name
            outcomes[name] = "batch_too_small"
            continue
        assert result.logits.shape == (BATCH, handle.num_classes), name
        assert torch.isfinite(result.logits).all(), name
        assert state.meta["steps"] == 2, name
        outcomes[name] = "stepped"
    return outcomes


@pytest.mark.parametrize(("name", "size"), TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_torchvision_architecture_runs_every_strategy(tmp_path: Path, name: str, size: int) -> None:
    spec = ModelSpec(
        id=name, arch=f"torchvision:{name}", num_classes=10, input_size=(size, size), random_init_seed=0
    )
    handle = build_handle(_saved_spec(tmp_path, spec))
    assert handle.layer_counts.get("batchnorm2d", 0) == len(handle.bn_layers) > 0
    outcomes = _exercise(handle, size, too_small=("unmix_tns",) if name == "inception_v3" else ())
    refused = {s for s, outcome in outcomes.items() if outcome == "refused"}
    assert refused == ({"ecotta"} if name in ECOTTA_REFUSES else set()), outcomes
    assert handle.top_modules == (("layer4",) if "res" in name else ())


def test_every_torchvision_bn_family_validates_by_name() -> None:
    for name in (
        "resnet152",
        "resnext101_64x4d",
        "wide_resnet101_2",
        "efficientnet_b7",
        "efficientnet_v2_l",
        "regnet_y_16gf",
        "densenet201",
        "shufflenet_v2_x2_0",
        "mnasnet1_3",
        "vgg19_bn",
    ):
        ModelSpec(id="m", arch=f"torchvision:{name}", input_size=(64, 64), random_init_seed=0)
    # The first ResNets keep their plain names (and fingerprints).
    ModelSpec(id="m", arch="resnet50", random_init_seed=0)


def _factory_handle(tmp: Path, name: str, **kwargs: Any) -> ModelHandle:
    spec = ModelSpec(
        id=name,
        arch="factory",
        factory=f"{FACTORY}:{name}",
        kwargs=kwargs,
        input_size=(16, 16),
        random_init_seed=0,
    )
    return build_handle(_saved_spec(tmp, spec))


@pytest.mark.parametrize("name", ["gn_resnet", "tiny_vit"])
def test_models_without_batchnorm_adapt_their_affine_parameters(tmp_path: Path, name: str) -> None:
    handle = _factory_handle(tmp_path, name)
    kind = "groupnorm" if name == "gn_resnet" else "layernorm"
    assert not handle.bn_layers and set(handle.layer_counts) == {kind}
    assert {layer.kind for layer in handle.trainable_layers()} == {kind}
    outcomes = _exercise(handle, 16)
    for strategy, outcome in outcomes.items():
        refused = strategy.startswith(("norm", "alpha_bn", "unmix_tns", "ema_tbn", "dua_plugin"))
        refused |= strategy == "ecotta" and name == "tiny_vit"  # no convolution blocks to attach to
        assert outcome == ("refused" if refused else "stepped"), (strategy, outcome)
    assert {"source", *UPDATERS} <= {s for s, o in outcomes.items() if o == "stepped"}


@pytest.mark.parametrize("name", ["gn_resnet", "tiny_vit"])
def test_affine_updates_change_predictions_not_the_model(tmp_path: Path, name: str) -> None:
    handle = _factory_handle(tmp_path, name)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    tent = adapters.get_strategy("tent")
    cfg = TentConfig(lr=0.05)
    x = _batches(16)[0]
    state = tent.init_state(handle, cfg)
    first = tent.step(handle, x, state, cfg)
    second = tent.step(handle, x, first.state, cfg)
    changed = [k for k in handle.affine_names() if not torch.equal(first.state.tensors[k], state.tensors[k])]
    assert changed and not torch.equal(first.logits, second.logits)
    # Drift signals: BN distance is absent without BatchNorm (docs/OBSERVABILITY.md); the prediction
    # signals are still there.
    assert first.stats.bn_distance is None and first.stats.mean_entropy > 0 and first.stats.loss is not None
    # Without adaptation the model is the source model; the shared weights never moved.
    source = adapters.get_strategy("source")
    plain = source.step(handle, x, source.init_state(handle, source.config_cls()), source.config_cls())
    with torch.no_grad():
        torch.testing.assert_close(plain.logits, handle.model(x), rtol=0, atol=0)
    # The first step predicts with the source parameters (up to the kernels of a forward with autograd).
    torch.testing.assert_close(first.logits, plain.logits, rtol=1e-5, atol=1e-5)
    after = handle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in handle.model.parameters())


def test_sar_freezes_the_declared_top_modules(tmp_path: Path) -> None:
    sar = adapters.get_strategy("sar")
    vit = _factory_handle(tmp_path, "tiny_vit")
    assert vit.top_modules == ("blocks.1", "blocks.2", "blocks.3", "norm")
    trained = {
        k.removeprefix("opt.momentum_buffer.")
        for k in sar.init_state(vit, sar.config_cls()).tensors
        if k.startswith("opt.")
    }
    assert trained == {f"blocks.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
    gn = _factory_handle(tmp_path, "gn_resnet")
    assert gn.top_modules == ("layer4",)
    names = [k for k in sar.init_state(gn, sar.config_cls()).tensors if k.startswith("opt.")]
    assert names and not any(".layer4." in k for k in names)
    declared = build_handle(
        ModelSpec(
            id="gn",
            arch="factory",
            factory=f"{FACTORY}:gn_resnet",
            input_size=(16, 16),
            random_init_seed=0,
            top_modules=(),
        )
    )
    assert len(
        [k for k in sar.init_state(declared, sar.config_cls()).tensors if k.startswith("opt.")]
    ) == len(declared.affine_names())


def test_a_factory_without_num_classes_takes_its_kwargs(tmp_path: Path) -> None:
    handle = _factory_handle(tmp_path, "bn_convnet", width=6)
    assert handle.layer_counts == {"batchnorm2d": 2} and handle.bn_layers[0].num_features == 6
    outcomes = _exercise(handle, 16)
    # A plain Sequential of layers has no blocks for ecotta's meta networks; everything else steps.
    assert outcomes.pop("ecotta") == "refused" and set(outcomes.values()) == {"stepped"}


def test_shared_forward_of_layernorm_streams_matches_separate_steps(tmp_path: Path) -> None:
    handle = _factory_handle(tmp_path, "tiny_vit")
    tent = adapters.get_strategy("tent")
    cfg = TentConfig(lr=0.05)
    x1, x2 = _batches(16)
    s1 = tent.step(handle, x1, tent.init_state(handle, cfg), cfg).state
    s2 = tent.init_state(handle, cfg)
    many = tent.step_many(handle, [x1, x2], [s1, s2], cfg, adapt=False)
    for x, s, got in zip([x1, x2], [s1, s2], many, strict=True):
        torch.testing.assert_close(
            got.logits, tent.step(handle, x, s, cfg, adapt=False).logits, rtol=0, atol=0
        )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"arch": "torchvision:resnet19"}, r"unknown torchvision classification model 'resnet19'.*resnet18"),
        ({"arch": "mobilenet_v2"}, r"did you mean torchvision:mobilenet_v2"),
        ({"arch": "keras:resnet"}, r"unknown arch source 'keras'"),
        ({"arch": "torchvision:inception_v3", "input_size": (32, 32)}, r"at least 75x75"),
        ({"arch": "factory"}, r"needs a `factory`"),
        ({"factory": "not a path"}, r"String should match pattern"),
        ({"arch": "torchvision:resnet18", "kwargs": {"num_classes": 3}}, r"may not set \['num_classes'\]"),
    ],
)
def test_bad_specs_fail_validation(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate({"id": "m", "random_init_seed": 0, **entry})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"factory": "tests.adapters._no_such_module:f"}, r"cannot import 'tests.adapters._no_such_module'"),
        ({"factory": f"{FACTORY}:missing"}, r"has no 'missing'"),
        ({"factory": f"{FACTORY}:NOT_CALLABLE"}, r"is not callable"),
        ({"factory": f"{FACTORY}:gn_resnet", "kwargs": {"depth": 3}}, r"cannot build factory.*depth"),
        ({"factory": f"{FACTORY}:tiny_vit", "input_size": (32, 32)}, r"cannot run on its input_size 32x32"),
        ({"factory": f"{FACTORY}:bn_convnet", "num_classes": 5}, r"returns \(2, 10\).*\(2, 5\)"),
    ],
)
def test_unbuildable_models_name_the_problem(entry: dict[str, Any], message: str) -> None:
    spec = ModelSpec.model_validate({"id": "m", "random_init_seed": 0, "input_size": (16, 16), **entry})
    with pytest.raises(ModelLoadError, match=message):
        build_handle(spec)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    spec = _saved_spec(
        tmp_path,
        ModelSpec(id="a", arch="torchvision:mobilenet_v3_small", input_size=(32, 32), random_init_seed=0),
    )
    other = ModelSpec(
        id="b", arch="torchvision:shufflenet_v2_x0_5", input_size=(32, 32), weights=spec.weights
    )
    with pytest.raises(
        ModelLoadError, match=r"a\.pt do not fit torchvision:shufflenet_v2_x0_5: keys \d+ missing: .*, \.\.\."
    ):
        build_handle(other)


@pytest.mark.parametrize(
    ("arch", "kwargs", "kind"),
    [
        ("timm:resnet18", {}, "batchnorm2d"),
        (
            "timm:vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2},
            "layernorm",
        ),
    ],
)
def test_timm_models_by_name(tmp_path: Path, arch: str, kwargs: dict[str, Any], kind: str) -> None:
    require_timm()
    size = 64 if kind == "batchnorm2d" else 32
    spec = ModelSpec(id="t", arch=arch, kwargs=kwargs, input_size=(size, size), random_init_seed=0)
    handle = build_handle(_saved_spec(tmp_path, spec))
    assert kind in handle.layer_counts
    outcomes = _exercise(handle, size)
    for name in ("source", *UPDATERS):
        assert outcomes[name] == "stepped", (name, outcomes)
    assert (outcomes["norm"] == "refused") == (kind == "layernorm")
    if kind == "layernorm":
        assert handle.top_modules == ("blocks.1", "blocks.2", "blocks.3", "norm")
