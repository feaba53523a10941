"""`GET /v1/models` shows each model's normalisation layers and applicable strategies; a model without
BatchNorm serves the affine strategies and refuses the statistics ones at PUT (422)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adapters.models import ModelSpec, build_handle, build_network
from tests.conftest import MODELS_YAML, app_clients, npy_bytes
from tta_server.model_pool import ModelPool

NPY = {"content-type": "application/x-npy"}


def test_models_list_layer_kinds_and_strategies_and_gn_model_serves_tent(
    tmp_path: Path, tiny_spec: ModelSpec
) -> None:
    gn = ModelSpec(
        id="gn",
        arch="factory",
        factory="tests.adapters._user_models:gn_resnet",
        input_size=(16, 16),
        random_init_seed=0,
    )
    torch.manual_seed(0)
    torch.save(build_network(gn).state_dict(), tmp_path / "gn.pt")
    gn = gn.model_copy(update={"weights": tmp_path / "gn.pt", "random_init_seed": None})
    specs = {"tiny": tiny_spec, "gn": gn}
    pool = ModelPool({k: build_handle(s) for k, s in specs.items()}, specs, "tiny")
    with app_clients(pool, MODELS_YAML) as factory:
        client = factory()
        models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
        assert models["tiny"]["norm_layers"] == {"batchnorm2d": 7}
        assert {"source", "norm", "unmix_tns+tent", "tent", "sar"} <= set(models["tiny"]["strategies"])
        assert models["gn"]["norm_layers"] == {"groupnorm": 12}
        assert models["gn"]["arch"] == "factory"
        assert {"source", "tent", "eta", "sar"} <= set(models["gn"]["strategies"])
        assert not {"norm", "alpha_bn", "unmix_tns", "unmix_tns+tent"} & set(models["gn"]["strategies"])

        r = client.put("/v1/streams/cam", json={"strategy": "unmix_tns+tent", "model": "gn"})
        assert r.status_code == 422 and r.json()["error_type"] == "incompatible_model"
        assert "batchnorm2d" in r.json()["error"] and "groupnorm x 12" in r.json()["error"]
        assert client.put("/v1/streams/cam", json={"strategy": "tent", "model": "gn"}).status_code == 200
        images = np.random.default_rng(0).integers(0, 255, size=(4, 16, 16, 3), dtype=np.uint8)
        for _ in range(2):
            r = client.post("/v1/streams/cam/predict", content=npy_bytes(images), headers=NPY)
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == 4
        stream = client.get("/v1/streams/cam").json()
        assert stream["strategy"] == "tent"
