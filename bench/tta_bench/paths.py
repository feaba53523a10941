"""Where the benches, tests and scripts find the repository's files and the shared data (defined once, here).

The benches run from a source checkout: ``REPO_ROOT`` is the checkout (the folder above ``bench/``), its
``models.yaml`` declares the served model, and the shared CIFAR-10 archives sit in ``../shared`` next to it
(``shared/README.md``). The server and the core know none of this: they get explicit paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = [
    "CIFAR10_DIR",
    "MODELS_CONFIG",
    "REPO_ROOT",
    "SHARED_DIR",
    "cifar10_archive",
    "cifar10_dir",
    "require_file",
]

#: The source checkout: bench/tta_bench/paths.py -> the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The served models of the checkout (weights and source data in ../shared).
MODELS_CONFIG = REPO_ROOT / "models.yaml"
#: Data shared by every checkout of the project: models/ and data/ (see its README.md).
SHARED_DIR = REPO_ROOT.parent / "shared"
#: Default folder of train_jpeg.npz / test_jpeg.npz.
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
        else f"the default is {CIFAR10_DIR}; set TTA_DATA_DIR or --data-dir to the folder holding it"
    )
    return require_file(folder / f"{split}_jpeg.npz", f"CIFAR-10 {split} archive", hint)
