"""Replay: pure aggregation, replay files, the run loop against a MockTransport, and ``tta replay``."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from tta_client import AsyncClient, PredictResponse, UnknownStrategyError
from tta_client import replay as rp
from tta_client._cli import main

from .fakes import FakeServer, error_response, json_body, parse_multipart, predict_json, stream_json

# Pure parts.


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = np.random.default_rng(1).exponential(size=37).tolist()
    assert rp.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edge_cases() -> None:
    assert rp.percentile([], 50) is None
    assert rp.percentile([4.0], 99) == 4.0
    assert rp.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        rp.percentile([1.0], 101)


def test_count_correct_compares_top1_index_with_labels() -> None:
    response = PredictResponse.model_validate(predict_json([1, 2, 3, 4]))
    assert rp.count_correct(response, [1, 0, 3, 9]) == 2
    with pytest.raises(ValueError, match="4 predictions for 3 images"):
        rp.count_correct(response, [1, 2, 3])


def record(stream: str, corruption: str, images: int, correct: int, latency: float, **kw) -> rp.BatchRecord:
    return rp.BatchRecord(
        stream, 0, corruption, images, correct, latency, adapted=True, conflict=False, version=1, **kw
    )


def test_summarize_aggregates_accuracy_throughput_and_latency() -> None:
    records = [
        record("s0", "none", 10, 9, 0.010),
        record("s0", "gaussian_noise", 10, 5, 0.030),
        record("s1", "none", 20, 20, 0.020),
        rp.BatchRecord("s1", 1, "none", 10, 0, 0.040, adapted=False, conflict=True, version=2),
    ]
    errors = [rp.ErrorRecord("s2", 0, "internal", "boom"), rp.ErrorRecord("s1", 2, "rate_limited", "slow")]

    s = rp.summarize(records, errors, wall_seconds=2.0, stopped_by="max_requests")

    assert (s["images"], s["correct"], s["requests"], s["errors"]) == (50, 34, 4, 2)
    assert s["accuracy"] == pytest.approx(34 / 50)
    assert s["throughput_images_per_s"] == pytest.approx(25.0)
    assert (s["adapted"], s["conflicts"]) == (3, 1)
    assert s["errors_by_type"] == {"internal": 1, "rate_limited": 1}
    assert s["latency_ms"]["p50"] == pytest.approx(25.0)
    assert s["latency_ms"]["p90"] == pytest.approx(np.percentile([10, 30, 20, 40], 90))
    assert s["latency_ms"]["p99"] == pytest.approx(np.percentile([10, 30, 20, 40], 99))
    assert s["latency_ms"]["max"] == pytest.approx(40.0)
    assert list(s["per_stream"]) == ["s0", "s1", "s2"]
    assert s["per_stream"]["s0"]["accuracy"] == pytest.approx(0.7)
    assert s["per_stream"]["s1"]["accuracy"] == pytest.approx(20 / 30)
    assert (s["per_stream"]["s1"]["errors"], s["per_stream"]["s2"]["errors"]) == (1, 1)
    assert s["per_stream"]["s2"]["accuracy"] is None
    assert list(s["per_corruption"]) == ["none", "gaussian_noise"]  # order of appearance: the stream's phases
    assert s["per_corruption"]["none"]["accuracy"] == pytest.approx(29 / 40)
    assert s["per_corruption"]["gaussian_noise"]["accuracy"] == pytest.approx(0.5)
    assert s["stopped_by"] == "max_requests"
    report = rp.format_report(s)
    assert "accuracy 0.6800" in report
    assert "throughput 25.0 images/s" in report


def test_summarize_of_nothing_has_no_rates() -> None:
    s = rp.summarize([], [], 0.0)
    assert s["accuracy"] is None and s["throughput_images_per_s"] is None and s["latency_ms"]["p50"] is None
    rp.format_report(s)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"streams": 0},
        {"payload": "png"},
        {"max_requests": 0},
        {"max_seconds": 0},
        {"seed": -1},
    ],
)
def test_replay_config_refuses_bad_values(kwargs) -> None:
    with pytest.raises(ValueError):
        rp.ReplayConfig(**kwargs)


def test_stream_ids() -> None:
    assert rp.ReplayConfig(streams=2, stream_prefix="r").stream_ids == ["r-0", "r-1"]


# The run loop against a fake server.


@dataclass(frozen=True)
class FakeBatch:
    corruption: str
    images: np.ndarray
    labels: np.ndarray


def fake_source(n_batches: int | None, batch_size: int = 8, corruption: str = "gaussian_noise"):
    """Pixel (0, 0, R) holds the class the fake server will predict: wrong for every 4th image."""

    def source(i: int) -> Iterator[FakeBatch]:
        rng = np.random.default_rng(i)
        for _ in range(n_batches) if n_batches is not None else iter(int, 1):
            labels = rng.integers(0, 10, batch_size)
            predicted = labels.copy()
            predicted[::4] = (labels[::4] + 1) % 10
            images = np.zeros((batch_size, 4, 4, 3), np.uint8)
            images[:, 0, 0, 0] = predicted
            images[:, 0, 0, 1] = i
            yield FakeBatch(corruption, images, labels)

    return source


def replay_server(streams: int = 2, file_streams: int | None = None) -> FakeServer:
    """A fake server checking that stream i receives its own data: file stream ``i % file_streams``."""
    server = FakeServer()
    file_streams = file_streams or streams

    def predict(request: httpx.Request) -> httpx.Response:
        stream_id = request.url.path.split("/")[3]
        if request.headers["content-type"] == "application/x-npy":
            images = np.load(io.BytesIO(request.content))
            assert (images[:, 0, 0, 1] == int(stream_id.rsplit("-", 1)[1]) % file_streams).all(), (
                "batch sent on the wrong stream"
            )
            indices = images[:, 0, 0, 0].tolist()
        else:
            indices = [0] * len(parse_multipart(request))
        return httpx.Response(200, json=predict_json(indices, stream_id))

    for i in range(streams):
        sid = f"replay-{i}"
        server.route("PUT", f"/v1/streams/{sid}", json=stream_json(sid))
        server.route("POST", f"/v1/streams/{sid}/reset", json=stream_json(sid))
        server.route("GET", f"/v1/streams/{sid}", json=stream_json(sid))
        server.handle("POST", f"/v1/streams/{sid}/predict", predict)
    return server


def replay(server: FakeServer, cfg: rp.ReplayConfig, source) -> rp.ReplayResult:
    async def go() -> rp.ReplayResult:
        async with AsyncClient("http://tta.test", transport=server.transport) as client:
            return await rp.run_replay(client, cfg, source, progress=False)

    return asyncio.run(go())


def test_replay_sets_policies_resets_and_scores_every_stream() -> None:
    server = replay_server()
    cfg = rp.ReplayConfig(streams=2, strategy="alpha_bn", config={"alpha": 0.2}, seed=7, reset_first=True)

    result = replay(server, cfg, fake_source(3))

    setup = [(r.method, r.url.path) for r in server.requests[:4]]
    assert setup == [
        ("PUT", "/v1/streams/replay-0"),
        ("POST", "/v1/streams/replay-0/reset"),
        ("PUT", "/v1/streams/replay-1"),
        ("POST", "/v1/streams/replay-1/reset"),
    ]
    assert json_body(server.requests[0]) == {
        "model": None,
        "strategy": "alpha_bn",
        "config": {"alpha": 0.2},
        "seed": 7,
    }
    predicts = [r for r in server.requests if r.url.path.endswith("/predict")]
    assert len(predicts) == 6
    assert all(dict(r.url.params) == {"adapt": "true", "top_k": "1"} for r in predicts)
    s = result.summary()
    assert (s["images"], s["requests"], s["errors"]) == (48, 6, 0)
    assert s["accuracy"] == pytest.approx(0.75)
    assert set(s["per_stream"]) == {"replay-0", "replay-1"}
    assert all(g["accuracy"] == pytest.approx(0.75) for g in s["per_stream"].values())
    assert s["per_corruption"]["gaussian_noise"]["images"] == 48
    assert s["latency_ms"]["p99"] is not None and s["throughput_images_per_s"] > 0
    assert [r.batch for r in result.records if r.stream_id == "replay-0"] == [0, 1, 2]
    assert set(result.final_streams) == {"replay-0", "replay-1"}
    assert json.loads(json.dumps(result.to_json()))["summary"]["images"] == 48


@pytest.mark.parametrize(
    "cfg", [rp.ReplayConfig(streams=2), rp.ReplayConfig(streams=2, strategy="tent", keep_policy=True)]
)
def test_replay_without_strategy_or_with_keep_policy_sets_no_policy(cfg: rp.ReplayConfig) -> None:
    server = replay_server()
    replay(server, cfg, fake_source(1))
    assert not [r for r in server.requests if r.method == "PUT"]


def test_replay_stops_at_max_requests() -> None:
    server = replay_server()
    result = replay(server, rp.ReplayConfig(streams=2, max_requests=4, adapt=False), fake_source(3))
    assert len(result.records) == 4
    assert result.stopped_by == "max_requests"
    assert all(r.url.params["adapt"] == "false" for r in server.requests if r.url.path.endswith("/predict"))


def test_replay_stops_at_max_seconds() -> None:
    server = replay_server()
    slow = server.routes[("POST", "/v1/streams/replay-0/predict")]

    def sleepy(request: httpx.Request) -> httpx.Response:
        time.sleep(0.01)
        return slow(request)

    for i in range(2):
        server.handle("POST", f"/v1/streams/replay-{i}/predict", sleepy)
    start = time.monotonic()
    result = replay(server, rp.ReplayConfig(streams=2, max_seconds=0.2), fake_source(None))
    assert result.stopped_by == "max_seconds"
    assert time.monotonic() - start < 5
    assert 0 < len(result.records) < 100


def test_replay_jpeg_payload_sends_one_jpeg_part_per_image() -> None:
    server = replay_server(streams=1)
    result = replay(server, rp.ReplayConfig(streams=1, payload="jpeg"), fake_source(2, batch_size=5))
    predicts = [r for r in server.requests if r.url.path.endswith("/predict")]
    parts = parse_multipart(predicts[0])
    assert [(p[0], p[2]) for p in parts] == [("files", "image/jpeg")] * 5
    assert all(p[3][:3] == b"\xff\xd8\xff" for p in parts)
    assert result.summary()["images"] == 10


def test_replay_waits_out_rate_limits() -> None:
    server = replay_server(streams=1)
    ok = server.routes[("POST", "/v1/streams/replay-0/predict")]
    calls = []

    def limited_once(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return error_response(429, "rate_limited", "slow down", headers={"Retry-After": "0"})
        return ok(request)

    server.handle("POST", "/v1/streams/replay-0/predict", limited_once)
    result = replay(server, rp.ReplayConfig(streams=1), fake_source(2))
    assert (len(result.records), len(result.errors), len(calls)) == (2, 0, 3)


def test_replay_records_errors_and_gives_up_a_failing_stream() -> None:
    server = replay_server()
    for i in range(2):
        server.route(
            "POST",
            f"/v1/streams/replay-{i}/predict",
            status=500,
            json={"error": "bug", "error_type": "internal"},
        )
    result = replay(server, rp.ReplayConfig(streams=2), fake_source(10))
    assert result.records == []
    assert result.summary()["errors_by_type"] == {"internal": 6}  # 3 consecutive failures end a stream


def test_replay_fails_fast_when_the_policy_is_refused() -> None:
    server = replay_server()
    server.route(
        "PUT", "/v1/streams/replay-0", status=422, json={"error": "no", "error_type": "unknown_strategy"}
    )
    with pytest.raises(UnknownStrategyError):
        replay(server, rp.ReplayConfig(streams=2, strategy="nope"), fake_source(1))
    assert not [r for r in server.requests if r.url.path.endswith("/predict")]


@pytest.mark.timeout(20)
def test_replay_surfaces_a_data_error_instead_of_hanging() -> None:
    def broken(i: int) -> Iterator[FakeBatch]:
        yield from fake_source(1)(i)
        raise OSError("archive truncated")

    with pytest.raises(OSError, match="archive truncated"):
        replay(replay_server(), rp.ReplayConfig(streams=2), broken)


# Replay files.


def test_a_stream_file_round_trips_every_stream_and_batch(tmp_path) -> None:
    source = fake_source(3, batch_size=5)
    path = rp.save_stream_file(tmp_path / "s.npz", (source(i) for i in range(2)), {"seed": 4, "n": 15})

    loaded = rp.load_stream_file(path)

    assert loaded.num_streams == 2 and loaded.meta == {"seed": 4, "n": 15}
    for i in range(2):
        want, got = list(source(i)), loaded.batches(i)
        assert len(got) == 3 and loaded.images_per_stream(i) == 15
        for a, b in zip(want, got, strict=True):
            assert b.corruption == a.corruption and b.images.dtype == np.uint8
            assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only: readable without this client
        assert str(raw["format"]) == rp.STREAM_FILE_FORMAT
        assert raw["images"].shape == (30, 4, 4, 3) and raw["batch_offsets"].tolist()[-1] == 30


def test_a_file_of_bare_images_and_labels_is_one_stream_cut_into_batches(tmp_path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, images=np.zeros((10, 4, 4, 3), np.uint8), labels=np.arange(10))

    loaded = rp.load_stream_file(path, batch_size=4)

    assert loaded.num_streams == 1
    assert [len(b.labels) for b in loaded.batches(0)] == [4, 4, 2]
    assert {b.corruption for b in loaded.batches(0)} == {"mine"}


def test_files_that_are_no_stream_file_are_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="replay file not found"):
        rp.load_stream_file(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match=r"is a folder.*tta-bench stream --dataset"):
        rp.load_stream_file(tmp_path)  # a dataset folder: the error says how to make a replay file of it
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        rp.load_stream_file(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "future.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=[0, 1], format="v9")
    with pytest.raises(ValueError, match="format"):
        rp.load_stream_file(tmp_path / "future.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 3), np.float32), labels=[0, 1])
    with pytest.raises(ValueError, match="uint8"):
        rp.load_stream_file(tmp_path / "float.npz")


def test_more_streams_than_the_file_holds_replay_its_streams_in_turn(tmp_path) -> None:
    source = fake_source(2)
    stream_file = rp.load_stream_file(
        rp.save_stream_file(tmp_path / "s.npz", (source(i) for i in range(2)), {"n": 16})
    )

    result = replay(replay_server(streams=3, file_streams=2), rp.ReplayConfig(streams=3), stream_file)

    s = result.summary()
    assert (s["images"], s["errors"]) == (48, 0) and set(s["per_stream"]) == {
        "replay-0",
        "replay-1",
        "replay-2",
    }
    assert result.data == {"n": 16} and result.to_json()["data"] == {"n": 16}


# The command.


def _stream_file(tmp_path, streams: int = 2, batches: int = 2):
    source = fake_source(batches)
    meta = {"corruptions": ["gaussian_noise"], "seed": 0}
    return rp.save_stream_file(tmp_path / "stream.npz", (source(i) for i in range(streams)), meta)


def test_tta_replay_command_writes_json_report(tmp_path, capsys) -> None:
    data = _stream_file(tmp_path)
    out_file = tmp_path / "report.json"
    argv = ["replay", str(data), "--strategy", "alpha_bn", "--config", '{"alpha": 0.5}', "--seed", "3",
            "--reset-first", "--no-progress", "--json", str(out_file)]  # fmt: skip
    server = replay_server()

    assert main(argv, transport=server.transport) == 0

    assert json_body(server.requests[0]) == {
        "model": None,
        "strategy": "alpha_bn",
        "config": {"alpha": 0.5},
        "seed": 3,
    }
    report = json.loads(out_file.read_text())
    assert report["summary"]["images"] == 32
    assert report["config"]["strategy"] == "alpha_bn" and report["config"]["streams"] == 2
    assert report["data"] == {
        "file": str(data),
        "file_streams": 2,
        "corruptions": ["gaussian_noise"],
        "seed": 0,
    }
    assert len(report["batches"]) == 4
    out = capsys.readouterr().out
    assert "accuracy 0.7500" in out and "replay-1" in out


def test_tta_replay_sends_jpeg_payloads_from_a_file(tmp_path) -> None:
    server = replay_server(streams=1)
    data = _stream_file(tmp_path, streams=1)
    argv = ["replay", str(data), "--payload", "jpeg", "--max-requests", "1", "--no-progress"]
    assert main(argv, transport=server.transport) == 0
    (predict,) = [r for r in server.requests if r.url.path.endswith("/predict")]
    assert len(parse_multipart(predict)) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["absent.npz"], "replay file not found"),
        (["STREAM", "--streams", "0"], "streams must be >= 1"),
        (["STREAM", "--max-seconds", "0"], "max_seconds"),
    ],
)
def test_tta_replay_bad_options_exit_2(tmp_path, capsys, args, message) -> None:
    data = str(_stream_file(tmp_path))
    argv = [
        "replay",
        *(data if a == "STREAM" else str(tmp_path / a) if a.endswith(".npz") else a for a in args),
    ]
    assert main(argv, transport=replay_server().transport) == 2
    assert message in capsys.readouterr().err


def test_tta_replay_no_longer_generates_streams_itself(capsys) -> None:
    """Corrupted streams are made by `tta-bench stream`: the client has no data options any more."""
    assert main(["replay", "x.npz", "--corruptions", "fog"], transport=replay_server().transport) == 2
    assert "--corruptions" in capsys.readouterr().err


# Edge mode: option checks (tests/server/test_edge_replay.py runs it against the real server).

EDGE = ["--edge-net", "adapters.models.wide_resnet:WideResNet"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upload-fraction", "0.5"], "--upload-fraction need(s) --edge-net"),
        (
            ["--export-every", "2", "--edge-weights", "w.pt"],
            "--edge-weights, --export-every need(s) --edge-net",
        ),
        ([*EDGE, "--upload-fraction", "0.5", "--upload-max-entropy", "0.9"], "one of --upload-fraction and"),
        ([*EDGE, "--upload-fraction", "1.5"], "upload_fraction must be in [0, 1]"),
        ([*EDGE, "--upload-max-entropy", "-1"], "upload_max_entropy must be >= 0"),
        ([*EDGE, "--export-every", "0"], "export_every must be >= 1"),
        ([*EDGE, "--edge-kwargs", "[40]"], "--edge-kwargs must be a JSON object"),
        ([*EDGE, "--edge-kwargs", "{depth: 40}"], "--edge-kwargs is not valid JSON"),
        ([*EDGE, "--edge-mean", "0.5,0.5,0.5"], "give both mean and std"),
        ([*EDGE, "--edge-mean", "a,b", "--edge-std", "1,1"], "--edge-mean takes comma-separated numbers"),
        ([*EDGE, "--no-adapt"], "does not go with adapt=False"),
        (["--edge-net", "no_colon"], "package.module:callable"),
        (
            [*EDGE, "--edge-kwargs", '{"depth": 10, "widen_factor": 1}', "--edge-weights", "absent.pt"],
            "edge weights not found: absent.pt",
        ),
        (["--edge-net", "no_such_module_here:f"], "cannot import 'no_such_module_here'"),
        (["--edge-net", "json:no_such"], "json has no 'no_such'"),
        (["--edge-net", "json:dumps"], "cannot build the edge network json:dumps: TypeError"),
        (["--edge-net", "json:JSONDecoder"], "built a JSONDecoder, not a torch nn.Module"),
    ],
)
def test_tta_replay_refuses_bad_edge_options(tmp_path, capsys, args, message) -> None:
    server = replay_server(streams=2)
    argv = ["replay", str(_stream_file(tmp_path)), "--no-progress", *args]
    assert main(argv, transport=server.transport) == 2
    assert message in capsys.readouterr().err
    assert not any(r.url.path.endswith(("/predict", "/export")) for r in server.requests)


def test_edge_config_selects_all_a_fraction_or_by_entropy() -> None:
    probs = np.array([[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]])
    assert rp.EdgeConfig("m:f").select(probs).tolist() == [0, 1, 2, 3]
    assert rp.EdgeConfig("m:f", upload_fraction=0.5).select(probs).tolist() == [0, 3]
    assert rp.EdgeConfig("m:f", upload_fraction=0.0).select(probs).tolist() == []
    assert rp.EdgeConfig("m:f", upload_max_entropy=0.4 * np.log(3)).select(probs).tolist() == [0, 3]
    with pytest.raises(ValueError, match="at most one"):
        rp.EdgeConfig("m:f", upload_fraction=0.5, upload_max_entropy=1.0)
    with pytest.raises(ValueError, match="threads"):
        rp.EdgeConfig("m:f", threads=0)


def test_the_edge_summary_totals_uploads_and_exports() -> None:
    records = [
        record(
            "s0", "gn", 10, 7, 0.1, uploaded=5, upload_bytes=500, full_bytes=1000, exports=1, export_bytes=64
        ),
        record("s0", "gn", 10, 8, 0.1, uploaded=0, upload_bytes=0, full_bytes=1000),
        record(
            "s1",
            "gn",
            10,
            9,
            0.1,
            uploaded=10,
            upload_bytes=1000,
            full_bytes=1000,
            exports=1,
            export_bytes=64,
        ),
    ]
    e = rp.summarize(records)["edge"]
    assert (e["images"], e["uploaded"], e["upload_requests"], e["exports"]) == (30, 15, 2, 2)
    assert e["uploaded_share"] == pytest.approx(0.5)
    assert e["upload_bytes_share"] == pytest.approx(0.5)
    assert e["export_bytes"] == 128
    assert e["per_stream"]["s0"]["uploaded"] == 5 and e["per_stream"]["s1"]["upload_bytes_share"] == 1.0
    assert rp.summarize([record("s0", "gn", 1, 1, 0.1)])["edge"] is None
    assert "edge: uploaded 15 of 30 images (50.0 %) in 2 requests" in rp.format_report(rp.summarize(records))
