"""Tests for tta_data.streams: seeded orders (i.i.d., sorted, Dirichlet) and lazy corrupted streams."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import tta_data.streams as streams
from tta_data import (
    JpegDataset,
    balanced_subset,
    build_stream,
    corrupt,
    decode_images,
    dirichlet_order,
    iid_order,
    sorted_order,
    stream_indices,
    stream_length,
    stream_num_batches,
    stream_order,
)


@pytest.fixture(scope="module")
def labels_1000(cifar_test: JpegDataset) -> np.ndarray:
    """Labels of a class-balanced 1000-image subset (100 per class), in the archive's class order."""
    return cifar_test.labels[balanced_subset(cifar_test.labels, 1000, seed=0)].astype(np.int64)


def _is_permutation(order: np.ndarray, n: int) -> bool:
    return order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))


def _mean_classes_per_batch(labels: np.ndarray, batch: int = 64) -> float:
    return float(np.mean([np.unique(labels[i : i + batch]).size for i in range(0, labels.size, batch)]))


def test_iid_order() -> None:
    order = iid_order(1000, seed=4)
    assert _is_permutation(order, 1000) and order.dtype == np.int64
    np.testing.assert_array_equal(order, iid_order(1000, seed=4))
    assert not np.array_equal(order, iid_order(1000, seed=5))
    assert not np.array_equal(order, np.arange(1000))


def test_sorted_order(labels_1000: np.ndarray) -> None:
    order = sorted_order(labels_1000, seed=1)
    assert _is_permutation(order, 1000)
    assert np.all(np.diff(labels_1000[order]) >= 0)
    np.testing.assert_array_equal(order, sorted_order(labels_1000, seed=1))
    other = sorted_order(labels_1000, seed=2)
    np.testing.assert_array_equal(labels_1000[order], labels_1000[other])
    assert not np.array_equal(order, other)  # ties are shuffled by the seed


def test_dirichlet_small_delta_gives_long_class_runs(labels_1000: np.ndarray) -> None:
    order = dirichlet_order(labels_1000, delta=0.01, seed=0)
    assert _is_permutation(order, 1000)
    np.testing.assert_array_equal(order, dirichlet_order(labels_1000, delta=0.01, seed=0))
    assert not np.array_equal(order, dirichlet_order(labels_1000, delta=0.01, seed=1))
    assert _mean_classes_per_batch(labels_1000[order]) < 3
    assert _mean_classes_per_batch(labels_1000[iid_order(1000, seed=0)]) > 8


def test_dirichlet_concentration_controls_mixing(labels_1000: np.ndarray) -> None:
    mixing = [
        np.mean(
            [_mean_classes_per_batch(labels_1000[dirichlet_order(labels_1000, d, seed)]) for seed in range(3)]
        )
        for d in (0.01, 0.1, 1.0, 100.0)
    ]
    assert all(np.diff(mixing) > 0), mixing
    # slots emit each class contiguously, so the number of label changes is bounded by slots x classes
    order = dirichlet_order(labels_1000, delta=1.0, seed=0, num_chunks=5)
    assert _is_permutation(order, 1000)
    assert np.count_nonzero(np.diff(labels_1000[order])) <= 5 * 10 - 1


def test_dirichlet_zero_delta_is_sorted(labels_1000: np.ndarray) -> None:
    np.testing.assert_array_equal(
        dirichlet_order(labels_1000, 0.0, seed=3), sorted_order(labels_1000, seed=3)
    )


def test_dirichlet_errors(labels_1000: np.ndarray) -> None:
    with pytest.raises(ValueError, match="delta"):
        dirichlet_order(labels_1000, -0.1, seed=0)
    with pytest.raises(ValueError, match="chunks"):
        dirichlet_order(labels_1000[::20], 0.1, seed=0)  # 10 chunks x 10 samples impossible
    with pytest.raises(ValueError, match="tries"):
        # 100 samples of one class: 10 chunks of >= 10 need an exactly uniform split, which a tiny delta
        # never gives
        dirichlet_order(np.r_[np.zeros(100, dtype=np.int64), 9], 0.001, seed=0, max_tries=20)


def test_stream_order_dispatch(labels_1000: np.ndarray) -> None:
    np.testing.assert_array_equal(stream_order(labels_1000, "iid", 0.0, 7), iid_order(1000, 7))
    np.testing.assert_array_equal(stream_order(labels_1000, "sorted", 0.0, 7), sorted_order(labels_1000, 7))
    np.testing.assert_array_equal(
        stream_order(labels_1000, "dirichlet", 0.1, 7), dirichlet_order(labels_1000, 0.1, 7)
    )
    with pytest.raises(ValueError, match="order"):
        stream_order(labels_1000, "shuffled", 0.0, 7)  # type: ignore[arg-type]


def test_balanced_subset(cifar_test: JpegDataset) -> None:
    labels = cifar_test.labels  # the shipped subset: 100 per class
    subset = balanced_subset(labels, 500, seed=2)
    assert np.unique(subset).size == 500
    assert np.bincount(labels[subset], minlength=10).tolist() == [50] * 10
    np.testing.assert_array_equal(subset, balanced_subset(labels, 500, seed=2))
    assert not np.array_equal(subset, balanced_subset(labels, 500, seed=3))
    counts = np.bincount(labels[balanced_subset(labels, 505, seed=2)], minlength=10)
    assert counts.sum() == 505 and set(counts.tolist()) == {50, 51}
    np.testing.assert_array_equal(balanced_subset(labels, None, seed=2), np.arange(1000))
    with pytest.raises(ValueError):
        balanced_subset(labels, 1001, seed=2)
    with pytest.raises(ValueError, match="class"):
        balanced_subset(np.r_[np.zeros(10), np.ones(2)].astype(np.int64), 8, seed=0)


def test_build_stream_contents(cifar_test: JpegDataset) -> None:
    corruptions = ["gaussian_noise", "none", "contrast"]
    batches = list(build_stream(cifar_test, corruptions, 5, 100, "iid", 0.0, seed=3, batch_size=32))
    assert len(batches) == stream_num_batches(cifar_test, corruptions, 100, 32) == 12
    assert sum(b.labels.size for b in batches) == stream_length(cifar_test, corruptions, 100) == 300
    assert [b.images.shape[0] for b in batches[:4]] == [32, 32, 32, 4]  # last partial batch kept
    assert [b.corruption for b in batches] == [c for c in corruptions for _ in range(4)]

    per_corruption = [np.concatenate([b.index for b in batches if b.corruption == c]) for c in corruptions]
    for idx in per_corruption[1:]:
        np.testing.assert_array_equal(idx, per_corruption[0])  # same subset, same order every time
    np.testing.assert_array_equal(per_corruption[0], stream_indices(cifar_test.labels, 100, "iid", 0.0, 3))
    assert np.unique(per_corruption[0]).size == 100
    assert np.bincount(cifar_test.labels[per_corruption[0]], minlength=10).tolist() == [10] * 10

    for b in batches:
        assert b.images.dtype == np.uint8 and b.labels.dtype == np.int64 and b.index.dtype == np.int64
        np.testing.assert_array_equal(b.labels, cifar_test.labels[b.index])
        clean = decode_images(cifar_test, b.index)
        np.testing.assert_array_equal(b.images, corrupt(clean, b.corruption, 5, 3, image_ids=b.index))
        if b.corruption == "none":
            np.testing.assert_array_equal(b.images, clean)


def test_build_stream_orders_share_images(cifar_test: JpegDataset) -> None:
    """An image is corrupted identically whatever the order or batch size, so orders are comparable."""
    got = {}
    cases: tuple[tuple[streams.Order, int], ...] = (("iid", 64), ("sorted", 50), ("dirichlet", 7))
    for order, batch_size in cases:
        batches = list(
            build_stream(cifar_test, ["shot_noise"], 2, 200, order, 0.05, seed=9, batch_size=batch_size)
        )
        index = np.concatenate([b.index for b in batches])
        images = np.concatenate([b.images for b in batches])
        got[order] = (index, images[np.argsort(index)])
    labels = cifar_test.labels[got["sorted"][0]]
    assert np.all(np.diff(labels.astype(np.int64)) >= 0)
    changes = {o: np.count_nonzero(np.diff(cifar_test.labels[got[o][0]].astype(np.int64))) for o in got}
    assert changes["dirichlet"] < changes["iid"] / 2
    for order in ("sorted", "dirichlet"):
        np.testing.assert_array_equal(np.sort(got[order][0]), np.sort(got["iid"][0]))
        np.testing.assert_array_equal(got[order][1], got["iid"][1])


def test_build_stream_is_lazy_and_validates_eagerly(
    cifar_test: JpegDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting_decode(ds: JpegDataset, indices: np.ndarray) -> np.ndarray:
        calls.append(len(indices))
        return decode_images(ds, indices)

    monkeypatch.setattr(streams, "decode_images", counting_decode)
    stream = build_stream(cifar_test, ["fog", "pixelate"], 5, None, "iid", 0.0, seed=0, batch_size=100)
    assert calls == []
    first = next(stream)
    assert calls == [100] and first.images.shape == (100, 32, 32, 3)
    next(stream)
    assert calls == [100, 100]

    for bad in (
        {"corruptions": ["fog", "blur"]},
        {"severity": 6},
        {"order": "random"},
        {"batch_size": 0},
        {"n_per_corruption": 20_000},
    ):
        kwargs: dict[str, Any] = {
            "corruptions": ["fog"],
            "severity": 5,
            "order": "iid",
            "batch_size": 8,
            **bad,
        }
        with pytest.raises(ValueError):
            build_stream(cifar_test, **kwargs)  # raises before the first batch is requested
