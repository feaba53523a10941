"""A short soak: two `python -m tta_server` replicas on one Redis, mixed strategies, accounting checked."""

from __future__ import annotations

import json

import pytest
import redis

from tests.conftest import require_redis
from tta_bench import soak

pytestmark = pytest.mark.redis
SOAK_DB = 14


def test_short_soak_accounts_for_every_update(tmp_path, capsys) -> None:
    require_redis(f"redis://127.0.0.1:6379/{SOAK_DB}")
    report_file = tmp_path / "soak.json"
    argv = ["--duration", "20", "--streams", "8", "--redis-db", str(SOAK_DB), "--progress", "5"]
    argv += ["--per-stream", "2", "--json", str(report_file), "--log-dir", str(tmp_path / "logs")]
    try:
        rc = soak.main(argv)
    finally:
        redis.Redis.from_url(f"redis://127.0.0.1:6379/{SOAK_DB}").flushdb()
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert rc == 0, out + json.dumps(report, indent=1)[:3000]
    assert report["passed"] and all(report["checks"].values())
    assert report["requests"] > 0 and report["adapted_responses"] > 0
    assert report["status_counts"].keys() == {"200"}
    assert report["stored_states"] == 8 and report["integrity_problems"] == []
    assert report["accounting_mismatches"] == {}
    assert "requests" in out and "checks:" in out  # progress lines and the summary were printed


def test_soak_cli_is_dispatched_by_tta_bench(capsys) -> None:
    from tta_bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["soak", "--help"])
    assert exc.value.code == 0
    assert "--redis-outage" in capsys.readouterr().out
