"""`tta-bench sidebyside`: a tiny run against a real LitServe server of the bare model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tta_bench import cli, sidebyside


@pytest.mark.timeout(300)
def test_tiny_side_by_side_run_serves_the_same_network_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "sbs.json"
    argv = [
        "sidebyside",
        "--model",
        "wrn",
        "--batch-size",
        "4",
        "--clients",
        "1,2",
        "--strategies",
        "source,norm",
    ]
    argv += ["--rounds", "1", "--requests", "1", "--threads", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    # LitServe's bare network and the service's `source` answer one batch alike.
    same = report["same_predictions"]
    assert same["images"] == 4 and same["same_top_k"] is True and same["max_probability_diff"] < 1e-4
    assert set(report["results"]) == {"1", "2"} and report["warmup_rounds"] == 1
    for clients, targets in report["results"].items():
        assert set(targets) == {"litserve", "source", "norm"}
        assert targets["litserve"]["ratio"] == 1.0
        for row in targets.values():
            assert math.isfinite(row["ips"]) and row["ips"] > 0
            assert row["p99_ms"] >= row["p50_ms"] > 0
            (only,) = row["rounds"]  # the warm-up round is not counted
            assert only["requests"] == int(clients) and only["images"] == 4 * int(clients)
    assert report["idle_cpu_s"]["litserve_per_5s"] >= 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        sidebyside.parse_args(["--clients", "0"])
    with pytest.raises(SystemExit):
        sidebyside.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        sidebyside.parse_args(["--warmup-rounds", "-1"])
