"""Model loading: checkpoint layouts, BN conversion, torchvision networks and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

import adapters
from adapters._bn import AdaptiveBatchNorm2d, convert_batchnorm
from adapters.base import IncompatibleModelError, ModelHandle, ModelLoadError
from adapters.models import ModelSpec, build_handle, load_checkpoint
from adapters.models.wide_resnet import WideResNet
from tests.conftest import CIFAR_WEIGHTS

from ._reference import make_batch, replace_bn


def _cifar_spec(weights: Path) -> ModelSpec:
    return ModelSpec(id="cifar", arch="wide_resnet", depth=40, widen_factor=2, weights=weights)


def _weights(handle: ModelHandle) -> dict[str, torch.Tensor]:
    return dict(handle.model.state_dict())


def test_real_checkpoint_matches_the_architecture_strictly() -> None:
    state = load_checkpoint(CIFAR_WEIGHTS)
    net = WideResNet(depth=40, widen_factor=2, num_classes=10)
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state, strict=True)
    assert (
        sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) == 2_243_546
    )


def test_real_handle_indexes_every_bn_layer(cifar_handle: ModelHandle) -> None:
    bns = [m for m in cifar_handle.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, AdaptiveBatchNorm2d) for m in bns)
    assert len(cifar_handle.bn_layers) == len(bns) == 37  # 3 groups x 6 blocks x 2 + head
    assert [layer.index for layer in cifar_handle.bn_layers] == list(range(37))
    assert cifar_handle.bn_layers[-1].name == "bn1" and cifar_handle.bn_layers[-1].num_features == 128
    assert not any(p.requires_grad for p in cifar_handle.model.parameters())
    assert not cifar_handle.model.training
    assert cifar_handle.source_images is not None


@pytest.mark.parametrize("model", ["tiny", "cifar"])
def test_checkpoint_layouts_load_the_same_weights(tmp_path: Path, tiny_spec: ModelSpec, model: str) -> None:
    spec = tiny_spec if model == "tiny" else _cifar_spec(CIFAR_WEIGHTS)
    assert spec.weights is not None
    state = torch.load(spec.weights, map_location="cpu", weights_only=True)
    variants = {
        "plain.pt": state,
        "wrapped.pth": {"state_dict": state, "epoch": 3},
        "module.pt": {f"module.{k}": v for k, v in state.items()},
        "wrapped_module.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "model.pt": {f"model.{k}": v for k, v in state.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    reference = build_handle(spec)
    expected = _weights(reference)
    for name in [*variants, "plain.safetensors"]:
        handle = build_handle(spec.model_copy(update={"weights": tmp_path / name}))
        loaded = _weights(handle)
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
        assert handle.fingerprint == reference.fingerprint, name


def test_missing_weights_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        build_handle(_cifar_spec(tmp_path / "absent.pt"))


def test_mismatched_checkpoint_is_refused(tmp_path: Path, tiny_spec: ModelSpec) -> None:
    assert tiny_spec.weights is not None
    state = torch.load(tiny_spec.weights, map_location="cpu", weights_only=True)
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(3, 4)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(
        ModelLoadError,
        match=r"partial\.pt.*1 missing: fc\.bias; 1 unexpected: extra\.weight; 1 of another shape: fc\.weight",
    ):
        build_handle(tiny_spec.model_copy(update={"weights": tmp_path / "partial.pt"}))


def test_network_without_batchnorm_is_incompatible() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(IncompatibleModelError, match="BatchNorm2d"):
        convert_batchnorm(net)


def test_batchnorm_without_running_stats_is_incompatible() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(IncompatibleModelError, match="running statistics"):
        convert_batchnorm(net)


def test_strategies_refuse_a_handle_without_norm_layers() -> None:
    """Only `source` (no adaptation) serves a model without normalisation layers."""
    handle = ModelHandle(
        model_id="no_bn",
        model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)),
        bn_layers=(),
        num_classes=10,
        fingerprint="x",
        device=torch.device("cpu"),
    )
    adapters.get_strategy("source").check_model(handle)
    for name in adapters.list_strategies():
        if name == "source":
            continue
        strategy = adapters.get_strategy(name)
        with pytest.raises(IncompatibleModelError):
            strategy.check_model(handle)
        with pytest.raises(IncompatibleModelError):
            strategy.init_state(handle, strategy.config_cls())


def test_conversion_keeps_outputs_and_keys(tiny_spec: ModelSpec) -> None:
    net = WideResNet(depth=10, widen_factor=1, num_classes=10)
    assert tiny_spec.weights is not None
    net.load_state_dict(load_checkpoint(tiny_spec.weights))
    net.eval()
    x = make_batch(3, seed=0)
    with torch.no_grad():
        before = net(x)
    keys = list(net.state_dict())
    layers = convert_batchnorm(net)
    assert list(net.state_dict()) == keys
    assert [layer.name for layer in layers] == [
        n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_torchvision_resnet18_random_init_converts_and_runs() -> None:
    spec = ModelSpec(id="r18", arch="resnet18", random_init_seed=0, num_classes=10, input_size=(32, 32))
    handle = build_handle(spec)
    assert len(handle.bn_layers) == 20
    assert any(layer.name.startswith("layer4") for layer in handle.bn_layers)
    x = make_batch(4, seed=1, size=32)
    model, _ = replace_bn(handle)
    with torch.no_grad():
        expected = model(x)
    for name in ("source", "norm", "tent", "sar"):
        strategy = adapters.get_strategy(name)
        cfg = strategy.config_cls()
        result = strategy.step(handle, x, strategy.init_state(handle, cfg), cfg)
        assert result.logits.shape == (4, 10) and torch.isfinite(result.logits).all()
        if name == "source":
            torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    sar_state = adapters.get_strategy("sar").init_state(handle, adapters.get_strategy("sar").config_cls())
    assert not any(k.startswith("opt.") and ".layer4." in k for k in sar_state.tensors)
    assert build_handle(spec).fingerprint == handle.fingerprint
    assert build_handle(spec.model_copy(update={"random_init_seed": 1})).fingerprint != handle.fingerprint


def test_random_weights_need_an_explicit_seed() -> None:
    with pytest.raises(ValidationError, match="random_init_seed"):
        ModelSpec(id="r18", arch="resnet18")


def test_fingerprint_is_stable_and_tracks_weights(tmp_path: Path, tiny_spec: ModelSpec) -> None:
    first, second = build_handle(tiny_spec), build_handle(tiny_spec)
    assert first.fingerprint == second.fingerprint
    assert tiny_spec.weights is not None
    state = torch.load(tiny_spec.weights, map_location="cpu", weights_only=True)
    state["block1.layer.0.bn1.running_var"] = state["block1.layer.0.bn1.running_var"] * 1.001
    torch.save(state, tmp_path / "changed.pt")
    changed = build_handle(tiny_spec.model_copy(update={"weights": tmp_path / "changed.pt"}))
    assert changed.fingerprint != first.fingerprint


def test_input_normalisation_sits_inside_the_model(tiny_spec: ModelSpec) -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    handle = build_handle(tiny_spec.model_copy(update={"mean": mean, "std": std}))
    plain = build_handle(tiny_spec)
    x = make_batch(3, seed=2)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    source = adapters.get_strategy("source")
    cfg = source.config_cls()
    got = source.step(handle, x, source.init_state(handle, cfg), cfg).logits
    expected = source.step(plain, normalised, source.init_state(plain, cfg), cfg).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["norm", "alpha_bn", "unmix_tns", "tent"])
def test_channels_last_gives_the_same_predictions(tiny_spec: ModelSpec, name: str) -> None:
    default, channels_last = build_handle(tiny_spec), build_handle(tiny_spec, channels_last=True)
    assert channels_last.channels_last
    strategy = adapters.get_strategy(name)
    cfg = strategy.config_cls()
    x = make_batch(4, seed=3)
    a = strategy.step(default, x, strategy.init_state(default, cfg), cfg)
    b = strategy.step(channels_last, x, strategy.init_state(channels_last, cfg), cfg)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    for key, value in a.state.tensors.items():
        torch.testing.assert_close(b.state.tensors[key], value, rtol=1e-4, atol=1e-6)


def test_source_images_come_from_the_declared_file(tiny_handle: ModelHandle) -> None:
    assert tiny_handle.source_images is not None
    images = tiny_handle.source_images(10, 0)
    assert images.shape == (10, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images, tiny_handle.source_images(10, 0))
    assert not torch.equal(images, tiny_handle.source_images(10, 1))


def _jpeg_archive(path: Path, n: int, size: int = 16) -> Path:
    """A JPEG .npz archive (the shared CIFAR-10 layout) of n random colour images."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        files.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    labels = (np.arange(n) % 10).astype(np.uint8)
    np.savez(
        path, jpeg=np.concatenate(files), offsets=offsets, labels=labels, classes=np.array(list("abcdefghij"))
    )
    return path


def test_source_reader_decodes_jpeg_archives_as_tta_data_does(tmp_path: Path) -> None:
    """The core's own reader picks the same images, in the same order, with the same pixels."""
    import numpy as np

    from adapters.models.loading import read_images
    from tta_data import decode_images, load_jpeg_npz

    archive = _jpeg_archive(tmp_path / "src_jpeg.npz", 40)
    for n, seed in ((10, 0), (10, 3), (100, 1)):
        expected_idx = np.random.default_rng(seed).choice(40, size=min(n, 40), replace=False)
        expected = decode_images(load_jpeg_npz(archive), expected_idx)
        got = read_images(archive, n, seed)
        assert got.dtype == np.uint8 and got.shape == (min(n, 40), 16, 16, 3)
        assert np.array_equal(got, expected)


def test_source_reader_mixes_classes_of_a_class_ordered_archive(tmp_path: Path) -> None:
    """Training archives are stored class by class: the sample must come in shuffled order, so that each
    mini-batch of EATA's Fisher holds many classes (sorted indices give one or two per batch)."""
    import numpy as np

    from adapters.models.loading import read_images

    per_class = 100
    images = np.repeat(np.arange(10, dtype=np.uint8), per_class)[:, None, None, None] * np.ones(
        (1, 2, 2, 3), np.uint8
    )
    path = tmp_path / "by_class.npy"
    np.save(path, images)
    got = read_images(path, 400, 0)[:, 0, 0, 0]
    assert sorted(got.tolist()) != got.tolist()
    classes_per_batch = [len(set(got[i : i + 32].tolist())) for i in range(0, 400, 32)]
    assert min(classes_per_batch) >= 6, classes_per_batch


def test_source_reader_refuses_a_file_that_is_no_jpeg_archive(tmp_path: Path) -> None:
    import numpy as np

    from adapters.models.loading import read_images

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="jpeg"):
        read_images(bad, 1, 0)
    with pytest.raises(FileNotFoundError, match="source data not found"):
        read_images(tmp_path / "absent.npz", 1, 0)
