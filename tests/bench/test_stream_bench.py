"""`tta-bench stream`: corrupted CIFAR-10 test streams written to a replay file, and read back by the client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tta_bench import cli, replay_data
from tta_client.replay import load_stream_file


def test_stream_file_switches_corruption_after_k_batches(tmp_path: Path, capsys) -> None:
    out = tmp_path / "drift.npz"
    argv = ["stream", "--streams", "2", "--corruptions", "none,gaussian_noise", "--switch-after", "1"]
    argv += ["--n", "20", "--batch-size", "8", "--no-progress", "--out", str(out)]

    assert cli.main(argv) == 0

    assert "wrote" in capsys.readouterr().out
    stream_file = load_stream_file(out)
    assert stream_file.num_streams == 2
    stream0, stream1 = stream_file.batches(0), stream_file.batches(1)
    assert [b.corruption for b in stream0] == ["none", "gaussian_noise", "gaussian_noise", "gaussian_noise"]
    assert [len(b.labels) for b in stream0] == [8, 8, 8, 4]
    assert stream0[0].images.shape == (8, 32, 32, 3) and stream0[0].images.dtype == np.uint8
    assert not np.array_equal(stream0[1].labels, stream1[1].labels), "streams must use their own seed"
    meta = stream_file.meta
    assert (meta["corruptions"], meta["switch_after"], meta["n"], meta["seed"]) == (
        ["none", "gaussian_noise"],
        1,
        20,
        0,
    )
    json.dumps(meta)


def test_the_file_holds_what_the_in_process_source_yields(tmp_path: Path) -> None:
    from tta_bench.paths import cifar10_archive
    from tta_data import load_jpeg_npz

    out = tmp_path / "s.npz"
    argv = ["--streams", "1", "--corruptions", "fog", "--severity", "3", "--n", "12", "--batch-size", "5"]
    assert (
        replay_data.main([*argv, "--order", "sorted", "--seed", "2", "--no-progress", "--out", str(out)]) == 0
    )
    source = replay_data.cifar_streams(
        load_jpeg_npz(cifar10_archive("test")),
        ["fog"],
        severity=3,
        n=12,
        batch_size=5,
        order="sorted",
        seed=2,
    )
    for want, got in zip(source(0), load_stream_file(out).batches(0), strict=True):
        assert np.array_equal(want.images, got.images) and np.array_equal(want.labels, got.labels)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--switch-after", "3", "--corruptions", "fog"], "switch_after"),
        (["--corruptions", "nope"], "nope"),
        (["--streams", "0"], "--streams"),
        (["--n", "0"], "n must be"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert replay_data.main([*argv, "--no-progress", "--out", str(tmp_path / "x.npz")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_missing_archive_names_the_expected_path(tmp_path: Path, capsys) -> None:
    argv = ["--data-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path / "x.npz")]
    assert replay_data.main(argv) == 2
    assert f"expected {tmp_path / 'test_jpeg.npz'}" in capsys.readouterr().err
