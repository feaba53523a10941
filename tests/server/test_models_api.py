"""`GET /v1/models` shows each model's normalisation layers and applicable strategies; a model without
BatchNorm serves the affine strategies and refuses the statistics ones at PUT (422)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
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


def test_a_models_strategy_defaults_reach_its_streams_under_their_own_config(tiny_spec: ModelSpec) -> None:
    defaults = {"tent": {"lr": 2.5e-4}, "unmix_tns+tent": {"tent": {"lr": 1e-4, "optimizer": "sgd"}}}
    spec = ModelSpec.model_validate({**tiny_spec.model_dump(), "strategy_defaults": defaults})
    pool = ModelPool({"tiny": build_handle(spec)}, {"tiny": spec}, "tiny")
    with app_clients(pool, MODELS_YAML) as factory:
        client = factory()
        listed = client.get("/v1/models").json()["models"][0]
        assert listed["strategy_defaults"] == defaults

        def config(stream: str, body: dict[str, object]) -> dict[str, Any]:
            r = client.put(f"/v1/streams/{stream}", json=body)
            assert r.status_code == 200, r.text
            return client.get(f"/v1/streams/{stream}").json()["config"]

        assert config("a", {"strategy": "tent"})["lr"] == 2.5e-4
        assert config("b", {"strategy": "tent", "config": {"lr": 1e-3}})["lr"] == 1e-3
        assert config("c", {"strategy": "eta"})["lr"] == 1e-3  # no defaults declared for eta
        # A composite's part configs merge field by field: the stream's momentum, the model's lr and optimiser.
        tent_part = config("d", {"strategy": "unmix_tns+tent", "config": {"tent": {"momentum": 0.5}}})["tent"]
        assert (tent_part["lr"], tent_part["optimizer"], tent_part["momentum"]) == (1e-4, "sgd", 0.5)


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"tentt": {"lr": 1e-3}}, r"strategy_defaults: unknown strategy 'tentt'"),
        ({"tent": {"lr": -1.0}}, r"strategy_defaults\.tent: lr: Input should be greater than 0"),
        ({"tent": {"learning_rate": 1e-3}}, r"strategy_defaults\.tent: learning_rate: Extra inputs"),
    ],
)
def test_bad_strategy_defaults_are_refused_when_the_models_file_is_read(
    tiny_spec: ModelSpec, defaults: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.model_validate({**tiny_spec.model_dump(), "strategy_defaults": defaults})
