"""Pure parts of a replay: per-request records, accuracy and latency aggregation, the text report."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tta_client._models import PredictResponse

__all__ = [
    "BatchRecord",
    "ErrorRecord",
    "count_correct",
    "edge_summary",
    "format_report",
    "percentile",
    "summarize",
]


@dataclass(frozen=True)
class BatchRecord:
    """The outcome of one answered predict request."""

    stream_id: str
    batch: int
    corruption: str
    images: int
    correct: int
    latency_s: float
    adapted: bool
    conflict: bool
    version: int
    mean_entropy: float | None = None
    bn_distance: float | None = None
    # Edge mode (``ReplayConfig.edge``): ``correct`` counts the local predictions; these say what was sent.
    #: Images of this batch uploaded for adaptation (None: not an edge replay, every image was sent).
    uploaded: int | None = None
    #: Request body bytes sent for them (0 without an upload), and what sending the whole batch would take.
    upload_bytes: int | None = None
    full_bytes: int | None = None
    #: Exports downloaded before this batch was predicted, and their bytes.
    exports: int = 0
    export_bytes: int = 0


@dataclass(frozen=True)
class ErrorRecord:
    """A predict request that failed."""

    stream_id: str
    batch: int
    error_type: str
    message: str


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``; ``None`` if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def count_correct(response: PredictResponse, labels: Sequence[int]) -> int:
    """How many top-1 predictions equal their label."""
    if len(response.predictions) != len(labels):
        raise ValueError(f"{len(response.predictions)} predictions for {len(labels)} images")
    return sum(int(p.top_k[0].index == int(y)) for p, y in zip(response.predictions, labels, strict=True))


def _accuracy(correct: int, images: int) -> float | None:
    return correct / images if images else None


def _empty_group() -> dict[str, Any]:
    return {"images": 0, "correct": 0, "requests": 0, "adapted": 0, "conflicts": 0, "errors": 0}


def _group(
    records: Iterable[BatchRecord],
    errors: Iterable[tuple[str, int]],
    key: Callable[[BatchRecord], str],
    sort: bool = True,
) -> dict[str, dict[str, Any]]:
    """Totals per ``key`` (sorted, or in order of first appearance); ``errors`` are ``(key, count)`` pairs."""
    groups: dict[str, dict[str, Any]] = defaultdict(_empty_group)
    for r in records:
        g = groups[key(r)]
        g["images"] += r.images
        g["correct"] += r.correct
        g["requests"] += 1
        g["adapted"] += int(r.adapted)
        g["conflicts"] += int(r.conflict)
    for name, count in errors:
        groups[name]["errors"] += count
    for g in groups.values():
        g["accuracy"] = _accuracy(g["correct"], g["images"])
    return dict(sorted(groups.items())) if sort else dict(groups)


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _edge_totals(records: Iterable[BatchRecord]) -> dict[str, Any]:
    g: dict[str, Any] = {"images": 0, "uploaded": 0, "upload_requests": 0, "upload_bytes": 0, "full_bytes": 0}
    g |= {"exports": 0, "export_bytes": 0}
    for r in records:
        g["images"] += r.images
        g["uploaded"] += r.uploaded or 0
        g["upload_requests"] += int(bool(r.uploaded))
        g["upload_bytes"] += r.upload_bytes or 0
        g["full_bytes"] += r.full_bytes or 0
        g["exports"] += r.exports
        g["export_bytes"] += r.export_bytes
    g["uploaded_share"] = _share(g["uploaded"], g["images"])
    g["upload_bytes_share"] = _share(g["upload_bytes"], g["full_bytes"])
    return g


def edge_summary(records: Sequence[BatchRecord]) -> dict[str, Any] | None:
    """What an edge replay sent and downloaded, overall and per stream; None for other replays.

    ``uploaded``/``images``: images uploaded of those predicted locally; ``upload_bytes``: the request
    bodies actually sent, ``full_bytes``: the bodies uploading every image would have sent; ``exports``,
    ``export_bytes``: export downloads.
    """
    edge = [r for r in records if r.uploaded is not None]
    if not edge:
        return None
    streams: dict[str, list[BatchRecord]] = defaultdict(list)
    for r in edge:
        streams[r.stream_id].append(r)
    return _edge_totals(edge) | {"per_stream": {k: _edge_totals(v) for k, v in sorted(streams.items())}}


def summarize(
    records: Sequence[BatchRecord],
    errors: Sequence[ErrorRecord] = (),
    wall_seconds: float = 0.0,
    stopped_by: str | None = None,
) -> dict[str, Any]:
    """Overall, per-stream and per-corruption accuracy; throughput; latency percentiles in milliseconds."""
    images = sum(r.images for r in records)
    correct = sum(r.correct for r in records)
    latencies_ms = [r.latency_s * 1000 for r in records]
    return {
        "images": images,
        "correct": correct,
        "accuracy": _accuracy(correct, images),
        "requests": len(records),
        "errors": len(errors),
        "errors_by_type": dict(Counter(e.error_type for e in errors)),
        "adapted": sum(int(r.adapted) for r in records),
        "conflicts": sum(int(r.conflict) for r in records),
        "wall_seconds": wall_seconds,
        "throughput_images_per_s": images / wall_seconds if wall_seconds > 0 else None,
        "latency_ms": {
            "p50": percentile(latencies_ms, 50),
            "p90": percentile(latencies_ms, 90),
            "p99": percentile(latencies_ms, 99),
            "mean": sum(latencies_ms) / len(latencies_ms) if latencies_ms else None,
            "max": max(latencies_ms, default=None),
        },
        "stopped_by": stopped_by,
        "per_stream": _group(records, Counter(e.stream_id for e in errors).items(), lambda r: r.stream_id),
        "per_corruption": _group(records, (), lambda r: r.corruption, sort=False),
        "edge": edge_summary(records),
    }


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _format_edge(edge: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"edge: uploaded {edge['uploaded']} of {edge['images']} images ({_pct(edge['uploaded_share'])}) in"
        f" {edge['upload_requests']} requests, {edge['upload_bytes']} of {edge['full_bytes']} body bytes"
        f" ({_pct(edge['upload_bytes_share'])}); {edge['exports']} exports downloaded,"
        f" {edge['export_bytes']} bytes",
    ]
    groups = edge["per_stream"]
    width = max([len("stream"), *(len(k) for k in groups)])
    lines.append(
        f"{'stream':<{width}}  {'images':>7}  {'uploaded':>8}  {'upload_bytes':>12}  {'full_bytes':>12}"
        f"  {'exports':>7}  {'export_bytes':>12}"
    )
    for key, g in groups.items():
        lines.append(
            f"{key:<{width}}  {g['images']:>7}  {g['uploaded']:>8}  {g['upload_bytes']:>12}"
            f"  {g['full_bytes']:>12}  {g['exports']:>7}  {g['export_bytes']:>12}"
        )
    return lines


def format_report(summary: dict[str, Any]) -> str:
    """A human-readable report of a :func:`summarize` result."""
    lat = summary["latency_ms"]
    lines = [
        f"images {summary['images']}  requests {summary['requests']}  errors {summary['errors']}"
        f"  adapted {summary['adapted']}  conflicts {summary['conflicts']}",
        f"accuracy {_fmt(summary['accuracy'])}",
        f"throughput {_fmt(summary['throughput_images_per_s'], '.1f')} images/s"
        f" over {summary['wall_seconds']:.2f} s",
        f"latency ms  p50 {_fmt(lat['p50'], '.1f')}  p90 {_fmt(lat['p90'], '.1f')}  p99 {_fmt(lat['p99'], '.1f')}",
    ]
    if summary["stopped_by"]:
        lines.append(f"stopped early by {summary['stopped_by']}")
    if summary["errors_by_type"]:
        lines.append("errors " + ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors_by_type"].items())))
    for title, groups in (("stream", summary["per_stream"]), ("corruption", summary["per_corruption"])):
        width = max([len(title), *(len(k) for k in groups)])
        lines.append("")
        lines.append(f"{title:<{width}}  {'images':>7}  {'accuracy':>8}  {'requests':>8}  {'errors':>6}")
        for key, g in groups.items():
            lines.append(
                f"{key:<{width}}  {g['images']:>7}  {_fmt(g['accuracy']):>8}  {g['requests']:>8}"
                f"  {g.get('errors', 0):>6}"
            )
    if summary.get("edge"):
        lines.extend(_format_edge(summary["edge"]))
    return "\n".join(lines)
