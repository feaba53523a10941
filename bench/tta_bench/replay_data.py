"""`tta-bench stream`: corrupted CIFAR-10 test streams, written to a replay file that `tta replay` sends.

Stream ``i`` is the seeded, class-balanced subset of ``--n`` test images in ``--order``, with seed
``--seed + i``, played under each corruption of ``--corruptions`` in turn (``none`` = clean images) in
batches of ``--batch-size`` (``tta_data.build_stream``). With ``--switch-after K`` every corruption but the
last is cut to its first K batches: a drift after K batches. The file format is
``tta_client.replay.StreamFile``'s; the options are kept in its ``meta`` and come back in replay reports.

    tta-bench stream --streams 4 --corruptions gaussian_noise --n 2000 --out gn5.npz
    tta replay gn5.npz --strategy alpha_bn --reset-first

With ``--dataset DIR`` the streams are drawn from a downloaded dataset folder instead of corrupting the
CIFAR-10 archive (``tta_data.layouts``: CIFAR-10-C / CIFAR-100-C ``.npy`` files, ImageNet-C folders,
class folders; ``--layout`` if detection is not enough, ``--image-size H,W`` for folders of other sizes):

    tta-bench stream --dataset ~/data/CIFAR-10-C --corruptions gaussian_noise,fog --severity 3 --out c10c.npz

(``tta replay`` reads replay files only: the client imports nothing of ``tta_data``.)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tta_bench.paths import cifar10_archive

__all__ = ["cifar_streams", "dataset_streams", "main"]


def cifar_streams(
    dataset: Any,
    corruptions: Sequence[str],
    *,
    severity: int = 5,
    n: int = 2000,
    batch_size: int = 64,
    order: str = "iid",
    delta: float = 0.1,
    seed: int = 0,
    switch_after: int | None = None,
) -> Callable[[int], Iterator[Any]]:
    """Stream ``i`` -> its batches (``tta_data.StreamBatch``), decoded and corrupted as they are drawn.

    Arguments are checked now (before any request is sent); usable as a ``tta_client.replay.BatchSource``.
    """
    from tta_data import build_stream

    corruptions = tuple(corruptions)
    if not corruptions:
        raise ValueError("corruptions must name at least one corruption ('none' for clean images)")
    for name, value in (("n", n), ("batch_size", batch_size), ("severity", severity)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if switch_after is not None and (switch_after < 1 or len(corruptions) < 2):
        raise ValueError(
            "switch_after needs a value >= 1 and at least two corruptions, e.g. none,gaussian_noise"
        )

    def part(names: Sequence[str], i: int) -> Iterator[Any]:
        return build_stream(dataset, names, severity, n, order, delta, seed + i, batch_size)  # type: ignore[arg-type]

    def batches(i: int) -> Iterator[Any]:
        if switch_after is None:
            return part(corruptions, i)
        *head, last = corruptions
        return itertools.chain(*(itertools.islice(part([c], i), switch_after) for c in head), part([last], i))

    part(corruptions, 0)  # build_stream checks its arguments eagerly
    return batches


def dataset_streams(
    root: Path,
    corruptions: Sequence[str] | None,
    *,
    layout: str | None = None,
    severity: int = 5,
    n: int | None = 2000,
    batch_size: int = 64,
    order: str = "iid",
    delta: float = 0.1,
    seed: int = 0,
    switch_after: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[Callable[[int], Iterator[Any]], list[str]]:
    """Like :func:`cifar_streams`, from the domains of a dataset folder (``corruptions`` None: all it
    holds). Returns the source and the corruptions used; every domain is opened and checked now."""
    from tta_data.layouts import domain_stream, list_domains, load_domain

    kind: Any = layout
    held = list_domains(root, kind)
    names = list(held if corruptions is None else corruptions)
    missing = [c for c in names if c not in held]
    if not names or missing:
        raise ValueError(f"{root} holds {', '.join(held)}; not {', '.join(missing) or 'nothing'}")
    if switch_after is not None and (switch_after < 1 or len(names) < 2):
        raise ValueError("switch_after needs a value >= 1 and at least two corruptions")
    domains = {c: load_domain(root, c, severity, kind, size=size) for c in names}

    def part(c: str, i: int) -> Iterator[Any]:
        return domain_stream(domains[c], n, order, delta, seed + i, batch_size)  # type: ignore[arg-type]

    for c in names:
        part(c, 0)  # checks n / order against each domain's labels

    def batches(i: int) -> Iterator[Any]:
        if switch_after is None:
            return itertools.chain(*(part(c, i) for c in names))
        *head, last = names
        return itertools.chain(*(itertools.islice(part(c, i), switch_after) for c in head), part(last, i))

    return batches, names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tta-bench stream", description="Write corrupted CIFAR-10 test streams to a `tta replay` file."
    )
    p.add_argument("--out", type=Path, required=True, help="replay file to write (.npz)")
    p.add_argument("--streams", type=int, default=4, help="streams in the file (default 4)")
    p.add_argument("--corruptions", default="gaussian_noise", help="comma-separated; 'none' means clean")
    p.add_argument("--switch-after", type=int, help="batches per stream before moving to the next corruption")
    p.add_argument("--severity", type=int, default=5, help="corruption severity 1-5 (default 5)")
    p.add_argument("--n", type=int, default=2000, help="images per corruption (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--order", choices=["iid", "sorted", "dirichlet"], default="iid", help="label order")
    p.add_argument("--delta", type=float, default=0.1, help="Dirichlet concentration for --order dirichlet")
    p.add_argument("--seed", type=int, default=0, help="base seed; stream i uses seed + i (default 0)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="folder of test_jpeg.npz (default: $TTA_DATA_DIR or ../shared/data/cifar10)",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        help="draw the streams from this dataset folder (CIFAR-10-C .npy files, ImageNet-C folders or "
        "class folders) instead of corrupting the CIFAR-10 archive; --corruptions 'all' = all it holds",
    )
    p.add_argument(
        "--layout", choices=["auto", "cifar-c", "imagenet-c", "folders"], default="auto", help="of --dataset"
    )
    p.add_argument(
        "--image-size", help="H,W to bring --dataset folder images to (default: they must share a size)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from tta_client.replay import save_stream_file
    from tta_data import load_jpeg_npz

    if args.streams < 1:
        raise ValueError(f"--streams must be >= 1, got {args.streams}")
    corruptions = tuple(c.strip() for c in args.corruptions.split(",") if c.strip())
    if args.dataset is not None:
        size = None
        if args.image_size:
            try:
                h, w = (int(v) for v in args.image_size.split(","))
            except ValueError:
                raise ValueError(f"--image-size must be H,W, got {args.image_size!r}") from None
            size = (h, w)
        source, names = dataset_streams(
            args.dataset,
            None if corruptions == ("all",) else corruptions,
            layout=None if args.layout == "auto" else args.layout,
            severity=args.severity,
            n=args.n,
            batch_size=args.batch_size,
            order=args.order,
            delta=args.delta,
            seed=args.seed,
            switch_after=args.switch_after,
            size=size,
        )
        corruptions, origin = tuple(names), f"dataset:{args.dataset}"
    else:
        dataset = load_jpeg_npz(cifar10_archive("test", args.data_dir))
        source = cifar_streams(
            dataset,
            corruptions,
            severity=args.severity,
            n=args.n,
            batch_size=args.batch_size,
            order=args.order,
            delta=args.delta,
            seed=args.seed,
            switch_after=args.switch_after,
        )
        origin = "cifar10-test"
    meta = {
        "source": origin,
        "corruptions": list(corruptions),
        "switch_after": args.switch_after,
        "severity": args.severity,
        "n": args.n,
        "batch_size": args.batch_size,
        "order": args.order,
        "delta": args.delta,
        "seed": args.seed,
        "streams": args.streams,
    }
    with tqdm(unit="batch", file=sys.stderr, disable=args.no_progress, desc="stream") as bar:

        def counted(i: int) -> Iterator[Any]:
            for batch in source(i):
                bar.update(1)
                yield batch

        return save_stream_file(args.out, (counted(i) for i in range(args.streams)), meta)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        path = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tta-bench stream: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
