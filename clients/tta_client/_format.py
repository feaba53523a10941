"""Plain-text rendering of the CLI's answers: tables, a stream's state, predictions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tta_client._models import Drift, PredictResponse, StreamPublic

__all__ = ["format_predictions", "format_stream", "format_table"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table; numeric columns are right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _format_drift(drift: Drift, indent: str = "  ") -> list[str]:
    lines = []
    for name, value in drift.model_dump().items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
        lines.append(f"{indent}{name:<20}{_cell(value)}")
    return lines


def format_stream(stream: StreamPublic) -> str:
    """A stream's policy, counters and drift as aligned lines."""
    rows = [
        ("stream", stream.stream_id),
        ("model", stream.model),
        ("strategy", stream.strategy),
        ("seed", stream.seed),
        ("config", json.dumps(stream.config, sort_keys=True)),
        ("steps", stream.steps),
        ("updates", stream.updates),
        ("samples_seen", stream.samples_seen),
        ("version", stream.version),
    ]
    return "\n".join([*(f"{k:<22}{_cell(v)}" for k, v in rows), "drift", *_format_drift(stream.drift)])


def format_predictions(names: Sequence[str], response: PredictResponse) -> str:
    """One row per image (top-1 label, probability, entropy) and a summary line."""
    rows = [
        (name, p.top_k[0].label if p.top_k else "-", p.top_k[0].probability if p.top_k else None, p.entropy)
        for name, p in zip(names, response.predictions, strict=False)
    ]
    s = response.stats
    footer = (
        f"stream {response.stream_id}  model {response.model}  strategy {response.strategy}"
        f"  adapted {_cell(response.adapted)}  version {response.version}"
        f"  used {s.used}/{s.samples}  filtered {s.filtered}  mean entropy {_cell(s.mean_entropy)}"
    )
    if response.conflict:
        footer += "  (conflict: another request updated the stream first)"
    return format_table(["file", "label", "probability", "entropy"], rows) + "\n" + footer
