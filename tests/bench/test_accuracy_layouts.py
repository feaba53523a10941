"""`tta-bench accuracy --dataset` on a CIFAR-10-C layout folder written by the test: the errors it reports
are those of the same arrays sent through the service's own streams (PUT a policy, predict the batches
as application/x-npy), and `tta-bench stream --dataset` writes the same images into a replay file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import npy_bytes
from tta_bench import accuracy, replay_data
from tta_bench.paths import cifar10_archive
from tta_client.replay import load_stream_file
from tta_data import corrupt, decode_images, load_jpeg_npz, stream_indices

PER_SEVERITY = 100
CORRUPTIONS = ("gaussian_noise", "contrast")
SEVERITY, N, BATCH, SEED = 3, 60, 20, 0


def write_cifar_c(root: Path) -> np.ndarray:
    """The published layout: <corruption>.npy of 5 x 100 images (severity 1 first), labels.npy (500)."""
    ds = load_jpeg_npz(cifar10_archive("test"))
    labels_all = ds.labels.astype(np.int64)
    index = np.concatenate([np.flatnonzero(labels_all == k)[:10] for k in range(10)])
    index = index[np.random.default_rng(1).permutation(index.shape[0])]
    clean = decode_images(ds, index)
    root.mkdir(parents=True)
    for name in CORRUPTIONS:
        stacked = [corrupt(clean, name, s, seed=7, image_ids=index) for s in range(1, 6)]
        np.save(root / f"{name}.npy", np.concatenate(stacked))
    np.save(root / "labels.npy", np.tile(labels_all[index], 5).astype(np.uint8))
    return labels_all[index]


def served_error(client, strategy: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Error % of one fresh stream of the service on the stream order the bench uses."""
    stream = f"{strategy}-{abs(hash(images.tobytes())) % 10**8}"
    assert client.put(f"/v1/streams/{stream}", json={"strategy": strategy, "seed": SEED}).status_code == 200
    order = stream_indices(labels, N, "iid", 0.1, SEED)
    wrong = 0
    for start in range(0, N, BATCH):
        idx = order[start : start + BATCH]
        r = client.post(
            f"/v1/streams/{stream}/predict",
            params={"top_k": 1},
            content=npy_bytes(images[idx]),
            headers={"content-type": "application/x-npy"},
        )
        assert r.status_code == 200, r.text
        predicted = np.array([p["top_k"][0]["index"] for p in r.json()["predictions"]])
        wrong += int((predicted != labels[idx]).sum())
    return 100.0 * wrong / N


@pytest.mark.slow
def test_accuracy_on_a_cifar_c_folder_equals_the_served_streams(tmp_path: Path, make_client) -> None:
    root = tmp_path / "CIFAR-10-C"
    labels = write_cifar_c(root)
    out = tmp_path / "acc.json"
    argv = [
        "--dataset", str(root),
        "--strategies", "source,norm,tent",
        "--corruptions", ",".join(CORRUPTIONS),
        "--severity", str(SEVERITY),
        "--n", str(N),
        "--batch-size", str(BATCH),
        "--seed", str(SEED),
        "--threads", "1",
        "--json", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert accuracy.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["dataset"] == str(root) and payload["config"]["layout"] == "auto"
    results = payload["results"]

    client = make_client()
    rows = slice((SEVERITY - 1) * PER_SEVERITY, SEVERITY * PER_SEVERITY)
    for name in CORRUPTIONS:
        images = np.load(root / f"{name}.npy")[rows]  # read directly, not through tta_data.layouts
        for strategy in ("source", "norm", "tent"):
            served = served_error(client, strategy, images, labels)
            bench = results[strategy][name]
            if strategy == "tent":  # gradient steps: float reductions may differ by an image
                assert abs(bench - served) <= 100.0 / N + 1e-9, (strategy, name, bench, served)
            else:
                assert bench == pytest.approx(served), (strategy, name, bench, served)
    # The severity matters and the strategies differ: the comparison is not of constants.
    assert results["source"]["gaussian_noise"] > results["norm"]["gaussian_noise"]
    assert len({results[s]["mean"] for s in results}) > 1


def test_accuracy_dataset_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c10c"
    root.mkdir()
    np.save(root / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    argv = ["--dataset", str(root), "--strategies", "source", "--no-progress"]
    assert accuracy.main([*argv, "--corruptions", "snow"]) == 2
    assert "unknown corruption 'snow'" in capsys.readouterr().err
    assert accuracy.main([*argv, "--dataset", str(tmp_path / "missing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_stream_file_from_a_cifar_c_folder(tmp_path: Path) -> None:
    root = tmp_path / "CIFAR-10-C"
    labels = write_cifar_c(root)
    out = tmp_path / "c10c.npz"
    argv = ["--dataset", str(root), "--corruptions", "all", "--severity", "2", "--n", "40"]
    argv += ["--batch-size", "16", "--streams", "2", "--out", str(out), "--no-progress"]
    assert replay_data.main(argv) == 0
    streams = load_stream_file(out)
    assert streams.meta["corruptions"] == sorted(CORRUPTIONS)
    assert streams.meta["source"] == f"dataset:{root}"
    rows = np.load(root / "contrast.npy")[PER_SEVERITY : 2 * PER_SEVERITY]
    first = list(streams.batches(0))
    order = stream_indices(labels, 40, "iid", 0.1, 0)
    assert [b.corruption for b in first] == ["contrast"] * 3 + ["gaussian_noise"] * 3
    np.testing.assert_array_equal(first[0].images, rows[order[:16]])
    np.testing.assert_array_equal(first[0].labels, labels[order[:16]])
