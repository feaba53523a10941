"""`tta-bench merge RUN.json [RUN.json ...] --out MERGED.json`: one table and one plot from several
`tta-bench accuracy --json` runs of the same stream.

Slow strategies are best run as separate processes (one per core); this puts their results side by side.
The runs must describe the same stream: model, corruptions, severity, n, batch size, order, delta, seed,
setting and data; `passes` and `strategies` may differ (a run with fewer passes ends earlier on the plot).
A strategy found in two runs is refused rather than silently taken from one of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tta_bench.accuracy import format_table, write_json, write_plot

# What makes two runs' streams the same (config keys of `tta-bench accuracy --json`).
STREAM_KEYS = (
    "model",
    "corruptions",
    "severity",
    "n",
    "batch_size",
    "order",
    "delta",
    "seed",
    "setting",
    "data_dir",
    "dataset",
    "layout",
    "precision",
)


class MergeError(ValueError):
    pass


def merge(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The merged payload: results and traces of every run, the first run's config with the union of the
    strategies and the most passes, and the boundaries of the run with the most passes."""
    if not runs:
        raise MergeError("no runs given")
    first = runs[0]["config"]
    results: dict[str, dict[str, float]] = {}
    traces: dict[str, list[float]] = {}
    longest = max(runs, key=lambda r: int(r["config"].get("passes", 1)))
    for run, name in zip(runs, names, strict=True):
        cfg = run["config"]
        differs = [k for k in STREAM_KEYS if cfg.get(k) != first.get(k)]
        if differs:
            raise MergeError(f"{name} is another stream than {names[0]}: {', '.join(differs)} differ")
        for strategy, errs in run["results"].items():
            if strategy in results:
                raise MergeError(f"{strategy!r} is in more than one run ({name})")
            results[strategy] = errs
        for strategy, trace in run.get("trace", {}).get("batches", {}).items():
            traces[strategy] = trace
    config = dict(first)
    config["strategies"] = [s for run in runs for s in run["config"].get("strategies", [])]
    config["passes"] = int(longest["config"].get("passes", 1))
    config["merged_from"] = names
    boundaries = longest.get("trace", {}).get("boundaries", [])
    return {"results": results, "config": config, "trace": {"batches": traces, "boundaries": boundaries}}


def ordered(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """First passes first, then each later pass, in the runs' order."""
    first = {k: v for k, v in results.items() if "(pass " not in k}
    later = {k: v for k, v in results.items() if "(pass " in k}
    return {**first, **dict(sorted(later.items(), key=lambda kv: kv[0].rsplit("(pass ", 1)[1]))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tta-bench merge", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="JSON files of `tta-bench accuracy --json`")
    p.add_argument("--out", type=Path, required=True, help="merged JSON; the plot goes beside it (.png)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [json.loads(path.read_text()) for path in args.runs]
        merged = merge(runs, [str(p) for p in args.runs])
    except (OSError, json.JSONDecodeError, KeyError, MergeError) as exc:
        print(f"tta-bench merge: {exc}")
        return 2
    cfg = merged["config"]
    results = ordered(merged["results"])
    write_json(args.out, results, cfg, merged["trace"])
    print(format_table(results, cfg["corruptions"]))
    if not args.no_plot and merged["trace"]["batches"]:
        plot = args.out.with_suffix(".png")
        title = (
            f"{cfg['model']}, {cfg['setting']}, {len(cfg['corruptions'])} corruption(s) x {cfg['n']}, severity "
            f"{cfg['severity']}, order {cfg['order']}, batch {cfg['batch_size']}, seed {cfg['seed']}"
        )
        write_plot(plot, merged["trace"]["batches"], merged["trace"]["boundaries"], cfg["batch_size"], title)
        print(f"plot: {plot}")
    return 0
