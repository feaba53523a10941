"""Labelled test sets in the folder layouts people download, for `tta-bench accuracy` and `tta-bench stream`.

Three layouts (``detect_layout`` tells them apart):

``cifar-c``
    The published CIFAR-10-C / CIFAR-100-C release: ``<root>/<corruption>.npy``, uint8 of shape
    ``[5 * N, 32, 32, 3]`` (the 5 severities stacked, severity 1 first: rows ``(s - 1) * N .. s * N``), and
    ``<root>/labels.npy`` with ``5 * N`` (or ``N``) labels. The arrays are memory-mapped; only the rows a
    stream uses are read.
``imagenet-c``
    ImageNet-C style folders: ``<root>/<corruption>/<severity>/<class>/<image>`` (any image format Pillow
    reads, e.g. ``*.JPEG``).
``folders``
    Plain class folders: ``<root>/<class>/<image>``; one domain of clean images, named ``none``.

In the folder layouts the class index of an image is the position of its class folder's name in sorted
order (the torchvision ``ImageFolder`` convention), and images are decoded to RGB when a stream draws them;
with ``size=(H, W)`` an image of another size is resized (shorter side to fit, bilinear, then centre-cropped)
as the server does with uploads. A missing file or folder is a FileNotFoundError that names what is missing
and where it goes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import numpy.typing as npt

from tta_data.corruptions import SEVERITIES
from tta_data.streams import Order, StreamBatch, stream_indices

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CLEAN",
    "IMAGE_EXTENSIONS",
    "Domain",
    "Layout",
    "detect_layout",
    "domain_stream",
    "list_domains",
    "load_domain",
]

Layout = Literal["cifar-c", "imagenet-c", "folders"]
#: The domain name of the clean images of a `folders` dataset.
CLEAN = "none"
#: File suffixes taken as images in the folder layouts (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})
LABELS_FILE = "labels.npy"
_NUM_SEVERITIES = len(SEVERITIES)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")

IntArray = npt.NDArray[np.int64]
UInt8Images = npt.NDArray[np.uint8]


@dataclass(frozen=True, eq=False)
class Domain:
    """One labelled image set of a dataset folder: a corruption at one severity, or clean images.

    ``images(indices)`` decodes (or reads) the images at those positions as a uint8 NHWC RGB array.
    """

    name: str
    severity: int | None
    labels: IntArray
    classes: tuple[str, ...]
    source: Path
    _read: Callable[[IntArray], UInt8Images]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, indices: Sequence[int] | npt.NDArray[np.integer]) -> UInt8Images:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"image index out of range for {len(self)} images of {self.source}")
        return self._read(idx)


def _dir(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return path


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def detect_layout(root: str | os.PathLike[str]) -> Layout:
    """The layout of ``root``: ``cifar-c`` (``labels.npy`` and ``<corruption>.npy`` files), ``imagenet-c``
    (``<corruption>/<severity 1-5>/<class>/``) or ``folders`` (``<class>/<images>``)."""
    path = _dir(root)
    arrays = [p for p in path.glob("*.npy") if p.name != LABELS_FILE]
    if (path / LABELS_FILE).is_file() or arrays:
        return "cifar-c"
    subdirs = _subdirs(path)
    if subdirs and all(any((d / str(s)).is_dir() for s in SEVERITIES) for d in subdirs):
        return "imagenet-c"
    if subdirs and any(_is_image(f) for d in subdirs for f in d.iterdir()):
        return "folders"
    raise FileNotFoundError(
        f"no dataset found in {path}: expected CIFAR-10-C files (<corruption>.npy and labels.npy), "
        "ImageNet-C folders (<corruption>/<severity>/<class>/<image>) or class folders (<class>/<image>)"
    )


def _layout(root: Path, layout: Layout | None) -> Layout:
    if layout is None:
        return detect_layout(root)
    if layout not in get_args(Layout):
        raise ValueError(f"layout must be one of {get_args(Layout)}, got {layout!r}")
    return layout


def list_domains(root: str | os.PathLike[str], layout: Layout | None = None) -> list[str]:
    """The domain (corruption) names ``root`` holds, sorted; ``["none"]`` for class folders."""
    path = _dir(root)
    kind = _layout(path, layout)
    if kind == "cifar-c":
        names = sorted(p.stem for p in path.glob("*.npy") if p.name != LABELS_FILE)
        if not names:
            raise FileNotFoundError(f"no <corruption>.npy files in {path} (CIFAR-10-C layout)")
        return names
    if kind == "imagenet-c":
        names = [d.name for d in _subdirs(path)]
        if not names:
            raise FileNotFoundError(f"no <corruption>/ folders in {path} (ImageNet-C layout)")
        return names
    return [CLEAN]


def _check_severity(severity: int) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    return int(severity)


def load_domain(
    root: str | os.PathLike[str],
    name: str,
    severity: int = 5,
    layout: Layout | None = None,
    size: tuple[int, int] | None = None,
) -> Domain:
    """Domain ``name`` (a corruption of the folder, or ``none`` for class folders) at ``severity``.

    ``size`` (H, W): the size every image is brought to (folder layouts; CIFAR-10-C arrays must already
    have it). Without it, every image drawn together must share a size.
    """
    path = _dir(root)
    kind = _layout(path, layout)
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid domain name {name!r}")
    if kind == "cifar-c":
        return _cifar_c(path, name, _check_severity(severity), size)
    if kind == "imagenet-c":
        folder = path / name / str(_check_severity(severity))
        if not (path / name).is_dir():
            raise FileNotFoundError(
                f"corruption folder not found: {path / name} (ImageNet-C layout "
                f"<root>/<corruption>/<severity>/<class>/<image>; found: {', '.join(list_domains(path, kind))})"
            )
        if not folder.is_dir():
            raise FileNotFoundError(
                f"severity folder not found: {folder} (put severity {severity}'s class folders there)"
            )
        return _class_folders(folder, name, severity, size)
    if name != CLEAN:
        raise ValueError(f"class folders hold one domain of clean images, {CLEAN!r}; got {name!r}")
    return _class_folders(path, CLEAN, None, size)


def _cifar_c(path: Path, name: str, severity: int, size: tuple[int, int] | None) -> Domain:
    file = path / f"{name}.npy"
    if not file.is_file():
        found = ", ".join(list_domains(path, "cifar-c")) if any(path.glob("*.npy")) else "none"
        raise FileNotFoundError(
            f"corruption file not found: {file} (CIFAR-10-C layout: <root>/<corruption>.npy of shape "
            f"[5 x N, 32, 32, 3] uint8 beside <root>/{LABELS_FILE}; corruptions found: {found})"
        )
    labels_file = path / LABELS_FILE
    if not labels_file.is_file():
        raise FileNotFoundError(
            f"labels not found: {labels_file} (the CIFAR-10-C release ships it beside the <corruption>.npy files)"
        )
    data = np.load(file, mmap_mode="r", allow_pickle=False)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        raise ValueError(
            f"{file}: expected uint8 images of shape [5 x N, H, W, 3], got {data.dtype} {data.shape}"
        )
    if data.shape[0] % _NUM_SEVERITIES:
        raise ValueError(
            f"{file}: {data.shape[0]} images do not split into {_NUM_SEVERITIES} severities of equal size"
        )
    per = data.shape[0] // _NUM_SEVERITIES
    if size is not None and tuple(data.shape[1:3]) != tuple(size):
        raise ValueError(
            f"{file}: images are {data.shape[1]}x{data.shape[2]}, the model takes {size[0]}x{size[1]}"
        )
    all_labels = np.load(labels_file, allow_pickle=False)
    if all_labels.ndim != 1 or all_labels.shape[0] not in (per, data.shape[0]):
        raise ValueError(
            f"{labels_file}: expected {data.shape[0]} (or {per}) labels for {file.name}, got shape {all_labels.shape}"
        )
    if not np.issubdtype(all_labels.dtype, np.integer) or (all_labels.size and all_labels.min() < 0):
        raise ValueError(f"{labels_file}: labels must be non-negative integers, got {all_labels.dtype}")
    start = (severity - 1) * per
    labels = all_labels[start : start + per] if all_labels.shape[0] == data.shape[0] else all_labels
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    rows = data[start : start + per]

    def read(idx: IntArray) -> UInt8Images:
        return np.ascontiguousarray(rows[idx])

    return Domain(name, severity, labels, tuple(str(i) for i in range(num_classes)), file, read)


def _class_folders(folder: Path, name: str, severity: int | None, size: tuple[int, int] | None) -> Domain:
    classes = _subdirs(folder)
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder} (expected {folder}/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for k, cls in enumerate(classes):
        members = sorted(f for f in cls.iterdir() if _is_image(f))
        files.extend(members)
        labels.extend([k] * len(members))
    if not files:
        raise FileNotFoundError(
            f"no images in the class folders of {folder} (suffixes {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )

    def read(idx: IntArray) -> UInt8Images:
        return _decode([files[i] for i in idx], size)

    return Domain(
        name, severity, np.asarray(labels, dtype=np.int64), tuple(c.name for c in classes), folder, read
    )


def _decode(files: Sequence[Path], size: tuple[int, int] | None) -> UInt8Images:
    from PIL import Image

    decoded = []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB")
        if size is not None and (rgb.height, rgb.width) != tuple(size):
            rgb = _fit(rgb, size)
        decoded.append(np.asarray(rgb, dtype=np.uint8))
    if not decoded:
        h, w = size if size is not None else (0, 0)
        return np.zeros((0, h, w, 3), dtype=np.uint8)
    shapes = {a.shape for a in decoded}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size ({sorted(shapes)}); give the size to bring them to")
    return np.stack(decoded)


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shorter side to fit ``size`` (bilinear, antialiased), then the centre crop of ``size``."""
    from PIL import Image

    th, tw = size
    scale = max(th / image.height, tw / image.width)
    nh, nw = max(th, round(image.height * scale)), max(tw, round(image.width * scale))
    resized = image.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return resized.crop((left, top, left + tw, top + th))


def domain_stream(
    domain: Domain,
    n: int | None = None,
    order: Order = "iid",
    delta: float = 0.0,
    seed: int = 0,
    batch_size: int = 200,
) -> Iterator[StreamBatch]:
    """Batches of one domain: the seeded class-balanced subset of ``n`` images (``None`` = all) in
    ``order``, exactly as ``tta_data.build_stream`` draws them from a CIFAR-10 archive. Arguments are
    checked now; images are read per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = stream_indices(domain.labels, n, order, delta, seed)

    def batches() -> Iterator[StreamBatch]:
        for start in range(0, indices.shape[0], batch_size):
            idx = indices[start : start + batch_size]
            yield StreamBatch(domain.name, domain.images(idx), domain.labels[idx], idx.copy())

    return batches()
