"""`tta-bench accuracy`: error % of every adaptation strategy on a corrupted CIFAR-10 test stream.

All strategies run in-process (no server) on the identical stream: the same seeded, class-balanced subset
of the test split, in the same order, under each corruption. Every corruption's batches are decoded and
corrupted once, kept in memory and replayed for each strategy. Protocols (docs/ALGORITHMS.md §7.1):
``--reset per-corruption`` initialises the strategy's state before every corruption ("reset_each_shift"),
``--reset never`` runs the corruptions back to back on one state (continual).

Long-stream settings (``--setting``): ``standard`` (the above, per ``--reset``); ``continual`` (the corruptions
back to back on one state, never reset, ``--passes`` times over: pass 2 shows whether errors accumulate);
``mixed`` (every corruption's images in one seeded shuffled stream, batches mixing corruptions, one state).
The correlated setting is ``--order dirichlet`` (``--delta``) under either. ``--n-per-corruption`` (= ``--n``)
may be the full 10000 of the test split.

Output: a markdown table (rows strategies, columns corruptions + mean, error % = 100 * (1 - accuracy)) and
per-strategy wall time on stdout, a progress bar on stderr, and with ``--json FILE``
``{"results": {strategy: {corruption: error, ..., "mean": error}}, "config": {option: value}, "trace": ...}``;
``trace`` holds each strategy's error % per batch over the stream and the stream positions where the
corruption changes. With ``--plot FILE`` (default beside the JSON, ``.png``; needs the ``plot`` extra,
matplotlib) the error over the stream is drawn per strategy. In the continual setting with ``--passes 2``
the rows of the second pass are named ``<strategy> (pass 2)``.

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
SETTINGS = ("standard", "continual", "mixed")


class UsageError(Exception):
    """A bad option value: reported on stderr, exit status 2."""


@dataclass(frozen=True)
class CachedBatch:
    images: Any  # torch.Tensor, uint8 NCHW
    labels: Any  # torch.Tensor, int64
    corruptions: Any = None  # torch.Tensor, int64: each image's position in the corruption list (mixed)


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
    p.add_argument(
        "--n",
        "--n-per-corruption",
        dest="n",
        type=int,
        default=1000,
        help="images per corruption (class-balanced subset; at most the 10000 of the test split)",
    )
    p.add_argument(
        "--setting",
        choices=SETTINGS,
        default="standard",
        help="standard: per --reset; continual: corruptions back to back, never reset, --passes times; "
        "mixed: one shuffled stream over all corruptions",
    )
    p.add_argument(
        "--passes", type=int, default=1, help="passes over the continual stream (--setting continual)"
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of the error over the stream per strategy (default with --json: beside it, .png)",
    )
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
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
    if args.passes < 1:
        raise UsageError(f"--passes must be >= 1, got {args.passes}")
    if args.passes > 1 and args.setting != "continual":
        raise UsageError("--passes needs --setting continual")
    if args.setting != "standard" and args.reset != "per-corruption":
        raise UsageError("--reset applies to --setting standard only (continual and mixed never reset)")
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

    def mixed(self, corruptions: Sequence[str]) -> list[CachedBatch]:
        """Every corruption's images in one stream, shuffled with the seed, re-batched (batches mix corruptions)."""
        import numpy as np
        import torch

        parts = [self.batches(c) for c in corruptions]
        images = torch.cat([b.images for batches in parts for b in batches])
        labels = torch.cat([b.labels for batches in parts for b in batches])
        ids = torch.cat(
            [torch.full((b.labels.shape[0],), i, dtype=torch.int64) for i, bs in enumerate(parts) for b in bs]
        )
        perm = torch.from_numpy(np.random.default_rng([self.seed, 2]).permutation(labels.shape[0]))
        images, labels, ids = images[perm], labels[perm], ids[perm]
        bs = self.batch_size
        return [
            CachedBatch(images[i : i + bs], labels[i : i + bs], ids[i : i + bs])
            for i in range(0, labels.shape[0], bs)
        ]


@dataclass
class Segment:
    """A run of batches on one state, with a fresh state before it when `reset`. Its images count under
    `corruption` (None: each under its own, `CachedBatch.corruptions`), in pass `pass_index`."""

    batches: list[CachedBatch]
    reset: bool
    corruption: str | None
    pass_index: int = 0


def schedule(
    cache: StreamCache, corruptions: Sequence[str], setting: str, reset: str, passes: int
) -> list[Segment]:
    """The stream of a setting as segments of batches (docs of this module)."""
    if setting == "mixed":
        return [Segment(cache.mixed(corruptions), True, None)]
    segments = []
    for p in range(passes if setting == "continual" else 1):
        for i, c in enumerate(corruptions):
            first = p == 0 and i == 0
            fresh = first or (setting == "standard" and reset == "per-corruption")
            segments.append(Segment(cache.batches(c), fresh, c, p))
    return segments


@dataclass
class StrategyRun:
    errors: list[dict[str, float]]  # one per pass: corruption -> error %, and "mean"
    trace: list[float]  # error % of each batch, in stream order


def run_strategy(
    name: str,
    handle: Any,
    cfg: Any,
    segments: Sequence[Segment],
    corruptions: Sequence[str],
    seed: int,
    progress: Any,
    on_pass: Callable[[StrategyRun], None] | None = None,
) -> StrategyRun:
    """Error % per corruption (and "mean") of one strategy on the scheduled stream, per pass.

    `on_pass` gets the passes completed so far at the end of every pass but the last (a long multi-pass
    run that is cut short then keeps its finished passes)."""
    import torch

    import adapters

    strategy = adapters.get_strategy(name)
    state = None
    passes = max(s.pass_index for s in segments) + 1
    correct = torch.zeros(passes, len(corruptions), dtype=torch.int64)
    total = torch.zeros(passes, len(corruptions), dtype=torch.int64)
    trace: list[float] = []

    def done(passes_done: int) -> StrategyRun:
        errors = []
        for p in range(passes_done):
            row = {
                c: round(100.0 * float(1 - correct[p, i] / total[p, i]), 6) for i, c in enumerate(corruptions)
            }
            row["mean"] = round(sum(row[c] for c in corruptions) / len(corruptions), 6)
            errors.append(row)
        return StrategyRun(errors, list(trace))

    for i, seg in enumerate(segments):
        if on_pass is not None and i and seg.pass_index != segments[i - 1].pass_index:
            on_pass(done(seg.pass_index))  # passes 0 .. pass_index - 1 are complete
        if state is None or seg.reset:
            state = strategy.init_state(handle, cfg, seed)
        progress.set_postfix_str(f"{name} / {seg.corruption or 'mixed'}", refresh=False)
        for batch in seg.batches:
            x = batch.images.float().div_(255)
            adapt = x.shape[0] >= strategy.min_batch_size
            result = strategy.step(handle, x, state, cfg, adapt=adapt)
            state = result.state
            hit = (result.logits.argmax(1).cpu() == batch.labels).long()
            if seg.corruption is None:
                ids = batch.corruptions
            else:
                ids = torch.full_like(batch.labels, corruptions.index(seg.corruption))
            correct[seg.pass_index].index_add_(0, ids, hit)
            total[seg.pass_index].index_add_(0, ids, torch.ones_like(hit))
            trace.append(round(100.0 * (1 - float(hit.float().mean())), 4))
            progress.update(1)
    return done(passes)


def trace_boundaries(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """Where each segment starts in the stream: batch index, image index, corruption and pass."""
    out: list[dict[str, Any]] = []
    batch = image = 0
    for seg in segments:
        out.append(
            {
                "batch": batch,
                "image": image,
                "corruption": seg.corruption or "mixed",
                "pass": seg.pass_index + 1,
            }
        )
        batch += len(seg.batches)
        image += sum(int(b.labels.shape[0]) for b in seg.batches)
    return out


def images_seen(n_batches: int, boundaries: list[dict[str, Any]], batch_size: int) -> list[int]:
    """Images seen after each batch. A segment's last batch may be short (1000 images are 15 batches of 64
    and one of 40), so the count restarts from each segment's first image instead of batch x batch_size.
    The last segment is taken to be as long as the first (every corruption has n images)."""
    starts = {int(b["batch"]): int(b["image"]) for b in boundaries}
    order = sorted(starts)
    first_len = starts[order[1]] - starts[order[0]] if len(order) > 1 else None
    out: list[int] = []
    base_batch, base_image = 0, 0
    for i in range(n_batches):
        if i in starts:
            base_batch, base_image = i, starts[i]
        nxt = next((starts[b] for b in order if b > i), None)
        if nxt is None and first_len is not None:
            nxt = base_image + first_len
        seen = base_image + (i - base_batch + 1) * batch_size
        out.append(min(seen, nxt) if nxt is not None else seen)
    return out


def write_plot(
    path: Path, traces: dict[str, list[float]], boundaries: list[dict[str, Any]], batch_size: int, title: str
) -> None:
    """A PNG of each strategy's error over the stream (moving mean over 10 batches), corruption changes marked."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: no plot written ({path}): matplotlib is not installed (pip install 'tta-bench[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=110)
    window = 10
    for name, trace in traces.items():
        smooth = [
            sum(trace[max(0, i - window + 1) : i + 1]) / len(trace[max(0, i - window + 1) : i + 1])
            for i in range(len(trace))
        ]
        ax.plot(images_seen(len(trace), boundaries, batch_size), smooth, label=name, linewidth=1.1)
    for b in boundaries[1:]:
        ax.axvline(b["image"], color="0.8", linewidth=0.6, zorder=0)
    if len(boundaries) > 1:
        for b in boundaries:
            ax.annotate(
                b["corruption"][:8],
                (b["image"], 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=6,
                rotation=90,
                va="top",
                ha="left",
                color="0.4",
            )
    ax.set_xlabel("images seen")
    ax.set_ylabel(f"error % (moving mean over {window} batches)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


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
    parse_configs(strategies, overrides)  # a bad --config fails before the model is built

    import torch
    from tqdm import tqdm

    import adapters
    from tta_data import load_jpeg_npz

    torch.manual_seed(args.seed)
    handle = load_handle(args.models_config, args.model, args.device, args.precision)
    # As the server does: --config over the model's declared strategy_defaults.
    configs = parse_configs(strategies, {n: handle.strategy_config(n, overrides.get(n)) for n in strategies})
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
        + f", batch {args.batch_size}, setting {args.setting}"
        + (f" x{args.passes}" if args.passes > 1 else "")
        # The continual and mixed settings never reset, whatever --reset says.
        + (f", reset {args.reset}" if args.setting == "standard" else "")
        + f", seed {args.seed}",
        flush=True,
    )
    config = config_dict(args, strategies, corruptions, overrides, handle)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    failed: list[str] = []
    segments = schedule(cache, corruptions, args.setting, args.reset, args.passes)
    boundaries = trace_boundaries(segments)
    traces: dict[str, list[float]] = {}
    total = len(runnable) * sum(len(s.batches) for s in segments)
    with tqdm(
        total=total, unit="batch", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True
    ) as bar:
        for name in runnable:
            start = time.perf_counter()

            def keep(outcome: StrategyRun, name: str = name) -> None:
                results[name] = outcome.errors[0]
                for p, errs in enumerate(outcome.errors[1:], start=2):
                    results[f"{name} (pass {p})"] = errs
                traces[name] = outcome.trace
                if args.json is not None:  # after every pass, so a run that is cut short keeps its results
                    write_json(args.json, results, config, {"batches": traces, "boundaries": boundaries})

            try:
                outcome = run_strategy(
                    name, handle, configs[name], segments, corruptions, args.seed, bar, on_pass=keep
                )
            except adapters.AdaptError as exc:  # e.g. eata on a model declared without source data
                failed.append(name)
                bar.write(f"error: {name} failed: {exc}", file=sys.stderr)
                continue
            timings[name] = time.perf_counter() - start
            keep(outcome)
            bar.write(
                f"{name}: mean error {results[name]['mean']:.2f} %, {timings[name]:.1f} s", file=sys.stdout
            )

    print()
    print(format_table(results, corruptions, timings))
    if args.json is not None:
        write_json(args.json, results, config, {"batches": traces, "boundaries": boundaries})
    plot = args.plot or (args.json.with_suffix(".png") if args.json is not None else None)
    if plot is not None and not args.no_plot and traces:
        title = (
            f"{handle.model_id}, {args.setting}"
            + (f" x{args.passes}" if args.passes > 1 else "")
            + f", {len(corruptions)} corruption(s) x {args.n}, severity {args.severity}, order {args.order}, "
            f"batch {args.batch_size}, seed {args.seed}"
        )
        write_plot(plot, traces, boundaries, args.batch_size, title)
        print(f"plot: {plot}")
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


def write_json(
    path: Path,
    results: dict[str, dict[str, float]],
    config: dict[str, Any],
    trace: dict[str, Any] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload: dict[str, Any] = {"results": results, "config": config}
    if trace is not None:
        payload["trace"] = trace
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
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
        "setting": args.setting,
        "passes": args.passes,
        "config": overrides,
        "model_defaults": {
            n: dict(handle.strategy_defaults[n]) for n in strategies if n in handle.strategy_defaults
        },
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
