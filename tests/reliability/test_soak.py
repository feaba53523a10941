"""A short soak: two `python -m tta_server` replicas on the bench's own redis-server, mixed strategies,
accounting checked."""

from __future__ import annotations

import json

import pytest

from tests.conftest import require_redis_server
from tta_bench import soak


@pytest.mark.redis
def test_short_soak_accounts_for_every_update(tmp_path, capsys) -> None:
    require_redis_server()
    report_file = tmp_path / "soak.json"
    argv = ["--duration", "20", "--streams", "8", "--progress", "5"]  # no --redis-url: it starts its own
    argv += ["--per-stream", "2", "--json", str(report_file), "--log-dir", str(tmp_path / "logs")]
    argv += ["--churn-every", "1.5", "--churn-streams", "3"]  # PUT/reset/DELETE on 3 streams meanwhile
    rc = soak.main(argv)
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert rc == 0, out + json.dumps(report, indent=1)[:3000]
    assert "own redis-server on 127.0.0.1:" in out
    assert report["passed"] and all(report["checks"].values())
    assert report["requests"] > 0 and report["adapted_responses"] > 0
    assert report["status_counts"].keys() == {"200"}
    assert report["integrity_problems"] == [] and report["accounting_mismatches"] == {}
    assert sum(report["churn_ops"].values()) >= 5 and report["incarnations_seen"] > 8
    assert report["stale_reads"] == 0 and report["duplicated_steps"] == []
    assert "requests" in out and "checks:" in out  # progress lines and the summary were printed


def test_soak_cli_is_dispatched_by_tta_bench(capsys) -> None:
    from tta_bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["soak", "--help"])
    assert exc.value.code == 0
    assert "--redis-outage" in capsys.readouterr().out


def test_an_outage_needs_the_bench_s_own_redis(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        soak.parse_args(["--redis-outage", "5@10", "--redis-url", "redis://127.0.0.1:1/0"])
    assert exc.value.code == 2
    assert "cannot be combined with --redis-url" in capsys.readouterr().err
