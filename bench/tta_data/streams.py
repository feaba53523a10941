"""Test-stream orders and corrupted CIFAR test streams (test-stream protocols, docs/ALGORITHMS.md §7).

Every order is deterministic for a seed and returned as positions into the given label array. A stream is a
class-balanced subset of the dataset, ordered once, then replayed under each corruption in turn and yielded
lazily in batches (decoding and corruption happen per batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from tta_data.cifar import JpegDataset, decode_images
from tta_data.corruptions import _check_name, _check_severity, corrupt

__all__ = [
    "Order",
    "StreamBatch",
    "balanced_subset",
    "build_stream",
    "dirichlet_order",
    "iid_order",
    "sorted_order",
    "stream_indices",
    "stream_length",
    "stream_num_batches",
    "stream_order",
]

Order = Literal["iid", "sorted", "dirichlet"]
IntArray = npt.NDArray[np.int64]

# Separate child streams of one user seed: the subset choice and the order must not share random draws, or
# changing n_per_corruption would also reshuffle unrelated parts of the stream.
_SUBSET_STREAM = 0
_ORDER_STREAM = 1


@dataclass(frozen=True, eq=False)
class StreamBatch:
    """One batch of a test stream (``eq=False``: arrays do not compare to a single boolean)."""

    corruption: str
    images: npt.NDArray[np.uint8]  # (B, 32, 32, 3) RGB
    labels: npt.NDArray[np.int64]  # (B,)
    index: npt.NDArray[np.int64]  # (B,) dataset indices


def _labels_array(labels: Sequence[int] | npt.NDArray[np.integer]) -> IntArray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0)):
        raise ValueError("labels must be a 1-D array of non-negative integers")
    return arr.astype(np.int64, copy=False)


def iid_order(n: int, seed: int) -> IntArray:
    """A seeded random permutation of ``0 .. n-1``."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def sorted_order(labels: Sequence[int] | npt.NDArray[np.integer], seed: int) -> IntArray:
    """Positions sorted by label ascending; ties in seeded random order (shuffle, then stable sort)."""
    lab = _labels_array(labels)
    perm = iid_order(lab.shape[0], seed)
    return perm[np.argsort(lab[perm], kind="stable")]


def dirichlet_order(
    labels: Sequence[int] | npt.NDArray[np.integer],
    delta: float,
    seed: int,
    num_chunks: int | None = None,
    *,
    min_chunk_size: int = 10,
    max_tries: int = 10_000,
) -> IntArray:
    """Label-correlated order by Dirichlet(``delta``) chunking; ``delta=0`` sorts by label.

    Implements docs/ALGORITHMS.md §7.3. The samples are shuffled, then split into ``num_chunks`` time
    slots (default: number of classes, ``max(labels) + 1``): for each class in turn its (shuffled) samples
    are divided among the slots by proportions ``q ~ Dir(delta * 1)``, with the proportion of every slot
    already holding ``>= N / num_chunks`` samples set to zero and the rest renormalised. This is repeated
    until every slot holds at least ``min_chunk_size`` samples; ``max_tries`` bounds the repeats (the
    reference aborts after 120 s instead).
    Slots are emitted in order, each visiting its classes in a freshly shuffled order.

    When every remaining proportion is exactly zero (tiny ``delta`` underflows), the class goes to one
    uniformly drawn non-full slot, the ``delta -> 0`` limit of the Dirichlet draw; the reference divides by
    zero there.
    """
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    lab = _labels_array(labels)
    if delta == 0:
        return sorted_order(lab, seed)
    n = lab.shape[0]
    num_classes = int(lab.max()) + 1 if n else 0
    chunks = num_classes if num_chunks is None else int(num_chunks)
    if chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {chunks}")
    if n < chunks * min_chunk_size:
        raise ValueError(f"{n} samples cannot fill {chunks} chunks with >= {min_chunk_size} samples each")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)  # the reference orders an already shuffled sample list
    shuffled = lab[perm]
    capacity = n / chunks
    for _ in range(max_tries):
        sizes = np.zeros(chunks, dtype=np.int64)
        pieces: list[list[np.ndarray]] = [[] for _ in range(chunks)]  # pieces[chunk][class]
        for k in range(num_classes):
            members = np.flatnonzero(shuffled == k)
            rng.shuffle(members)
            q = rng.dirichlet(np.full(chunks, float(delta))) * (sizes < capacity)
            if q.sum() > 0:
                q = q / q.sum()
            else:
                open_slots = np.flatnonzero(sizes < capacity)  # empty only if this class has no samples
                q = np.zeros(chunks)
                q[rng.choice(open_slots) if open_slots.size else 0] = 1.0
            cuts = (np.cumsum(q) * members.shape[0]).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(members, cuts)):
                pieces[j].append(piece)
                sizes[j] += piece.shape[0]
        if sizes.min() >= min_chunk_size:
            break
    else:
        raise ValueError(
            f"no Dirichlet(delta={delta}) split with >= {min_chunk_size} samples per chunk found in "
            f"{max_tries} tries; use a larger delta or fewer chunks"
        )

    order = [pieces[j][k] for j in range(chunks) for k in rng.permutation(num_classes)]
    return perm[np.concatenate(order)].astype(np.int64)


def stream_order(
    labels: Sequence[int] | npt.NDArray[np.integer], order: Order, delta: float, seed: int
) -> IntArray:
    """Dispatch to :func:`iid_order`, :func:`sorted_order` or :func:`dirichlet_order`."""
    lab = _labels_array(labels)
    if order == "iid":
        return iid_order(lab.shape[0], seed)
    if order == "sorted":
        return sorted_order(lab, seed)
    if order == "dirichlet":
        return dirichlet_order(lab, delta, seed)
    raise ValueError(f"order must be one of {get_args(Order)}, got {order!r}")


def balanced_subset(labels: Sequence[int] | npt.NDArray[np.integer], n: int | None, seed: int) -> IntArray:
    """A seeded class-balanced subset of ``n`` positions (ascending); ``None`` or ``len(labels)`` = all.

    Each class present gets ``n // C`` samples; the ``n % C`` left over go to randomly chosen classes.
    """
    lab = _labels_array(labels)
    if n is None or n == lab.shape[0]:
        return np.arange(lab.shape[0], dtype=np.int64)
    if not 0 <= n <= lab.shape[0]:
        raise ValueError(f"cannot take {n} of {lab.shape[0]} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(lab)
    quota = np.full(classes.shape[0], n // classes.shape[0], dtype=np.int64)
    quota[rng.choice(classes.shape[0], n % classes.shape[0], replace=False)] += 1
    chosen = []
    for cls, k in zip(classes, quota, strict=True):
        members = np.flatnonzero(lab == cls)
        if k > members.shape[0]:
            raise ValueError(
                f"class {cls} has {members.shape[0]} samples, a balanced subset of {n} needs {k}"
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def stream_indices(
    labels: Sequence[int] | npt.NDArray[np.integer],
    n_per_corruption: int | None,
    order: Order,
    delta: float,
    seed: int,
) -> IntArray:
    """Dataset indices of one corruption's stream, in stream order (identical for every corruption)."""
    lab = _labels_array(labels)
    subset = balanced_subset(lab, n_per_corruption, _child_seed(seed, _SUBSET_STREAM))
    return subset[stream_order(lab[subset], order, delta, _child_seed(seed, _ORDER_STREAM))]


def _child_seed(seed: int, stream: int) -> int:
    """An int seed for child stream ``stream`` of ``seed`` (via SeedSequence, so children are independent)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0])


def stream_length(dataset: JpegDataset, corruptions: Sequence[str], n_per_corruption: int | None) -> int:
    """Number of samples :func:`build_stream` yields."""
    per = len(dataset) if n_per_corruption is None else n_per_corruption
    return len(corruptions) * per


def stream_num_batches(
    dataset: JpegDataset, corruptions: Sequence[str], n_per_corruption: int | None, batch_size: int
) -> int:
    """Number of batches :func:`build_stream` yields (batches never span two corruptions)."""
    per = len(dataset) if n_per_corruption is None else n_per_corruption
    return len(corruptions) * -(-per // batch_size)


def build_stream(
    dataset: JpegDataset,
    corruptions: Sequence[str],
    severity: int = 5,
    n_per_corruption: int | None = None,
    order: Order = "iid",
    delta: float = 0.0,
    seed: int = 0,
    batch_size: int = 200,
) -> Iterator[StreamBatch]:
    """Batches of a continual corrupted test stream.

    The same seeded class-balanced subset of ``n_per_corruption`` images (``None`` = whole dataset), in the
    same ``order`` (``delta`` is the Dirichlet concentration for ``"dirichlet"``; 0 sorts by label), is
    played under each corruption of ``corruptions`` in turn (``"none"`` = clean). Dataset image ``i`` is
    always corrupted with ``corrupt(..., seed, image_ids=[i])``, so every order sees identical images.
    Batches hold ``batch_size`` images, the last of each corruption possibly fewer; whether to reset between
    corruptions is up to the consumer. Arguments are checked eagerly; decoding and corruption run per batch.
    """
    corruptions = tuple(corruptions)
    for name in corruptions:
        _check_name(name)
    severity = _check_severity(severity)
    if order not in get_args(Order):
        raise ValueError(f"order must be one of {get_args(Order)}, got {order!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    indices = stream_indices(dataset.labels, n_per_corruption, order, delta, seed)
    return _iterate_stream(dataset, corruptions, severity, indices, seed, batch_size)


def _iterate_stream(
    dataset: JpegDataset,
    corruptions: tuple[str, ...],
    severity: int,
    indices: IntArray,
    seed: int,
    batch_size: int,
) -> Iterator[StreamBatch]:
    labels = dataset.labels.astype(np.int64)
    for name in corruptions:
        for start in range(0, indices.shape[0], batch_size):
            idx = indices[start : start + batch_size]
            images = corrupt(decode_images(dataset, idx), name, severity, seed, image_ids=idx)
            yield StreamBatch(corruption=name, images=images, labels=labels[idx], index=idx.copy())
