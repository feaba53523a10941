"""CIFAR-10 stored as JPEG bytes in one ``.npz`` archive per split.

Archive fields: ``jpeg`` (uint8, every file concatenated), ``offsets`` (int64, N + 1 boundaries),
``labels`` (uint8) and ``classes`` (10 strings). The files are ordered by class, so never stream them in
file order; use :mod:`tta_data.streams` for seeded orders.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "JpegDataset",
    "decode_images",
    "load_cifar10",
    "load_jpeg_npz",
]

_FIELDS = ("jpeg", "offsets", "labels", "classes")


@dataclass(frozen=True, eq=False)
class JpegDataset:
    """A labelled set of JPEG-encoded images held in memory (arrays are read-only).

    ``eq=False`` keeps identity comparison and hashing: element-wise array equality is not a boolean.
    """

    jpeg: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    labels: npt.NDArray[np.uint8]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.jpeg.ndim != 1 or self.offsets.ndim != 1 or self.labels.ndim != 1:
            raise ValueError("jpeg, offsets and labels must be 1-D arrays")
        if self.offsets.shape[0] != n + 1:
            raise ValueError(
                f"offsets must hold len(labels) + 1 = {n + 1} boundaries, got {self.offsets.shape[0]}"
            )
        if n and (self.offsets[0] != 0 or self.offsets[-1] != self.jpeg.shape[0]):
            raise ValueError("offsets must start at 0 and end at len(jpeg)")
        if np.any(np.diff(self.offsets) <= 0):
            raise ValueError("offsets must be strictly increasing (every image needs at least one byte)")
        if n and int(self.labels.max()) >= len(self.classes):
            raise ValueError(
                f"labels reach {int(self.labels.max())} but only {len(self.classes)} classes are named"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of named classes."""
        return len(self.classes)

    def jpeg_bytes(self, i: int) -> bytes:
        """The encoded JPEG file of image ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        i %= n
        return self.jpeg[self.offsets[i] : self.offsets[i + 1]].tobytes()


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def load_jpeg_npz(path: str | os.PathLike[str]) -> JpegDataset:
    """Load a JPEG ``.npz`` archive (see module docstring) into a :class:`JpegDataset`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JPEG dataset archive not found: {path}")
    with np.load(path, allow_pickle=False) as archive:
        missing = [f for f in _FIELDS if f not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the field(s) {missing}; expected {list(_FIELDS)}")
        return JpegDataset(
            jpeg=_read_only(np.ascontiguousarray(archive["jpeg"], dtype=np.uint8)),
            offsets=_read_only(np.ascontiguousarray(archive["offsets"], dtype=np.int64)),
            labels=_read_only(np.ascontiguousarray(archive["labels"], dtype=np.uint8)),
            classes=tuple(str(c) for c in archive["classes"]),
        )


def load_cifar10(split: Literal["train", "test"], data_dir: str | os.PathLike[str]) -> JpegDataset:
    """Load ``{split}_jpeg.npz`` from ``data_dir`` (``tta_bench.paths.cifar10_dir()`` is the checkout's)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_jpeg_npz(Path(data_dir) / f"{split}_jpeg.npz")


def decode_images(ds: JpegDataset, indices: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """Decode images ``indices`` of ``ds`` into one uint8 NHWC RGB array (all images must share a size)."""
    # Imported here so that importing tta_data only loads numpy.
    from PIL import Image

    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    decoded: list[np.ndarray] = []
    for i in idx:
        with Image.open(io.BytesIO(ds.jpeg_bytes(int(i)))) as im:
            decoded.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if not decoded:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    shapes = {a.shape for a in decoded}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size ({sorted(shapes)}); decode them separately")
    return np.stack(decoded)
