"""tta_client.edge: strict loading of an export into a local model, and the choice of uploads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save
from torch import nn

from tta_client import edge


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)).eval()


def _export(tensors: dict[str, torch.Tensor], **manifest: object) -> bytes:
    info = {"format_version": 1, "model": "m", **manifest}
    return save(tensors, metadata={edge.MANIFEST_KEY: json.dumps(info)})


def test_an_export_is_written_into_the_model_and_its_manifest_returned() -> None:
    net = _net()
    patch = {"1.running_mean": torch.arange(4.0), "1.weight": torch.full((4,), 2.0)}
    manifest = edge.load_export(net, _export(patch, strategy="ema_tbn"))
    assert manifest["strategy"] == "ema_tbn"
    state = net.state_dict()
    assert torch.equal(state["1.running_mean"], torch.arange(4.0))
    assert torch.equal(state["1.weight"], patch["1.weight"])


def test_the_loader_refuses_keys_the_model_lacks_and_changes_nothing() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    patch = {"1.running_mean": torch.ones(4), "block1.bn.weight": torch.ones(4)}
    with pytest.raises(edge.ExportMismatchError, match=r"1 not in the model: block1\.bn\.weight"):
        edge.load_export(net, _export(patch))
    assert torch.equal(net.state_dict()["1.running_mean"], before["1.running_mean"])


def test_the_loader_refuses_tensors_of_another_shape(tmp_path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(_export({"1.running_var": torch.ones(8)}))
    with pytest.raises(
        edge.ExportMismatchError, match=r"of another shape: 1\.running_var \(8,\) \(model: \(4,\)\)"
    ):
        edge.load_export(_net(), path)


@pytest.mark.parametrize(
    "blob",
    [b"not safetensors", save({"x": torch.ones(1)}), _export({}, format_version=99)],
    ids=["garbage", "no-manifest", "future-format"],
)
def test_what_is_no_export_is_refused(blob: bytes) -> None:
    with pytest.raises(edge.ExportMismatchError):
        edge.load_export(_net(), blob)


def test_select_uploads_by_entropy_or_fraction() -> None:
    probs = np.array([[0.98, 0.02], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]])
    entropy = -(probs * np.log(probs)).sum(1)
    assert edge.select_uploads(probs, max_entropy=float(entropy[2])).tolist() == [0, 2]
    assert edge.select_uploads(probs, fraction=0.5).tolist() == [0, 2]
    assert edge.select_uploads(probs, fraction=1.0).tolist() == [0, 1, 2, 3]
    assert edge.select_uploads(probs, fraction=0.0).tolist() == []
    with pytest.raises(ValueError, match="exactly one"):
        edge.select_uploads(probs)
    with pytest.raises(ValueError, match="exactly one"):
        edge.select_uploads(probs, max_entropy=1.0, fraction=0.5)
