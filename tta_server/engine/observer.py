"""Per-step metrics and stream-lifecycle counters: the engine's only writer of Prometheus series."""

from __future__ import annotations

from adapters import StepResult
from tta_server.metrics import Metrics
from tta_server.records import Policy


class Observer:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def step(self, policy: Policy, result: StepResult, adapted: bool, requests: int) -> None:
        """Figures of one step, recorded once however many requests were merged into it."""
        m, labels, stats = self.metrics, (policy.model, policy.strategy), result.stats
        m.step_requests.labels(*labels).observe(requests)
        m.samples.labels(*labels).inc(stats.samples)
        m.entropy.labels(*labels).observe(stats.mean_entropy)
        m.confidence.labels(*labels).observe(stats.mean_confidence)
        if stats.bn_distance is not None:
            m.bn_distance.labels(*labels).observe(stats.bn_distance)
        if adapted:
            m.samples_adapted.labels(*labels).inc(stats.samples)
            m.samples_used.labels(*labels).inc(stats.used)
            m.samples_filtered.labels(*labels).inc(stats.filtered)

    def committed(self, policy: Policy, blob_bytes: int, class_shift: float | None) -> None:
        labels = (policy.model, policy.strategy)
        self.metrics.state_bytes.labels(*labels).observe(blob_bytes)
        self.metrics.updates.labels(*labels).inc()
        if class_shift is not None:
            self.metrics.class_shift.labels(*labels).observe(class_shift)

    def discarded(self, policy: Policy, reason: str) -> None:
        """An adapting step whose update was not stored (`reason` as in the response)."""
        self.metrics.discarded.labels(policy.model, policy.strategy, reason).inc()
        if reason == "conflict":
            self.metrics.conflicts.labels(policy.model, policy.strategy).inc()

    def reset(self, policy: Policy, reason: str) -> None:
        self.metrics.resets.labels(policy.model, policy.strategy, reason).inc()

    def lifecycle(self, event: str) -> None:
        """`created_implicit`, `lost_state`, `lost_policy`: label-free, so an alert needs no stream names."""
        self.metrics.stream_events.labels(event).inc()
