"""`tta-bench accuracy`: error % of every adaptation strategy on a corrupted CIFAR-10 test stream.

All strategies run in-process (no server) on the identical stream: the same seeded, class-balanced subset
of the test split, in the same order, under each corruption. Every corruption's batches are decoded and
corrupted once, kept in memory and replayed for each strategy. Protocols (docs/ALGORITHMS.md §7.1):
``--reset per-corruption`` initialises the strategy's state before every corruption ("reset_each_shift"),
``--reset never`` runs the corruptions back to back on one state (continual).

Output: a markdown table (rows strategies, columns corruptions + mean, error % = 100 * (1 - accuracy)) and
per-strategy wall time on stdout, a progress bar on stderr, and with ``--json FILE``
``{"results": {strategy: {corruption: error, ..., "mean": error}}, "config": {option: value}}``.

Data: by default the CIFAR-10 test archive, corrupted here (``--corruptions``, ``--severity``, seeded).
With ``--dataset DIR`` the images of a downloaded dataset folder instead (``tta_data.layouts``): the
published CIFAR-10-C / CIFAR-100-C ``.npy`` files (``<corruption>.npy``, ``labels.npy``; ``--severity``
picks the rows), ImageNet-C style folders (``<corruption>/<severity>/<class>/*``) or plain class folders
(``<class>/*``, one clean domain ``none``); ``--corruptions`` then names the folder's corruptions
(``all``: every one it holds), and the same subset and order options apply.

A trailing batch smaller than a strategy's ``min_batch_size`` is predicted without adaptation
(``adapt=False``); a strategy whose ``min_batch_size`` exceeds ``--batch-size`` is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tta_bench.paths import MODELS_CONFIG as DEFAULT_MODELS_CONFIG
from tta_bench.paths import cifar10_archive

CLEAN = "none"


class UsageError(Exception):
    """A bad option value: reported on stderr, exit status 2."""


@dataclass(frozen=True)
class CachedBatch:
    images: Any  # torch.Tensor, uint8 NCHW
    labels: Any  # torch.Tensor, int64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tta-bench accuracy",
        description="Error % per corruption of TTA strategies on a corrupted CIFAR-10 test stream.",
    )
    p.add_argument("--strategies", default="all", help="comma list of registered strategies, or 'all'")
    p.add_argument("--model", default=None, help="model id from --models-config (default: its default model)")
    p.add_argument("--models-config", type=Path, default=DEFAULT_MODELS_CONFIG, help="models YAML file")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of test_jpeg.npz (default: $TTA_DATA_DIR or <repo>/../shared/data/cifar10)",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="a dataset folder to read instead of the CIFAR-10 archive: CIFAR-10-C .npy files, "
        "ImageNet-C folders or class folders (see --layout)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "cifar-c", "imagenet-c", "folders"),
        default="auto",
        help="layout of --dataset (default: detected)",
    )
    p.add_argument(
        "--corruptions",
        default="all",
        help="comma list of corruption names ('none' = clean images), or 'all' = the 15 CIFAR-10-C types",
    )
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--n", type=int, default=1000, help="images per corruption (class-balanced subset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--order", choices=("iid", "sorted", "dirichlet"), default="iid")
    p.add_argument("--delta", type=float, default=0.1, help="Dirichlet concentration for --order dirichlet")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="forward compute dtype (default: the model's)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="stream order, subset, corruption noise and state init"
    )
    p.add_argument(
        "--reset",
        choices=("per-corruption", "never"),
        default="per-corruption",
        help="per-corruption: fresh state before each corruption; never: one continual state",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="STRATEGY=JSON",
        help="strategy hyper-parameter overrides, repeatable, e.g. --config 'tent={\"lr\": 1e-4}'",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write results and config to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_list(raw: str) -> list[str]:
    return [s.strip() for s in raw.split(",") if s.strip()]


def resolve_strategies(raw: str) -> list[str]:
    import adapters

    known = adapters.list_strategies()
    return _resolve_names(
        raw, "--strategies", "strategy", known, known, f"valid strategies: {', '.join(known)}"
    )


def resolve_corruptions(raw: str, dataset: Path | None = None, layout: str = "auto") -> list[str]:
    if dataset is not None:
        from tta_data.layouts import list_domains

        try:
            held = list_domains(dataset, None if layout == "auto" else layout)  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return _resolve_names(
            raw, "--corruptions", "corruption", held, held, f"{dataset} holds: {', '.join(held)}"
        )
    from tta_data import CORRUPTIONS

    valid = (CLEAN, *CORRUPTIONS)
    return _resolve_names(
        raw, "--corruptions", "corruption", valid, list(CORRUPTIONS), f"valid: {', '.join(valid)}, all"
    )


def _resolve_names(
    raw: str, option: str, noun: str, valid: Sequence[str], everything: list[str], valid_hint: str
) -> list[str]:
    """A comma list of names from `valid`, or "all" for `everything`; empty, unknown or repeated names are
    usage errors."""
    if raw.strip() == "all":
        return everything
    names = parse_list(raw)
    if not names:
        raise UsageError(f"{option} is empty")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"unknown {noun} {', '.join(map(repr, unknown))}; {valid_hint}")
    if len(set(names)) != len(names):
        raise UsageError(f"{option} lists a {noun} twice: {raw}")
    return names


def parse_overrides(items: Sequence[str], strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`name=JSON` items into {name: dict}; later items for the same strategy update earlier ones."""
    import adapters

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, body = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--config expects STRATEGY=JSON, got {item!r}")
        if name not in adapters.list_strategies():
            raise UsageError(
                f"--config for unknown strategy {name!r}; valid strategies: {', '.join(adapters.list_strategies())}"
            )
        if name not in strategies:
            raise UsageError(f"--config given for {name!r}, which is not among --strategies")
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {name}: invalid JSON {body!r} ({exc})") from None
        if not isinstance(value, dict):
            raise UsageError(f"--config {name}: expected a JSON object, got {body!r}")
        out.setdefault(name, {}).update(value)
    return out


def check_options(args: argparse.Namespace) -> None:
    from tta_data import SEVERITIES

    if args.severity not in SEVERITIES:
        raise UsageError(f"--severity must be one of {list(SEVERITIES)}, got {args.severity}")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not args.delta >= 0:
        raise UsageError(f"--delta must be >= 0, got {args.delta}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def load_handle(
    models_config: Path, model_id: str | None, device: str, precision: Literal["fp32", "bf16"] | None = None
) -> Any:
    from adapters.models import build_handle
    from tta_server.model_pool import read_models_file, resolve_device

    try:
        models = read_models_file(models_config)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    specs = {m.id: m for m in models.models}
    chosen = model_id or models.default_model or models.models[0].id
    if chosen not in specs:
        raise UsageError(f"unknown model {chosen!r} in {models_config}; declared: {', '.join(specs)}")
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    return build_handle(specs[chosen], dev, precision=precision)


class StreamCache:
    """Each corruption's batches, decoded and corrupted on first use and kept in memory.

    ``source`` (corruption -> its ``StreamBatch`` iterator) replaces the corrupted CIFAR-10 archive, e.g.
    the domains of a ``--dataset`` folder."""

    def __init__(
        self,
        dataset: Any,
        severity: int,
        n: int,
        order: str,
        delta: float,
        seed: int,
        bs: int,
        source: Callable[[str], Iterable[Any]] | None = None,
    ) -> None:
        self.dataset, self.severity, self.n, self.order = dataset, severity, n, order
        self.delta, self.seed, self.batch_size = delta, seed, bs
        self.source = source
        self._batches: dict[str, list[CachedBatch]] = {}

    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def batches(self, corruption: str) -> list[CachedBatch]:
        cached = self._batches.get(corruption)
        if cached is None:
            import torch

            from tta_data import build_stream

            stream = (
                self.source(corruption)
                if self.source is not None
                else build_stream(
                    self.dataset,
                    [corruption],
                    severity=self.severity,
                    n_per_corruption=self.n,
                    order=self.order,  # type: ignore[arg-type]
                    delta=self.delta,
                    seed=self.seed,
                    batch_size=self.batch_size,
                )
            )
            cached = [
                CachedBatch(
                    images=torch.from_numpy(b.images).permute(0, 3, 1, 2).contiguous(),
                    labels=torch.from_numpy(b.labels),
                )
                for b in stream
            ]
            self._batches[corruption] = cached
        return cached


def run_strategy(
    name: str,
    handle: Any,
    cfg: Any,
    cache: StreamCache,
    corruptions: Sequence[str],
    reset: str,
    seed: int,
    progress: Any,
) -> dict[str, float]:
    """Error % per corruption (and "mean") of one strategy on the cached stream."""
    import adapters

    strategy = adapters.get_strategy(name)
    state = None
    errors: dict[str, float] = {}
    for corruption in corruptions:
        batches = cache.batches(corruption)
        if state is None or reset == "per-corruption":
            state = strategy.init_state(handle, cfg, seed)
        correct = total = 0
        progress.set_postfix_str(f"{name} / {corruption}", refresh=False)
        for batch in batches:
            x = batch.images.float().div_(255)
            adapt = x.shape[0] >= strategy.min_batch_size
            result = strategy.step(handle, x, state, cfg, adapt=adapt)
            state = result.state
            pred = result.logits.argmax(1).cpu()
            correct += int((pred == batch.labels).sum())
            total += int(batch.labels.shape[0])
            progress.update(1)
        errors[corruption] = round(100.0 * (total - correct) / total, 6)
    errors["mean"] = round(sum(errors[c] for c in corruptions) / len(corruptions), 6)
    return errors


def format_table(
    results: dict[str, dict[str, float]], corruptions: Sequence[str], timings: dict[str, float] | None = None
) -> str:
    """A markdown table: rows strategies, columns corruptions + mean (+ wall time in seconds).

    Errors get one decimal, the mean two: with 1000 images per corruption a difference of a few images
    between strategies would otherwise vanish in the rounding.
    """
    header = ["strategy", *corruptions, "mean"]
    if timings is not None:
        header.append("time (s)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, errs in results.items():
        row = [name, *(f"{errs[c]:.1f}" for c in corruptions), f"{errs['mean']:.2f}"]
        if timings is not None:
            row.append(f"{timings.get(name, float('nan')):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_configs(strategies: Sequence[str], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each strategy's validated config: defaults updated by its `--config` overrides."""
    import adapters

    configs: dict[str, Any] = {}
    for name in strategies:
        try:
            configs[name] = adapters.get_strategy(name).parse_config(overrides.get(name, {}))
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise UsageError(f"--config {name}: {exc}") from None
    return configs


def select_runnable(strategies: Sequence[str], batch_size: int) -> list[str]:
    """The strategies that can adapt on batches of `batch_size`; the others are skipped with a note."""
    import adapters

    runnable = []
    for name in strategies:
        need = adapters.get_strategy(name).min_batch_size
        if need > batch_size:
            print(f"note: skipping {name}: needs batches of >= {need} images, --batch-size is {batch_size}")
        else:
            runnable.append(name)
    return runnable


def run(args: argparse.Namespace) -> int:
    check_options(args)
    strategies = resolve_strategies(args.strategies)
    corruptions = resolve_corruptions(args.corruptions, args.dataset, args.layout)
    overrides = parse_overrides(args.config, strategies)

    configs = parse_configs(strategies, overrides)

    import torch
    from tqdm import tqdm

    import adapters
    from tta_data import load_jpeg_npz

    torch.manual_seed(args.seed)
    handle = load_handle(args.models_config, args.model, args.device, args.precision)
    if args.dataset is not None:
        cache = StreamCache(
            None, args.severity, args.n, args.order, args.delta, args.seed, args.batch_size,
            source=dataset_source(args, handle.input_size, corruptions),
        )  # fmt: skip
    else:
        try:
            dataset = load_jpeg_npz(cifar10_archive("test", args.data_dir))
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        cache = StreamCache(
            dataset, args.severity, args.n, args.order, args.delta, args.seed, args.batch_size
        )
        try:  # checks the subset / order arguments before any model work (e.g. Dirichlet with too few images)
            from tta_data import stream_indices

            stream_indices(dataset.labels, args.n, args.order, args.delta, args.seed)
        except ValueError as exc:
            raise UsageError(f"cannot build the stream: {exc}") from None

    runnable = select_runnable(strategies, args.batch_size)

    print(
        f"model {handle.model_id} on {handle.device}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {platform.machine()}; {len(corruptions)} corruption(s) x {args.n} images, severity "
        f"{args.severity}, order {args.order}"
        + (f" (delta {args.delta})" if args.order == "dirichlet" else "")
        + f", batch {args.batch_size}, reset {args.reset}, seed {args.seed}",
        flush=True,
    )
    config = config_dict(args, strategies, corruptions, overrides, handle)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    failed: list[str] = []
    total = len(runnable) * len(corruptions) * cache.num_batches()
    with tqdm(
        total=total, unit="batch", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True
    ) as bar:
        for name in runnable:
            for corruption in corruptions:  # stream preparation is not charged to the first strategy
                cache.batches(corruption)
            start = time.perf_counter()
            try:
                results[name] = run_strategy(
                    name, handle, configs[name], cache, corruptions, args.reset, args.seed, bar
                )
            except adapters.AdaptError as exc:  # e.g. eata on a model declared without source data
                failed.append(name)
                bar.write(f"error: {name} failed: {exc}", file=sys.stderr)
                continue
            timings[name] = time.perf_counter() - start
            if args.json is not None:  # after every strategy, so a run that is cut short keeps its results
                write_json(args.json, results, config)
            bar.write(
                f"{name}: mean error {results[name]['mean']:.2f} %, {timings[name]:.1f} s", file=sys.stdout
            )

    print()
    print(format_table(results, corruptions, timings))
    if args.json is not None:
        write_json(args.json, results, config)
    if failed:
        print(f"tta-bench accuracy: {len(failed)} strategy(ies) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def dataset_source(
    args: argparse.Namespace, size: tuple[int, int], corruptions: Sequence[str]
) -> Callable[[str], Iterator[Any]]:
    """Corruption -> its batches from the ``--dataset`` folder; every corruption is opened (and its stream
    arguments checked) now, before any model work."""
    from tta_data.layouts import domain_stream, load_domain

    layout = None if args.layout == "auto" else args.layout
    domains = {}
    for name in corruptions:
        try:
            domain = load_domain(args.dataset, name, args.severity, layout, size=(int(size[0]), int(size[1])))
            domain_stream(domain, args.n, args.order, args.delta, args.seed, args.batch_size)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--dataset {args.dataset}: {exc}") from None
        domains[name] = domain

    def source(name: str) -> Iterator[Any]:
        return domain_stream(domains[name], args.n, args.order, args.delta, args.seed, args.batch_size)

    return source


def write_json(path: Path, results: dict[str, dict[str, float]], config: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"results": results, "config": config}, indent=2) + "\n")
    tmp.replace(path)


def config_dict(
    args: argparse.Namespace,
    strategies: Sequence[str],
    corruptions: Sequence[str],
    overrides: dict[str, dict[str, Any]],
    handle: Any,
) -> dict[str, Any]:
    return {
        "model": handle.model_id,
        "models_config": str(args.models_config),
        "data_dir": str(args.data_dir) if args.data_dir is not None else None,
        "dataset": str(args.dataset) if args.dataset is not None else None,
        "layout": args.layout if args.dataset is not None else None,
        "strategies": list(strategies),
        "corruptions": list(corruptions),
        "severity": args.severity,
        "n": args.n,
        "batch_size": args.batch_size,
        "order": args.order,
        "delta": args.delta,
        "device": args.device,
        "precision": "bf16" if handle.autocast_dtype is not None else "fp32",
        "seed": args.seed,
        "reset": args.reset,
        "config": overrides,
        "threads": args.threads,
    }


def run_with_threads(args: argparse.Namespace) -> int:
    """`run` with `--threads` applied, restoring torch's thread count afterwards (for in-process callers)."""
    if args.threads is None:
        return run(args)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help or a usage error: return argparse's status instead of exiting
        return int(exc.code or 0)
    try:
        return run_with_threads(args)
    except UsageError as exc:
        print(f"tta-bench accuracy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
