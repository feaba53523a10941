"""Loads the declared models once at start-up and hands out their `ModelHandle`s."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from adapters import ModelHandle
from adapters.models import ModelSpec, build_handle
from tta_server.errors import UnknownModelError

log = logging.getLogger(__name__)


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]
    default_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelsFile:
        ids = [m.id for m in self.models]
        if not ids:
            raise ValueError("declare at least one model")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate model ids in {ids}")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not one of {ids}")
        return self


def read_models_file(path: Path) -> ModelsFile:
    """Parse the models YAML; relative paths are relative to the file's folder."""
    if not path.is_file():
        raise FileNotFoundError(f"models config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    for entry in raw.get("models", []):
        for key in ("weights", "source_data", "source_artifact"):
            if entry.get(key) and not Path(entry[key]).is_absolute():
                entry[key] = str((path.parent / entry[key]).resolve())
    try:
        return ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"invalid models config {path}:\n{exc}") from exc


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TTA_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


class ModelPool:
    def __init__(self, handles: dict[str, ModelHandle], specs: dict[str, ModelSpec], default: str) -> None:
        self.handles = handles
        self.specs = specs
        self.default_model = default

    @classmethod
    def load(cls, path: Path, device: torch.device) -> ModelPool:
        cfg = read_models_file(path)
        handles, specs = {}, {}
        for spec in cfg.models:
            log.info("loading model %s (%s) on %s", spec.id, spec.arch, device)
            handles[spec.id] = build_handle(spec, device)
            specs[spec.id] = spec
        return cls(handles, specs, cfg.default_model or cfg.models[0].id)

    def get(self, model_id: str | None) -> ModelHandle:
        model_id = model_id or self.default_model
        try:
            return self.handles[model_id]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {model_id!r}; served models: {', '.join(self.handles)}"
            ) from None
