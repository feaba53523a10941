"""`tta-bench merge`: separate accuracy runs of one stream become one table, JSON and plot; runs of
different streams, or one strategy in two runs, are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tta_bench import cli
from tta_bench.merge_runs import MergeError, merge

CORR = ["gaussian_noise", "fog"]


def _run(strategies: list[str], passes: int = 1, **cfg: Any) -> dict[str, Any]:
    results: dict[str, dict[str, float]] = {}
    batches: dict[str, list[float]] = {}
    for k, s in enumerate(strategies):
        for p in range(1, passes + 1):
            key = s if p == 1 else f"{s} (pass {p})"
            results[key] = {"gaussian_noise": 10.0 + k + p, "fog": 20.0 + k, "mean": 15.0 + k + p / 2}
        batches[s] = [float(k)] * (4 * passes)
    boundaries = [
        {"batch": 2 * i, "image": 128 * i, "corruption": CORR[i % 2], "pass": 1 + i // 2}
        for i in range(2 * passes)
    ]
    config = {
        "model": "m",
        "corruptions": CORR,
        "severity": 5,
        "n": 128,
        "batch_size": 64,
        "order": "iid",
        "delta": 0.1,
        "seed": 0,
        "setting": "continual",
        "strategies": strategies,
        "passes": passes,
        **cfg,
    }
    return {"results": results, "config": config, "trace": {"batches": batches, "boundaries": boundaries}}


def test_runs_of_one_stream_merge_into_one_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run(["norm", "tent"], passes=2)))
    b.write_text(json.dumps(_run(["cotta"], passes=1)))
    out = tmp_path / "merged.json"
    assert cli.main(["merge", str(a), str(b), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    # First passes first, then the second passes.
    assert list(merged["results"]) == ["norm", "tent", "cotta", "norm (pass 2)", "tent (pass 2)"]
    assert merged["results"]["cotta"] == _run(["cotta"])["results"]["cotta"]
    assert merged["config"]["strategies"] == ["norm", "tent", "cotta"] and merged["config"]["passes"] == 2
    assert len(merged["trace"]["boundaries"]) == 4 and set(merged["trace"]["batches"]) == {
        "norm",
        "tent",
        "cotta",
    }
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| cotta | 11.0 | 20.0 | 15.50 |" in table


def test_other_streams_and_repeated_strategies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="seed"):
        merge([_run(["norm"]), _run(["tent"], seed=1)], ["a", "b"])
    with pytest.raises(MergeError, match="more than one run"):
        merge([_run(["norm"]), _run(["norm"])], ["a", "b"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["merge", str(bad), "--out", str(tmp_path / "m.json")]) == 2
