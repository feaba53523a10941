"""Write the model and data a clone needs to run alone: the demo WRN-40-2 as safetensors and small CIFAR-10
subsets (the benchmarks keep using the full archives of ../shared).

    .venv/bin/python scripts/make_repo_data.py [--shared ../shared]

* ``models/cifar10_wrn40_2.safetensors``: ``../shared/models/cifar10_wrn40_2.pt`` (a float32 state_dict)
  re-saved as safetensors, tensors and key names unchanged;
* ``data/cifar10/train_jpeg.npz``: 300 training images per class (EATA's Fisher uses 2000 of them);
* ``data/cifar10/test_jpeg.npz``: 100 test images per class.

Each subset is a seeded random draw of every class, kept in class order as in the full archives (so the
same rule holds: shuffle before you stream) and with the original JPEG bytes. Reruns write identical files.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tta_bench.paths import REPO_ROOT
from tta_data import JpegDataset, load_jpeg_npz

PER_CLASS = {"train": 300, "test": 100}
SEED = 0


def subset(ds: JpegDataset, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """`per_class` images of every class, drawn with `seed`, in class then archive order."""
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(np.flatnonzero(ds.labels == c), per_class, replace=False)) for c in range(10)]
    order = np.concatenate(picks)
    blobs = [ds.jpeg[ds.offsets[i] : ds.offsets[i + 1]] for i in order]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return {
        "jpeg": np.concatenate(blobs).astype(np.uint8),
        "offsets": offsets,
        "labels": ds.labels[order].astype(np.uint8),
        "classes": np.array(ds.classes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared")
    args = parser.parse_args()
    out = REPO_ROOT / "data" / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        ds = load_jpeg_npz(args.shared / "data" / "cifar10" / f"{split}_jpeg.npz")
        path = out / f"{split}_jpeg.npz"
        arrays = subset(ds, per_class, SEED)
        np.savez(
            path,
            jpeg=arrays["jpeg"],
            offsets=arrays["offsets"],
            labels=arrays["labels"],
            classes=arrays["classes"],
        )
        print(f"{path}: {10 * per_class} images, {path.stat().st_size / 1e6:.2f} MB")
    state = torch.load(args.shared / "models" / "cifar10_wrn40_2.pt", map_location="cpu", weights_only=True)
    weights = REPO_ROOT / "models" / "cifar10_wrn40_2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    print(f"{weights}: {len(state)} tensors, {weights.stat().st_size / 1e6:.2f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
