"""Per-stream drift figures: exponential moving averages kept in the state's meta."""

from __future__ import annotations

from typing import Any

from adapters import StepResult


def update(
    prev: dict[str, Any] | None, result: StepResult, num_classes: int, momentum: float
) -> dict[str, Any]:
    """Fold one batch into the stream's moving averages (the first batch initialises them)."""
    stats = result.stats
    class_dist = result.logits.softmax(1).mean(0).tolist()
    batch = {
        "entropy": stats.mean_entropy,
        "confidence": stats.mean_confidence,
        "bn_distance": stats.bn_distance,
        "filtered_ratio": stats.filtered / stats.samples if stats.samples else None,
    }
    out: dict[str, Any] = {}
    prev = prev or {}
    for name, value in batch.items():
        old = prev.get(name)
        out[name] = value if old is None or value is None else momentum * old + (1 - momentum) * value
    old_dist = prev.get("class_distribution")
    if old_dist is not None and len(old_dist) == num_classes:
        class_dist = [momentum * o + (1 - momentum) * n for o, n in zip(old_dist, class_dist, strict=True)]
    out["class_distribution"] = class_dist
    out["class_shift"] = total_variation(class_dist, [1.0 / num_classes] * num_classes)
    return out


def total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
