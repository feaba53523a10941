"""`tta replay` in edge mode against a real server: the local network is patched by the stream's export,
only the selected images are uploaded, and the report's counts are what went over the wire."""

from __future__ import annotations

import asyncio
import io
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

import tta_client
from tta_client import edge
from tta_client.replay import Batch, EdgeConfig, ReplayConfig, ReplayResult, run_replay
from tta_server.model_pool import ModelPool

WRN = "cifar10_wrn40_2"
FACTORY = "adapters.models.wide_resnet:WideResNet"


class CountingTransport(httpx.AsyncBaseTransport):
    """The real network, noting each request's path, body bytes and the response's body bytes."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, bytes, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        self.seen.append((request.method, request.url.path, body, len(content)))
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    def predicts(self) -> list[bytes]:
        return [body for method, path, body, _ in self.seen if method == "POST" and path.endswith("/predict")]

    def export_bytes(self) -> list[int]:
        return [size for _, path, _, size in self.seen if path.endswith("/export")]

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def noisy(
    cifar_array: np.ndarray, cifar_jpegs: tuple[list[bytes], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The 200 test images under additive gaussian noise, so adapting the statistics moves predictions."""
    rng = np.random.default_rng(0)
    images = np.clip(cifar_array.astype(np.float64) + rng.normal(0, 40, cifar_array.shape), 0, 255)
    return images.astype(np.uint8), cifar_jpegs[1]


def edge_config(pool: ModelPool, **kw: Any) -> EdgeConfig:
    spec = pool.specs[WRN]
    kwargs = {"depth": spec.depth, "widen_factor": spec.widen_factor, "num_classes": spec.num_classes}
    return EdgeConfig(net=FACTORY, kwargs=kwargs, weights=str(spec.weights), threads=1, **kw)


def source_of(images: np.ndarray, labels: np.ndarray, batch: int) -> Callable[[int], Iterator[Batch]]:
    def source(_: int) -> Iterator[Batch]:
        for lo in range(0, len(labels), batch):
            yield Batch("gaussian_noise", images[lo : lo + batch], labels[lo : lo + batch])

    return source


def replay(
    url: str, cfg: ReplayConfig, source: Callable[[int], Iterator[Batch]]
) -> tuple[ReplayResult, CountingTransport]:
    transport = CountingTransport()

    async def go() -> ReplayResult:
        async with tta_client.AsyncClient(url, timeout=120, transport=transport, retry=0) as client:
            return await run_replay(client, cfg, source, progress=False)

    return asyncio.run(go()), transport


def samples_metric(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(m) for m in re.findall(r'^tta_samples_total\{[^}]*strategy="ema_tbn"[^}]*\} (\S+)$', text, re.M)
    )


def test_fraction_half_uploads_half_of_each_batch_and_counts_the_bytes_sent(
    live_server: Callable[..., str], pool: ModelPool, noisy: tuple[np.ndarray, np.ndarray]
) -> None:
    url = live_server(torch_threads=1)
    images, labels = noisy[0][:60], noisy[1][:60]
    batch = 15
    cfg = ReplayConfig(
        streams=1,
        strategy="ema_tbn",
        config={"momentum": 0.3},
        model=WRN,
        reset_first=True,
        edge=edge_config(pool, upload_fraction=0.5, export_every=2),
    )
    result, transport = replay(url, cfg, source_of(images, labels, batch))

    assert not result.errors and len(result.records) == 4
    per_batch = math.ceil(0.5 * batch)  # 8 of 15
    bodies = transport.predicts()
    assert len(bodies) == 4
    for i, (record, body) in enumerate(zip(result.records, bodies, strict=True)):
        sent = np.load(io.BytesIO(body), allow_pickle=False)
        mine = images[i * batch : (i + 1) * batch]
        assert record.uploaded == len(sent) == per_batch
        # The uploaded images are rows of this batch, in order, each once.
        rows = [int(np.flatnonzero((mine == img).all(axis=(1, 2, 3)))[0]) for img in sent]
        assert rows == sorted(set(rows))
        assert record.upload_bytes == len(body)
        assert record.full_bytes == len(tta_client._client.encode_npy(mine))
        assert record.exports == (1 if i % 2 == 0 else 0)
    summary = result.summary()
    assert summary["images"] == 60 and summary["accuracy"] == sum(r.correct for r in result.records) / 60
    e = summary["edge"]
    assert (e["images"], e["uploaded"], e["upload_requests"]) == (60, 4 * per_batch, 4)
    assert e["upload_bytes"] == sum(len(b) for b in bodies)
    assert e["full_bytes"] > e["upload_bytes"] > 0
    assert e["exports"] == 2 and e["export_bytes"] == sum(transport.export_bytes()) > 0
    assert e["per_stream"]["replay-0"]["uploaded"] == 4 * per_batch
    # What the server adapted on is exactly what was uploaded.
    stream = result.final_streams["replay-0"]
    assert stream.samples_seen == 4 * per_batch and stream.steps == 4
    assert samples_metric(url) == 4 * per_batch
    assert "edge: uploaded 32 of 60 images" in tta_client.replay.format_report(summary)


def test_local_predictions_equal_the_servers_adapt_false_ones_after_a_refresh(
    live_server: Callable[..., str], pool: ModelPool, noisy: tuple[np.ndarray, np.ndarray]
) -> None:
    url = live_server(torch_threads=1)
    images, labels = noisy
    adapt_on, probe, probe_labels = images[:48], images[160:192], labels[160:192]
    first = ReplayConfig(
        streams=1,
        strategy="ema_tbn",
        config={"momentum": 0.3},
        model=WRN,
        reset_first=True,
        edge=edge_config(pool, upload_max_entropy=0.4 * math.log(10)),
    )
    result, _ = replay(url, first, source_of(adapt_on, labels[:48], 16))
    assert not result.errors and result.final_streams["replay-0"].steps >= 1
    uploaded = sum(r.uploaded or 0 for r in result.records)
    assert result.final_streams["replay-0"].samples_seen == uploaded

    # Keep the adapted stream; download its export, predict the probe locally, upload nothing.
    probe_cfg = ReplayConfig(streams=1, edge=edge_config(pool, upload_fraction=0.0))
    probed, transport = replay(url, probe_cfg, source_of(probe, probe_labels, 32))
    (local,) = probed.local_predictions["replay-0"]
    assert transport.predicts() == [] and probed.records[0].uploaded == 0
    assert probed.final_streams["replay-0"].samples_seen == uploaded  # nothing was adapted on
    with tta_client.Client(url) as tta:
        served = tta.predict_array("replay-0", probe, adapt=False, top_k=1)
    assert local == [p.top_k[0].index for p in served.predictions]
    source_net = edge.build_net(*((c := edge_config(pool)).net, c.kwargs, c.weights))
    source = edge.predict_probs(source_net, probe).argmax(1).tolist()
    assert source != local  # the export changed the local network
    assert probed.records[0].correct == sum(int(a == b) for a, b in zip(local, probe_labels, strict=True))


def test_a_strategy_without_export_stops_the_edge_replay(
    live_server: Callable[..., str], pool: ModelPool, noisy: tuple[np.ndarray, np.ndarray]
) -> None:
    url = live_server(torch_threads=1)
    cfg = ReplayConfig(streams=1, strategy="norm", model=WRN, edge=edge_config(pool))
    with pytest.raises(tta_client.NotExportableError):
        replay(url, cfg, source_of(noisy[0][:8], noisy[1][:8], 8))


def test_tta_replay_edge_mode_from_the_command_line(
    live_server: Callable[..., str], pool: ModelPool, noisy: tuple[np.ndarray, np.ndarray], tmp_path: Any
) -> None:
    import json

    from tta_client._cli import main
    from tta_client.replay import save_stream_file

    url = live_server(torch_threads=1)
    stream = save_stream_file(tmp_path / "s.npz", [source_of(noisy[0][:16], noisy[1][:16], 8)(0)])
    spec = pool.specs[WRN]
    out = tmp_path / "report.json"
    argv = ["--url", url, "replay", str(stream), "--strategy", "ema_tbn", "--model", WRN, "--reset-first",
            "--edge-net", FACTORY, "--edge-kwargs", json.dumps({"depth": spec.depth, "widen_factor": 2}),
            "--edge-weights", str(spec.weights), "--edge-threads", "1", "--upload-fraction", "0.25",
            "--export-every", "2", "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    e = report["summary"]["edge"]
    assert (e["images"], e["uploaded"], e["upload_requests"], e["exports"]) == (16, 4, 2, 1)
    assert (
        report["config"]["edge"]["upload_fraction"] == 0.25 and report["config"]["edge"]["export_every"] == 2
    )
    assert [b["uploaded"] for b in report["batches"]] == [2, 2]
    assert report["streams"]["replay-0"]["samples_seen"] == 4


def test_jpeg_uploads_send_the_selected_images_as_multipart_and_count_their_bytes(
    live_server: Callable[..., str], pool: ModelPool, noisy: tuple[np.ndarray, np.ndarray]
) -> None:
    url = live_server(torch_threads=1)
    cfg = ReplayConfig(
        streams=1,
        strategy="ema_tbn",
        model=WRN,
        reset_first=True,
        payload="jpeg",
        edge=edge_config(pool, upload_fraction=0.25),
    )
    result, transport = replay(url, cfg, source_of(noisy[0][:32], noisy[1][:32], 16))
    assert not result.errors and [r.uploaded for r in result.records] == [4, 4]
    bodies = transport.predicts()
    assert [r.upload_bytes for r in result.records] == [len(b) for b in bodies]
    assert [b.count(b"\xff\xd8\xff") for b in bodies] == [4, 4]  # one JPEG part per uploaded image
    assert all(r.full_bytes is not None and r.full_bytes > 3 * (r.upload_bytes or 0) for r in result.records)
    assert result.final_streams["replay-0"].samples_seen == 8
