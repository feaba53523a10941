"""`tta-bench throughput` (a tiny run: real WRN-40-2, uvicorn subprocess, the bench's own redis-server) and
`tta-bench ops`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from adapters.models import ModelSpec
from tests.conftest import require_redis_server
from tta_bench import cli, throughput


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_tiny_throughput_run_writes_the_documented_json(tmp_path: Path) -> None:
    require_redis_server()
    out = tmp_path / "throughput.json"
    argv = ["throughput", "--model", "wrn", "--iters", "2", "--warmup", "1", "--batch-size", "8"]
    argv += ["--strategies", "source,norm", "--streams", "2"]  # no --redis-url: it starts its own
    # One thread: on a shared CI box two spinning OpenMP threads can slow small batches many times over.
    argv += ["--threads", "1", "--phase-seconds", "30", "--json", str(out)]
    argv += ["--merge-clients", "3", "--merge-batch", "4"]
    t0 = time.monotonic()
    assert cli.main(argv) == 0
    elapsed = time.monotonic() - t0

    report = json.loads(out.read_text())
    assert _positive(report["bare_forward_ips"])
    assert _positive(report["bare_train_ips"])
    assert _positive(report["bare_train_affine_ips"])
    assert isinstance(report["device"], str) and report["device"].startswith("cpu")
    assert set(report["strategies"]) == {"source", "norm"}
    for row in report["strategies"].values():
        assert _positive(row["ips"])
        assert _positive(row["ratio"])
        assert row["host_syncs_per_call"] == 1  # the result
    # Per-layer statistics add kernels to the bare forward's; one more host read, for the result.
    bare_kernels = report["bare"]["bare_forward"]["kernels_per_call"]
    assert bare_kernels > 0 and report["bare"]["bare_forward"]["host_syncs_per_call"] == 0
    assert report["strategies"]["norm"]["kernels_per_call"] > bare_kernels
    assert set(report["http"]) == {"raw", "jpeg"}
    for row in report["http"].values():
        for key in ("ips", "ratio", "p50_ms", "p99_ms"):
            assert _positive(row[key]), (key, row)
        assert row["p99_ms"] >= row["p50_ms"]
    assert report["redis"] == "own redis-server" and report["redis_error"] is None
    assert report["http_store"] == "redis"
    assert set(report["state"]) == {"source", "norm"}
    for row in report["state"].values():
        assert isinstance(row["bytes"], int) and row["bytes"] > 0
        assert _positive(row["roundtrip_ms_p50"])
    merging = report["merging"]
    assert merging["unmerged"]["max_step_images"] == 1 and merging["merged"]["max_step_images"] == 256
    # TTA_MAX_STEP_IMAGES=1 reached the server: every step served exactly one request.
    assert merging["unmerged"]["mean_requests_per_step"] == 1.0
    assert merging["merged"]["mean_requests_per_step"] >= 1.0
    assert _positive(merging["merged"]["ips"]) and _positive(merging["speedup"])
    # The bare network and the `source` strategy are the same model: identical predictions.
    assert report["bare"]["bare_vs_source_max_abs_diff"] < 1e-4
    assert elapsed < 90, f"tiny run took {elapsed:.0f} s"


def test_unreachable_redis_skips_state_round_trips() -> None:
    assert throughput.redis_reachable("redis://127.0.0.1:1/0") is not None


def test_multipart_body_is_parsed_as_files() -> None:
    import numpy as np

    batch = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    body, ctype = throughput.jpeg_multipart(batch)
    boundary = ctype.split("boundary=", 1)[1]
    assert body.count(b'name="files"') == 3
    assert body.endswith(f"--{boundary}--\r\n".encode())


def test_model_names_resolve_to_specs() -> None:
    def spec(name: str) -> ModelSpec:
        return throughput.resolve_spec(throughput.parse_args(["--model", name]))

    mobilenet = spec("torchvision:mobilenet_v3_large")
    assert (mobilenet.arch, mobilenet.id, mobilenet.input_size) == (
        "torchvision:mobilenet_v3_large",
        "mobilenet_v3_large",
        (224, 224),
    )
    assert spec("wrn").id == "cifar10_wrn40_2"
    assert spec("cifar10_wrn40_2").arch == "wide_resnet"
    with pytest.raises(SystemExit, match="not in"):
        spec("no_such_model")
    with pytest.raises(ValueError, match="no_such_net"):
        spec("torchvision:no_such_net")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--iters", "0"])


def test_ops_command_counts_kernels_and_syncs_per_call(tmp_path: Path) -> None:
    out = tmp_path / "ops.json"
    argv = ["ops", "--batch-size", "4", "--strategies", "source,sar", "--device", "cpu", "--json", str(out)]
    assert cli.main(argv) == 0
    ops = json.loads(out.read_text())["ops"]
    assert set(ops) == {"bare forward", "bare fwd+bwd", "bare fwd+bwd affine", "source", "sar"}
    # Gradients for the normalisation affine parameters only skip every convolution's weight gradient.
    assert ops["bare fwd+bwd affine"]["kernels"] < ops["bare fwd+bwd"]["kernels"]
    assert ops["bare forward"]["host_syncs"] == 0
    assert ops["source"]["host_syncs"] == 1  # the result
    assert ops["sar"]["host_syncs"] == 3  # the result and one per filter
    # Recording BN statistics for drift adds kernels to the forward; a backward adds more.
    assert ops["bare forward"]["kernels"] < ops["source"]["kernels"] < ops["bare fwd+bwd"]["kernels"]


@pytest.mark.timeout(120)
def test_in_process_figures_survive_a_served_phase_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON is written once the in-process phase ends: a run killed in a served phase keeps it."""

    def killed(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "measure_served", killed)
    out = tmp_path / "throughput.json"
    argv = ["throughput", "--model", "wrn", "--iters", "1", "--warmup", "0", "--batch-size", "4"]
    argv += ["--strategies", "source", "--threads", "1", "--skip-http", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"source"} and _positive(report["strategies"]["source"]["ips"])
