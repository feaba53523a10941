"""GET /v1/streams/{id}/export against a real server: the patch, loaded into a fresh source network with
the SDK's `tta_client.edge.load_export`, predicts as the server does with adapt=false."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tta_client
from adapters.models import build_classifier
from tta_client import edge
from tta_server.model_pool import ModelPool

WRN, GN = "cifar10_wrn40_2", "cifar10_gn_resnet"
BATCH = 16

# (model, strategy, config): every strategy whose adapt=false prediction is a static function of the image
# on that model. On the BN model only the stored-statistics ones; on the GroupNorm model the gradient ones.
PATCHABLE = [
    (WRN, "source", {}),
    (WRN, "ema_tbn", {"momentum": 0.3}),
    (GN, "tent", {"lr": 1e-3}),
    (GN, "eta", {}),
    (GN, "sar", {}),
    (GN, "roid", {}),
    (GN, "cotta", {"n_augmentations": 2, "teacher_momentum": 0.9}),
]


def _probs(resp: tta_client.PredictResponse, classes: int) -> np.ndarray:
    out = np.zeros((len(resp.predictions), classes))
    for row, pred in zip(out, resp.predictions, strict=True):
        for top in pred.top_k:
            row[top.index] = top.probability
    return out


def _edge_probs(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    with torch.no_grad():
        return net(x).softmax(1).numpy()


@pytest.mark.parametrize(("model", "strategy", "config"), PATCHABLE)
def test_the_export_reproduces_the_servers_adapt_false_predictions(
    live_server: Callable[..., str],
    pool: ModelPool,
    cifar_array: np.ndarray,
    model: str,
    strategy: str,
    config: dict[str, Any],
) -> None:
    url = live_server()
    adapt_on, probe = cifar_array[: 3 * BATCH], cifar_array[150 : 150 + BATCH]
    with tta_client.Client(url) as tta:
        tta.set_policy("edge", strategy, config, model=model)
        for i in range(0, len(adapt_on), BATCH):
            assert tta.predict_array("edge", adapt_on[i : i + BATCH]).adapted
        served = _probs(tta.predict_array("edge", probe, adapt=False, top_k=10), 10)
        blob = tta.export_stream("edge")
        stream = tta.get_stream("edge")
    net = build_classifier(pool.specs[model]).net  # a fresh source network, eval mode
    before = _edge_probs(net, probe)
    manifest = edge.load_export(net, blob)
    np.testing.assert_allclose(_edge_probs(net, probe), served, atol=1e-5, rtol=0)
    assert manifest["model"] == model and manifest["strategy"] == strategy
    assert manifest["fingerprint"] == pool.handles[model].fingerprint
    assert manifest["version"] == stream.version == 3 and manifest["steps"] == 3
    assert manifest["config"] == stream.config
    if strategy != "source":  # the adaptation changed the predictions; the export carries that change
        assert np.abs(before - served).max() > 1e-3


def test_a_fresh_stream_exports_the_source_tensors(make_client: Callable[..., Any], pool: ModelPool) -> None:
    client = make_client()
    client.put("/v1/streams/fresh", json={"strategy": "tent", "model": GN})
    r = client.get("/v1/streams/fresh/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    tensors, manifest = edge.read_export(r.content)
    source = build_classifier(pool.specs[GN]).net.state_dict()
    assert tensors and manifest["version"] == 0 and manifest["steps"] == 0
    for key, value in tensors.items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize(("model", "strategy"), [(WRN, "unmix_tns"), (WRN, "tent"), (WRN, "norm")])
def test_batch_dependent_strategies_answer_409(
    make_client: Callable[..., Any], model: str, strategy: str
) -> None:
    client = make_client()
    assert client.put("/v1/streams/s", json={"strategy": strategy, "model": model}).status_code == 200
    r = client.get("/v1/streams/s/export")
    assert r.status_code == 409
    body = r.json()
    assert body["error_type"] == "not_exportable"
    assert strategy in body["error"] and "depend on the batch" in body["error"]


def test_an_unknown_stream_answers_404(make_client: Callable[..., Any]) -> None:
    r = make_client().get("/v1/streams/nobody/export")
    assert r.status_code == 404 and r.json()["error_type"] == "unknown_stream"


def test_the_sdk_raises_not_exportable(live_server: Callable[..., str]) -> None:
    with tta_client.Client(live_server()) as tta:
        tta.set_policy("u", "unmix_tns", model=WRN)
        with pytest.raises(tta_client.NotExportableError):
            tta.export_stream("u")
        with pytest.raises(tta_client.StreamNotFoundError):
            tta.export_stream("nobody")


def test_the_async_client_downloads_the_same_export(live_server: Callable[..., str]) -> None:
    import asyncio

    url = live_server()
    with tta_client.Client(url) as tta:
        tta.set_policy("a", "source", model=WRN)
        blob = tta.export_stream("a")

    async def download() -> bytes:
        async with tta_client.AsyncClient(url) as client:
            return await client.export_stream("a")

    assert asyncio.run(download()) == blob
