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
