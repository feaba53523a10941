"""`scripts/train_source_model.py` on a tiny synthetic archive: a few steps, then the model serves."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
from adapters.models import ModelSpec, build_handle

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_source_model.py"


def _archive(path: Path, n: int = 24) -> None:
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    classes = np.array([f"c{i}" for i in range(10)])
    labels = (np.arange(n) % 10).astype(np.uint8)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=labels, classes=classes)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_few_training_steps_give_a_servable_gn_model(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_ = importlib.util.spec_from_file_location("train_source_model", SCRIPT)
    assert spec_ is not None and spec_.loader is not None
    script = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(script)
    _archive(tmp_path / "train.npz")
    out = tmp_path / f"gn{suffix}"
    args = ["--data", str(tmp_path / "train.npz"), "--out", str(out), "--limit", "16", "--steps", "3"]
    args += ["--batch-size", "8", "--width", "8", "--groups", "4", "--blocks", "1", "--device", "cpu"]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed
    entry = json.loads(printed.split("models.yaml entry:", 1)[1])
    handle = build_handle(ModelSpec.model_validate({**entry, "id": "gn"}))
    assert set(handle.layer_counts) == {"groupnorm"} and handle.top_modules == ("layer4",)
    tent = adapters.get_strategy("tent")
    cfg = tent.config_cls()
    result = tent.step(handle, torch.rand(4, 3, 32, 32), tent.init_state(handle, cfg), cfg)
    assert result.logits.shape == (4, 10) and torch.isfinite(result.logits).all()
