"""Where the benches, tests and scripts find the repository's files and the shared data (defined once, here).

The benches run from a source checkout: ``REPO_ROOT`` is the checkout (the folder above ``bench/``), its
``models.yaml`` declares the served models (weights in ``models/``, source images in ``data/cifar10/``). The
benchmarks read the full CIFAR-10 archives from ``../shared/data/cifar10`` next to the checkout, or from
``$TTA_DATA_DIR``; the test suite points ``$TTA_DATA_DIR`` at the small subsets the checkout ships
(:data:`REPO_DATA_DIR`), so a clone runs its tests alone. The server and the core know none of this: they
get explicit paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = [
    "CIFAR10_DIR",
    "MODELS_CONFIG",
    "REPO_DATA_DIR",
    "REPO_ROOT",
    "SHARED_DIR",
    "cifar10_archive",
    "cifar10_dir",
    "require_file",
]

#: The source checkout: bench/tta_bench/paths.py -> the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The served models of the checkout (weights in models/, source data in data/cifar10/).
MODELS_CONFIG = REPO_ROOT / "models.yaml"
#: The checkout's own CIFAR-10 subsets (3000 training and 1000 test images, scripts/make_repo_data.py), in
#: the archive format: what the tests and the served models' source data use.
REPO_DATA_DIR = REPO_ROOT / "data" / "cifar10"
#: Data shared by every checkout of the project: models/ and data/ (see its README.md).
SHARED_DIR = REPO_ROOT.parent / "shared"
#: Default folder of the full train_jpeg.npz / test_jpeg.npz (50000 / 10000 images) for the benchmarks.
CIFAR10_DIR = SHARED_DIR / "data" / "cifar10"


def cifar10_dir() -> Path:
    """Folder of the CIFAR-10 archives: ``$TTA_DATA_DIR`` or :data:`CIFAR10_DIR` (``<repo>/../shared/...``).

    A relative ``TTA_DATA_DIR`` is taken relative to :data:`REPO_ROOT`, so the result does not depend on the
    working directory.
    """
    configured = os.environ.get("TTA_DATA_DIR")
    return (REPO_ROOT / configured).resolve() if configured else CIFAR10_DIR.resolve()


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file, else FileNotFoundError naming the expected path (and ``hint``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path}" + (f" ({hint})" if hint else ""))
    return path


def cifar10_archive(
    split: Literal["train", "test"] = "test", data_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Path of ``{split}_jpeg.npz`` in ``data_dir`` (default :func:`cifar10_dir`); FileNotFoundError naming
    the expected path when it is absent."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(data_dir) if data_dir is not None else cifar10_dir()
    hint = (
        "pass --data-dir"
        if data_dir is not None
        else (
            f"the default is {CIFAR10_DIR}, the full archives described in ../shared/README.md; set "
            f"TTA_DATA_DIR or --data-dir to the folder holding it ({REPO_DATA_DIR} holds small subsets)"
        )
    )
    return require_file(folder / f"{split}_jpeg.npz", f"CIFAR-10 {split} archive", hint)
