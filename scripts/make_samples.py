"""Write the README's sample images, docs/samples/cat.jpg and docs/samples/dog.png.

Both come from the CIFAR-10 test archive (../shared, decoded with tta_data), upscaled 4x (128x128,
bicubic) so that they look like photos in a browser; the server scales them back to 32x32. The pair is
the first (in archive order) that the README's example gets right: the served model (models.yaml) under
`tent`, on its first step, with the two files as one batch (BN statistics of two images), decoded and
resized as the server does (tta_server.codec).

    .venv/bin/python scripts/make_samples.py
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from PIL import Image

import adapters
from tta_bench.accuracy import load_handle
from tta_bench.paths import MODELS_CONFIG, REPO_ROOT, cifar10_archive
from tta_data import decode_images, load_jpeg_npz
from tta_server import codec

OUT = REPO_ROOT / "docs" / "samples"
CANDIDATES = 12  # per class


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    big = Image.fromarray(image).resize((128, 128), Image.Resampling.BICUBIC)
    big.save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def main() -> None:
    ds = load_jpeg_npz(cifar10_archive("test"))
    handle = load_handle(MODELS_CONFIG, None, "cpu")
    tent = adapters.get_strategy("tent")
    cfg = tent.parse_config({})
    cat, dog = ds.classes.index("cat"), ds.classes.index("dog")
    cats = np.flatnonzero(ds.labels == cat)[:CANDIDATES]
    dogs = np.flatnonzero(ds.labels == dog)[:CANDIDATES]
    for i, j in itertools.product(cats, dogs):
        images = decode_images(ds, [i, j])
        blobs = [encode(images[0], "JPEG"), encode(images[1], "PNG")]
        x = codec.decode_files(blobs, handle.input_size, 128 * 128).float().div(255)
        with torch.random.fork_rng(devices=[]):
            result = tent.step(handle, x, tent.init_state(handle, cfg, 0), cfg)
        if result.logits.argmax(1).tolist() == [cat, dog]:
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "cat.jpg").write_bytes(blobs[0])
            (OUT / "dog.png").write_bytes(blobs[1])
            print(f"{OUT}/cat.jpg: test image {int(i)}; {OUT}/dog.png: test image {int(j)}")
            return
    raise SystemExit(f"no pair among the first {CANDIDATES} cats and dogs is classified right under tent")


if __name__ == "__main__":
    main()
