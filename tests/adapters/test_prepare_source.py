"""The source artefact (`tta-bench prepare-source`): made once, loaded with the model, used instead of a
recomputed Fisher; a missing file falls back to computing it, one made for other weights is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapters
from adapters.base import ModelLoadError
from adapters.eata import FISHER_PREFIX
from adapters.models import ModelSpec, build_handle
from adapters.prepare import prepare_source
from tta_bench import prepare_source as command

EATA = adapters.get_strategy("eata")


def _fisher(state: adapters.AdaptationState) -> dict[str, torch.Tensor]:
    return {k[len(FISHER_PREFIX) :]: v for k, v in state.tensors.items() if k.startswith(FISHER_PREFIX)}


def test_a_prepared_fisher_is_used_instead_of_a_recomputed_one(tiny_spec: ModelSpec, tmp_path: Path) -> None:
    handle = build_handle(tiny_spec)
    tensors = prepare_source(handle, strategies=("eata",), seeds=(0,))
    computed = _fisher(EATA.init_state(handle, EATA.parse_config({}), 0))
    assert len(tensors) == len(computed) > 0
    for key, value in tensors.items():
        assert torch.equal(value, computed[key.split(".", 3)[-1]])
    # Doubled values in the file: the state must carry the file's Fisher, so it was not recomputed.
    path = tmp_path / "tiny.source.safetensors"
    save_file({k: 2 * v for k, v in tensors.items()}, str(path), metadata={"fingerprint": handle.fingerprint})
    loaded = build_handle(tiny_spec.model_copy(update={"source_artifact": path}))
    assert len(loaded.prepared) == len(tensors)
    from_file = _fisher(EATA.init_state(loaded, EATA.parse_config({}), 0))
    for name, value in computed.items():
        assert torch.equal(from_file[name], 2 * value), name
    # Another seed is not in the file: computed, equal to the plain handle's.
    other = _fisher(EATA.init_state(loaded, EATA.parse_config({}), 1))
    plain = _fisher(EATA.init_state(handle, EATA.parse_config({}), 1))
    for name, value in plain.items():
        assert torch.equal(other[name], value), name


def test_a_missing_artefact_falls_back_and_a_stale_one_is_refused(
    tiny_spec: ModelSpec, tmp_path: Path
) -> None:
    missing = build_handle(tiny_spec.model_copy(update={"source_artifact": tmp_path / "absent.safetensors"}))
    assert dict(missing.prepared) == {}
    stale = tmp_path / "stale.safetensors"
    save_file({"x": torch.zeros(1)}, str(stale), metadata={"fingerprint": "another-model"})
    with pytest.raises(ModelLoadError, match=r"other weights.*prepare-source"):
        build_handle(tiny_spec.model_copy(update={"source_artifact": stale}))


def test_the_command_writes_the_artefact_the_models_file_names(tiny_spec: ModelSpec, tmp_path: Path) -> None:
    import yaml

    models = tmp_path / "models.yaml"
    entry = tiny_spec.model_dump(mode="json", exclude_none=True)
    entry["source_artifact"] = "art/tiny.safetensors"
    models.write_text(yaml.safe_dump({"models": [entry]}))
    assert command.main(["--models-config", str(models), "--model", "tiny"]) == 0
    handle = build_handle(tiny_spec.model_copy(update={"source_artifact": tmp_path / "art/tiny.safetensors"}))
    assert handle.prepared and all(k.startswith(FISHER_PREFIX) for k in handle.prepared)


def test_a_prepared_rmt_start_is_used_instead_of_a_warm_up(tiny_spec: ModelSpec, tmp_path: Path) -> None:
    from adapters.rmt import PROTOTYPES, STUDENT

    rmt = adapters.get_strategy("rmt")
    cfg = rmt.parse_config({})
    small = {"warmup_samples": 16, "source_size": 16, "source_batch_size": 8}
    handle = build_handle(tiny_spec)
    tensors = prepare_source(handle, strategies=("rmt",), seeds=(0,))
    assert any(k.endswith(PROTOTYPES) for k in tensors) and all(k.startswith("rmt.start.") for k in tensors)
    # Marked values in the file: a stream of the default config starts from them, without a warm-up.
    path = tmp_path / "tiny.source.safetensors"
    marked = {k: (v + 1 if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(marked, str(path), metadata={"fingerprint": handle.fingerprint})
    loaded = build_handle(tiny_spec.model_copy(update={"source_artifact": path}))
    state = rmt.init_state(loaded, cfg, 0)
    name = STUDENT + next(n for n, _ in handle.model.named_parameters())
    key = next(k for k in marked if k.endswith(name))
    assert torch.equal(state.tensors[name], marked[key])
    assert state.meta["opt_steps"] == 50000 // 200
    # Another config is not in the file: warmed up here.
    other = rmt.init_state(loaded, rmt.parse_config(small), 0)
    assert other.meta["opt_steps"] == 2 and not torch.equal(other.tensors[name], marked[key])


def test_a_prepared_petal_posterior_is_used_instead_of_a_recomputed_one(
    tiny_spec: ModelSpec, tmp_path: Path
) -> None:
    from adapters.petal import PETALConfig, posterior_variance

    handle = build_handle(tiny_spec)
    tensors = prepare_source(handle, strategies=("petal",), seeds=(0,))
    names = [n for n, _ in handle.model.named_parameters()]
    assert len(tensors) == len(names) and all(k.startswith("petal.variance.") for k in tensors)
    computed = posterior_variance(handle, PETALConfig(), 0)
    for key, value in tensors.items():
        assert torch.equal(value, computed[key.split(".", 3)[-1]])
    path = tmp_path / "tiny.source.safetensors"
    save_file({k: v / 2 for k, v in tensors.items()}, str(path), metadata={"fingerprint": handle.fingerprint})
    loaded = build_handle(tiny_spec.model_copy(update={"source_artifact": path}))
    from_file = posterior_variance(loaded, PETALConfig(), 0)
    for name in names:
        assert torch.equal(from_file[name], computed[name] / 2), name
