"""`tta-bench writeback` (a tiny run: real WRN-40-2, `cotta` without augmentation averaging, the bench's own
redis-server): one row per N, and a store written only every N-th step."""

from __future__ import annotations

import pytest

from tests.conftest import require_redis_server
from tta_bench import cli, write_back


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_tiny_write_back_run_stores_a_state_every_nth_step(capsys: pytest.CaptureFixture[str]) -> None:
    require_redis_server()
    argv = ["--strategies", "cotta", "--config", 'cotta={"ap": 0}', "--steps-per-write", "1,3"]
    argv += ["--steps", "3", "--warmup", "1", "--rounds", "1", "--batch-size", "4", "--threads", "1"]
    rows = write_back.run(write_back.build_parser().parse_args(argv))
    every, third = rows
    assert (every["n"], third["n"]) == (1, 3)
    assert every["state_bytes"] == third["state_bytes"] > 30e6  # a mean teacher: four copies of the network
    # Every step stores a blob of about the state's size; with N=3 one of the 4 steps is stored (the third).
    assert every["written_per_step"] > every["state_bytes"]
    assert third["written_per_step"] == pytest.approx(every["written_per_step"] / 3, rel=0.05)
    assert (every["unwritten"], third["unwritten"]) == (0, 1)
    assert every["median_ms"] > 0 and third["median_ms"] > 0
    assert cli.main(["writeback", *argv, "--store", "memory"]) == 0
    out = capsys.readouterr().out
    assert "| cotta | 3 |" in out and "| cotta | 1 |" in out
