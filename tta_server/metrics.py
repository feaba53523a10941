"""Every Prometheus metric of the service, created on an injected registry.

Only this module touches prometheus_client. Labels stay low-cardinality: model, strategy, route,
error_type, op, reason — never a stream id.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 28, 2))
ENTROPY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
UNIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
COUNT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
DISTANCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

MS = ("model", "strategy")


class Metrics:
    """Holds every metric; `names()` lists the exported family names (checked against deploy/)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "tta_requests", "HTTP requests handled, by route and status code", ("route", "status"), registry=r
        )
        self.request_errors = Counter(
            "tta_request_errors",
            "Failed requests by route and error type",
            ("route", "error_type"),
            registry=r,
        )
        self.request_duration = Histogram(
            "tta_request_duration_seconds",
            "HTTP request latency",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "tta_adaptation_step_duration_seconds",
            "Time of one strategy step (forward, and backward for gradient strategies)",
            MS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_requests = Histogram(
            "tta_step_requests",
            "Requests of one stream served by one step (queued requests are merged)",
            MS,
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.forward_streams = Histogram(
            "tta_forward_streams",
            "Streams whose steps ran in one shared forward (TTA_SHARE_FORWARD)",
            MS,
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.samples = Counter("tta_samples", "Images predicted", MS, registry=r)
        self.samples_adapted = Counter(
            "tta_samples_adapted", "Images in batches that adapted the state", MS, registry=r
        )
        self.samples_used = Counter(
            "tta_samples_used", "Images whose loss entered a parameter update", MS, registry=r
        )
        self.samples_filtered = Counter(
            "tta_samples_filtered",
            "Images excluded from the update by reliability/redundancy filters",
            MS,
            registry=r,
        )
        self.pending_requests = Gauge(
            "tta_pending_requests",
            "Predict requests admitted on this replica and not finished (the autoscaling load signal)",
            registry=r,
        )
        self.updates = Counter("tta_state_updates", "Adapting steps committed to the store", MS, registry=r)
        self.conflicts = Counter(
            "tta_state_conflicts",
            "Adapting steps discarded because another request updated the stream first",
            MS,
            registry=r,
        )
        self.state_cache = Counter(
            "tta_state_cache_lookups",
            "Steps that started from a committed state, by where it came from: hit (this replica's cache "
            "held the stored version or a newer one) or miss (decoded from the store's blob)",
            ("result",),
            registry=r,
        )
        self.state_cache_bytes = Gauge(
            "tta_state_cache_bytes",
            "Bytes of stream states this replica keeps on its device between steps (TTA_STATE_CACHE_BYTES bounds it)",
            registry=r,
        )
        self.unwritten_steps = Gauge(
            "tta_state_unwritten_steps",
            "Adapting steps this replica holds in its cache and has not yet written to the store "
            "(TTA_WRITE_BACK_STEPS > 1): what a crash of the replica would lose",
            registry=r,
        )
        self.write_backs = Counter(
            "tta_state_write_backs",
            "Writes of states held on this replica, by reason: steps (the N-th step), idle, shutdown",
            ("reason",),
            registry=r,
        )
        self.write_back_lost = Counter(
            "tta_state_write_back_lost_steps",
            "Steps held on this replica that never reached the store, by reason: conflict (another replica "
            "committed the stream first), replaced (the stream was reset, re-configured or deleted)",
            ("reason",),
            registry=r,
        )
        self.discarded = Counter(
            "tta_updates_discarded",
            "Adapting steps computed but not stored, by reason (conflict, stream_replaced, non_finite, "
            "store_unwritable, deadline)",
            (*MS, "reason"),
            registry=r,
        )
        self.stream_events = Counter(
            "tta_stream_events",
            "Stream lifecycle events: created_implicit (first predict on an unconfigured stream), "
            "lost_state (a committed state vanished from the store), lost_policy (a policy record vanished; "
            "restored from its state)",
            ("event",),
            registry=r,
        )
        self.store_writable = Gauge(
            "tta_state_store_writable",
            "0 after the state store refused a write for lack of memory",
            registry=r,
        )
        self.queue_wait = Histogram(
            "tta_queue_wait_seconds",
            "Time a predict waited for its stream (lock and merging) before its step started",
            registry=r,
        )
        self.resets = Counter(
            "tta_state_resets", "Streams returned to the source state", (*MS, "reason"), registry=r
        )
        self.state_bytes = Histogram(
            "tta_state_bytes", "Size of a stream's serialised state", MS, buckets=BYTES_BUCKETS, registry=r
        )
        self.store_duration = Histogram(
            "tta_state_store_duration_seconds",
            "State store operation latency",
            ("op",),
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "tta_state_store_up", "1 when the state store answered its last operation", registry=r
        )
        self.models_loaded = Gauge("tta_models_loaded", "Models loaded and ready", registry=r)
        # Drift signals: one observation per predicted batch, aggregated per model and strategy.
        self.entropy = Histogram(
            "tta_prediction_entropy_nats",
            "Mean prediction entropy of a batch",
            MS,
            buckets=ENTROPY_BUCKETS,
            registry=r,
        )
        self.confidence = Histogram(
            "tta_prediction_confidence_ratio",
            "Mean max-softmax confidence of a batch",
            MS,
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.bn_distance = Histogram(
            "tta_bn_distance",
            "Symmetric KL of batch BN statistics from the source's (mean over layers and channels)",
            MS,
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )
        self.class_shift = Histogram(
            "tta_class_shift_ratio",
            "Total variation between a stream's recent predicted-class distribution and the source prior",
            MS,
            buckets=UNIT_BUCKETS,
            registry=r,
        )

    def init_labels(self, models: Iterable[str], strategies: Iterable[str]) -> None:
        """Create every (model, strategy) child so dashboards show zeros rather than gaps."""
        strategies = list(strategies)
        for model in models:
            for strategy in strategies:
                for metric in (
                    self.step_duration, self.step_requests, self.forward_streams, self.samples,
                    self.samples_adapted, self.samples_used, self.samples_filtered, self.updates,
                    self.conflicts, self.state_bytes, self.entropy, self.confidence, self.bn_distance,
                    self.class_shift,
                ):  # fmt: skip
                    metric.labels(model, strategy)
        for result in ("hit", "miss"):
            self.state_cache.labels(result)
        for reason in ("steps", "idle", "shutdown"):
            self.write_backs.labels(reason)
        for reason in ("conflict", "replaced"):
            self.write_back_lost.labels(reason)
        for event in ("created_implicit", "lost_state", "lost_policy"):
            self.stream_events.labels(event)
        self.store_writable.set(1)

    def names(self) -> set[str]:
        """Exported sample names (with _total/_bucket/_sum/_count suffixes) of every metric."""
        out: set[str] = set()
        for family in self.registry.collect():
            out.add(family.name)
            kind = family.type
            if kind == "counter":
                out |= {f"{family.name}_total", f"{family.name}_created"}
            elif kind == "histogram":
                out |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        return out
