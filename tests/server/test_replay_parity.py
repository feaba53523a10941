"""The HTTP path adds nothing to the numbers: a replay over HTTP equals the in-process loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import adapters
from tta_bench import replay_data
from tta_bench.paths import cifar10_archive
from tta_client import AsyncClient
from tta_client.replay import ReplayConfig, load_stream_file, run_replay
from tta_data import build_stream, load_jpeg_npz


def in_process_error(pool, strategy: str, n: int, batch_size: int, seed: int) -> float:
    handle = pool.get(None)
    strat = adapters.get_strategy(strategy)
    cfg = strat.parse_config({})
    state = strat.init_state(handle, cfg, seed=0)
    wrong = total = 0
    ds = load_jpeg_npz(cifar10_archive("test"))
    for batch in build_stream(ds, ["gaussian_noise"], 5, n, "iid", 0.0, seed, batch_size):
        x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div(255)
        result = strat.step(handle, x, state, cfg)
        state = result.state
        wrong += int((result.logits.argmax(1).numpy() != batch.labels).sum())
        total += len(batch.labels)
    return 100.0 * wrong / total


@pytest.mark.parametrize("strategy", ["tent", "unmix_tns"])
def test_http_replay_matches_in_process_error(live_server, pool, strategy, tmp_path) -> None:
    """The route a user takes: `tta-bench stream` writes the stream, the client replays the file."""
    url = live_server()
    stream = tmp_path / "gn5.npz"
    argv = ["--streams", "1", "--corruptions", "gaussian_noise", "--severity", "5", "--n", "256"]
    assert (
        replay_data.main([*argv, "--batch-size", "64", "--seed", "0", "--no-progress", "--out", str(stream)])
        == 0
    )
    cfg = ReplayConfig(streams=1, strategy=strategy, seed=0, payload="raw")

    async def replay() -> float:
        async with AsyncClient(url, timeout=120) as client:
            result = await run_replay(client, cfg, load_stream_file(stream), progress=False)
        records = result.records
        assert not result.errors and sum(r.images for r in records) == 256
        return 100.0 * (1 - sum(r.correct for r in records) / sum(r.images for r in records))

    http_error = asyncio.run(replay())
    local_error = in_process_error(pool, strategy, 256, 64, 0)
    assert abs(http_error - local_error) <= 0.5, (http_error, local_error)
    assert np.isfinite(http_error) and 5 < http_error < 95
