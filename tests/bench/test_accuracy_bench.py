"""`tta-bench accuracy` end to end on a tiny stream of the shipped CIFAR-10 model, and its usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tta_bench import accuracy
from tta_bench.paths import MODELS_CONFIG
from tta_server.model_pool import read_models_file


@pytest.mark.slow
def test_json_shape_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc.json"
    argv = [
        "--strategies", "source,norm",
        "--corruptions", "none,gaussian_noise",
        "--n", "32",
        "--batch-size", "16",
        "--json", str(out),
        "--threads", "1",  # two spinning OpenMP threads crawl on a shared, oversubscribed CPU
        "--no-progress",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    assert accuracy.main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads does not leak into the calling process

    payload = json.loads(out.read_text())
    assert set(payload) == {"results", "config", "trace"}
    results = payload["results"]
    assert list(results) == ["source", "norm"]
    for errors in results.values():
        assert list(errors) == ["none", "gaussian_noise", "mean"]
        assert all(0.0 <= v <= 100.0 for v in errors.values())
        assert errors["mean"] == pytest.approx((errors["none"] + errors["gaussian_noise"]) / 2)
        # 32 images per corruption: every error is a multiple of 100/32.
        for c in ("none", "gaussian_noise"):
            assert errors[c] * 32 / 100 == pytest.approx(round(errors[c] * 32 / 100))
    assert results["norm"] != results["source"]

    config = payload["config"]
    assert config["strategies"] == ["source", "norm"]
    assert config["corruptions"] == ["none", "gaussian_noise"]
    assert (config["n"], config["batch_size"], config["severity"], config["seed"]) == (32, 16, 5, 0)
    assert (config["order"], config["reset"], config["device"]) == ("iid", "per-corruption", "cpu")
    assert config["threads"] == 1
    assert config["model"] == "cifar10_wrn40_2"

    stdout = capsys.readouterr().out
    assert "| strategy | none | gaussian_noise | mean | time (s) |" in stdout
    assert "| norm |" in stdout


@pytest.mark.slow
def test_strategy_needing_larger_batches_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acc.json"
    argv = [
        "--strategies",
        "source,tent",
        "--corruptions",
        "none",
        "--n",
        "4",
        "--batch-size",
        "1",
        "--threads",
        "1",
    ]
    assert accuracy.main([*argv, "--json", str(out), "--no-progress"]) == 0
    assert "note: skipping tent" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["source"]


@pytest.mark.slow
def test_failing_strategy_is_reported_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """eata on a model declared without source data cannot build its Fisher penalty."""
    spec = read_models_file(MODELS_CONFIG).models[0]
    models = tmp_path / "models.yaml"
    models.write_text(
        f"models:\n  - id: no_source\n    arch: {spec.arch}\n    depth: {spec.depth}\n"
        f"    widen_factor: {spec.widen_factor}\n    weights: {spec.weights}\n"
    )
    out = tmp_path / "acc.json"
    argv = ["--models-config", str(models), "--strategies", "eata,source", "--corruptions", "none"]
    argv += ["--n", "8", "--batch-size", "8", "--threads", "1", "--no-progress", "--json", str(out)]
    assert accuracy.main(argv) == 1
    assert "error: eata failed: model 'no_source' declares no source data" in capsys.readouterr().err
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == ["source"]
    assert payload["config"]["model"] == "no_source"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "source,nope"], "unknown strategy 'nope'; valid strategies: source, norm"),
        (["--corruptions", "fog,rain"], "unknown corruption 'rain'"),
        (["--strategies", "tent", "--config", "tent={lr: 1}"], "--config tent: invalid JSON"),
        (["--strategies", "tent", "--config", 'tent={"lr": -1}'], "--config tent:"),
        (["--strategies", "tent", "--config", 'tent={"nope": 1}'], "--config tent:"),
        (["--strategies", "source", "--config", 'tent={"lr": 1e-4}'], "not among --strategies"),
        (["--severity", "6"], "--severity must be one of"),
        (["--passes", "2"], "--passes needs --setting continual"),
        (["--setting", "mixed", "--reset", "never"], "--reset applies to --setting standard only"),
        (["--model", "nope", "--strategies", "source"], "unknown model 'nope'"),
    ],
)
def test_usage_errors_exit_non_zero(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert accuracy.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tta-bench accuracy: error:" in err
    assert message in err


def test_bad_option_returns_argparse_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert accuracy.main(["--order", "random"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert accuracy.main(["--help"]) == 0


def test_format_table() -> None:
    table = accuracy.format_table(
        {"source": {"fog": 12.3456, "mean": 12.3456}, "norm": {"fog": 10.0, "mean": 10.0}},
        ["fog"],
        {"source": 3.2, "norm": 4.0},
    )
    assert table.splitlines() == [
        "| strategy | fog | mean | time (s) |",
        "|---|---:|---:|---:|",
        "| source | 12.3 | 12.35 | 3 |",
        "| norm | 10.0 | 10.00 | 4 |",
    ]


@pytest.mark.slow
def test_continual_with_two_passes_and_mixed_settings(tmp_path: Path) -> None:
    """Continual: one state over both corruptions twice, rows per pass, a trace per batch and a PNG; mixed: one
    shuffled stream whose errors still count per corruption."""
    common = ["--corruptions", "none,gaussian_noise", "--n", "16", "--batch-size", "8", "--threads", "1"]
    out = tmp_path / "continual.json"
    argv = [
        *common,
        "--strategies",
        "norm,tent",
        "--setting",
        "continual",
        "--passes",
        "2",
        "--json",
        str(out),
    ]
    assert accuracy.main([*argv, "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    results, trace = payload["results"], payload["trace"]
    assert list(results) == ["norm", "norm (pass 2)", "tent", "tent (pass 2)"]
    assert results["norm"] == results["norm (pass 2)"]  # stateless: the same stream gives the same errors
    assert [len(t) for t in trace["batches"].values()] == [8, 8]  # 2 passes x 2 corruptions x 2 batches
    assert [(b["batch"], b["corruption"], b["pass"]) for b in trace["boundaries"]] == [
        (0, "none", 1),
        (2, "gaussian_noise", 1),
        (4, "none", 2),
        (6, "gaussian_noise", 2),
    ]
    assert payload["config"]["setting"] == "continual" and payload["config"]["passes"] == 2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mixed = tmp_path / "mixed.json"
    argv = [*common, "--strategies", "norm", "--setting", "mixed", "--json", str(mixed), "--no-plot"]
    assert accuracy.main([*argv, "--no-progress"]) == 0
    payload = json.loads(mixed.read_text())
    assert len(payload["trace"]["batches"]["norm"]) == 4 and len(payload["trace"]["boundaries"]) == 1
    for c in ("none", "gaussian_noise"):
        assert payload["results"]["norm"][c] * 16 / 100 == pytest.approx(
            round(payload["results"]["norm"][c] * 16 / 100)
        )
    assert not mixed.with_suffix(".png").exists()


@pytest.mark.slow
def test_a_multi_pass_run_cut_short_keeps_its_finished_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON is written at the end of every pass: a run stopped in pass 2 still has pass 1 on disk."""
    import adapters

    strategy = adapters.get_strategy("norm")
    real_step = strategy.step
    calls = 0

    def stopping_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 5:  # pass 1 is 4 batches (2 corruptions x 2 batches of 8)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(strategy, "step", stopping_step)
    out = tmp_path / "cut.json"
    argv = ["--corruptions", "none,gaussian_noise", "--n", "16", "--batch-size", "8", "--threads", "1"]
    argv += ["--strategies", "norm", "--setting", "continual", "--passes", "2", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        accuracy.main([*argv, "--no-progress", "--no-plot"])
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == ["norm"]
    assert set(payload["results"]["norm"]) == {"none", "gaussian_noise", "mean"}
    assert len(payload["trace"]["batches"]["norm"]) == 4


def test_the_plot_counts_images_not_batches() -> None:
    from tta_bench.accuracy import images_seen

    # 3 corruptions x 1000 images in batches of 64: 15 full batches and one of 40 each.
    bounds = [{"batch": 16 * i, "image": 1000 * i} for i in range(3)]
    x = images_seen(48, bounds, 64)
    assert x[15] == 1000 and x[16] == 1064 and x[31] == 2000 and x[-1] == 3000
    assert x == sorted(x) and len(set(x)) == 48
