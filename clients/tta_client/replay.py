"""Replay a corrupted CIFAR-10 test stream at a running server over concurrent streams.

Each stream sends its batches in order (the next batch waits for the previous answer, as adaptation needs);
streams run concurrently up to ``concurrency`` requests in flight. The run stops when the data is exhausted,
``max_requests`` requests were sent or ``max_seconds`` elapsed. Accuracy compares each prediction's top-1
index with the label. numpy, tqdm, Pillow and ``tta_data`` are imported only when a replay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tta_client._client import AsyncClient
from tta_client._exceptions import APIError, RateLimitedError, TransportError
from tta_client._models import PredictResponse, StreamPublic
from tta_client._replay_stats import (
    BatchRecord,
    ErrorRecord,
    count_correct,
    format_report,
    percentile,
    summarize,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BatchLike",
    "BatchRecord",
    "ErrorRecord",
    "ReplayConfig",
    "ReplayResult",
    "cifar_source",
    "count_correct",
    "format_report",
    "percentile",
    "run_replay",
    "summarize",
]

Payload = Literal["raw", "jpeg"]
_MAX_CONSECUTIVE_ERRORS = 3
_MAX_RATE_LIMIT_RETRIES = 5


class BatchLike(Protocol):
    """What a batch source yields (``tta_data.StreamBatch`` fits)."""

    @property
    def corruption(self) -> str: ...

    @property
    def images(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...


#: Stream position -> that stream's batches, in order.
BatchSource = Callable[[int], Iterable[BatchLike]]


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay and how; see ``tta replay --help`` for each field."""

    streams: int = 4
    stream_prefix: str = "replay"
    strategy: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    keep_policy: bool = False
    corruptions: tuple[str, ...] = ("gaussian_noise",)
    switch_after: int | None = None
    severity: int = 5
    n: int = 2000
    batch_size: int = 64
    order: Literal["iid", "sorted", "dirichlet"] = "iid"
    delta: float = 0.1
    seed: int = 0
    payload: Payload = "raw"
    reset_first: bool = False
    adapt: bool = True
    concurrency: int | None = None
    max_requests: int | None = None
    max_seconds: float | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("streams", "n", "batch_size", "severity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.corruptions:
            raise ValueError("corruptions must name at least one corruption ('none' for clean images)")
        if self.switch_after is not None and (self.switch_after < 1 or len(self.corruptions) < 2):
            raise ValueError(
                "switch_after needs a value >= 1 and at least two corruptions, e.g. none,gaussian_noise"
            )
        if self.payload not in ("raw", "jpeg"):
            raise ValueError(f"payload must be 'raw' or 'jpeg', got {self.payload!r}")
        for name in ("concurrency", "max_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")

    @property
    def stream_ids(self) -> list[str]:
        """The stream ids, ``{prefix}-{i}``."""
        return [f"{self.stream_prefix}-{i}" for i in range(self.streams)]

    def images_per_stream(self) -> int:
        """Images one stream sends when nothing stops it early."""
        if self.switch_after is None:
            return self.n * len(self.corruptions)
        head = min(self.switch_after * self.batch_size, self.n) * (len(self.corruptions) - 1)
        return head + self.n


@dataclass
class ReplayResult:
    """Everything a replay observed."""

    config: ReplayConfig
    records: list[BatchRecord]
    errors: list[ErrorRecord]
    wall_seconds: float
    stopped_by: str | None = None
    final_streams: dict[str, StreamPublic] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Aggregated accuracy, throughput and latency (see :func:`summarize`)."""
        return summarize(self.records, self.errors, self.wall_seconds, self.stopped_by)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable report: config, summary, per-batch records, errors and final stream states."""
        return {
            "config": dataclasses.asdict(self.config),
            "summary": self.summary(),
            "batches": [dataclasses.asdict(r) for r in self.records],
            "errors": [dataclasses.asdict(e) for e in self.errors],
            "streams": {sid: s.model_dump(mode="json") for sid, s in self.final_streams.items()},
        }


# Data.


def cifar_source(cfg: ReplayConfig) -> BatchSource:
    """Batches from ``tta_data``: each stream ``i`` uses seed ``cfg.seed + i``; arguments are checked now."""
    from tta_data import build_stream, default_cifar10_dir, load_jpeg_npz

    folder = Path(cfg.data_dir) if cfg.data_dir else default_cifar10_dir()
    dataset = load_jpeg_npz(folder / "test_jpeg.npz")

    def batches(i: int) -> Iterator[BatchLike]:
        def part(corruptions: Sequence[str]) -> Iterator[BatchLike]:
            return build_stream(
                dataset, corruptions, cfg.severity, cfg.n, cfg.order, cfg.delta, cfg.seed + i, cfg.batch_size
            )

        if cfg.switch_after is None:
            return part(cfg.corruptions)
        *head, last = cfg.corruptions
        parts = [itertools.islice(part([c]), cfg.switch_after) for c in head]
        return itertools.chain(*parts, part([last]))

    batches(0)  # build_stream validates its arguments eagerly: fail before any request is sent
    return batches


def _encode_jpeg(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def _prepare(iterator: Iterator[BatchLike], payload: Payload) -> tuple[BatchLike, Any] | None:
    """Next batch and its request body (runs in a worker thread: decoding and corruption are CPU work)."""
    batch = next(iterator, None)
    if batch is None:
        return None
    return batch, (_encode_jpeg(batch.images) if payload == "jpeg" else batch.images)


# Running.


class _Limits:
    """Shared request budget and deadline."""

    def __init__(self, max_requests: int | None, max_seconds: float | None) -> None:
        self.remaining = max_requests
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.stopped_by: str | None = None

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped_by = self.stopped_by or "max_seconds"
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                self.stopped_by = self.stopped_by or "max_requests"
                return False
            self.remaining -= 1
        return True


@dataclass
class _Run:
    client: AsyncClient
    cfg: ReplayConfig
    limits: _Limits
    semaphore: asyncio.Semaphore
    on_batch: Callable[[BatchRecord], None]
    records: list[BatchRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)

    async def send(self, stream_id: str, body: Any) -> tuple[PredictResponse, float]:
        """The answer and its latency in seconds; waits out ``rate_limited`` answers a few times."""
        retries = 0
        while True:
            try:
                async with self.semaphore:
                    start = time.perf_counter()
                    if self.cfg.payload == "jpeg":
                        response = await self.client.predict_files(stream_id, body, self.cfg.adapt, top_k=1)
                    else:
                        response = await self.client.predict_array(stream_id, body, self.cfg.adapt, top_k=1)
                    return response, time.perf_counter() - start
            except RateLimitedError as exc:
                retries += 1
                if retries > _MAX_RATE_LIMIT_RETRIES:
                    raise
                await asyncio.sleep(min(1.0 if exc.retry_after is None else exc.retry_after, 30.0))

    async def stream(self, stream_id: str, batches: Iterable[BatchLike]) -> None:
        queue: asyncio.Queue[tuple[BatchLike, Any] | None] = asyncio.Queue(maxsize=2)
        producer = asyncio.create_task(self._produce(iter(batches), queue))
        try:
            await self._consume(stream_id, queue)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce(self, iterator: Iterator[BatchLike], queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                item = await asyncio.to_thread(_prepare, iterator, self.cfg.payload)
                await queue.put(item)
                if item is None:
                    return
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    async def _consume(self, stream_id: str, queue: asyncio.Queue[Any]) -> None:
        consecutive_errors = 0
        for index in itertools.count():
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None or not self.limits.take():
                return
            batch, body = item
            try:
                response, latency = await self.send(stream_id, body)
                correct = count_correct(response, batch.labels.tolist())
            except (APIError, TransportError, ValueError) as exc:
                error_type = getattr(exc, "error_type", None) or type(exc).__name__
                self.errors.append(ErrorRecord(stream_id, index, error_type, str(exc)))
                consecutive_errors += 1
                if consecutive_errors >= _MAX_CONSECUTIVE_ERRORS:
                    return
                continue
            consecutive_errors = 0
            record = BatchRecord(
                stream_id=stream_id,
                batch=index,
                corruption=batch.corruption,
                images=len(batch.labels),
                correct=correct,
                latency_s=latency,
                adapted=response.adapted,
                conflict=response.conflict,
                version=response.version,
                mean_entropy=response.stats.mean_entropy,
                bn_distance=response.stats.bn_distance,
            )
            self.records.append(record)
            self.on_batch(record)


async def _prepare_streams(client: AsyncClient, cfg: ReplayConfig) -> None:
    for stream_id in cfg.stream_ids:
        if cfg.strategy is not None and not cfg.keep_policy:
            await client.set_policy(stream_id, cfg.strategy, cfg.config, model=cfg.model, seed=cfg.seed)
        if cfg.reset_first:
            await client.reset_stream(stream_id)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="replay", dynamic_ncols=True)


async def run_replay(
    client: AsyncClient, cfg: ReplayConfig, source: BatchSource | None = None, progress: bool = True
) -> ReplayResult:
    """Set up the streams, replay ``source`` (default :func:`cifar_source`) and collect the results."""
    source = source or cifar_source(cfg)
    batches = [source(i) for i in range(cfg.streams)]
    await _prepare_streams(client, cfg)
    bar = _progress_bar(cfg.streams * cfg.images_per_stream(), progress)
    seen = {"images": 0, "correct": 0}

    def on_batch(record: BatchRecord) -> None:
        seen["images"] += record.images
        seen["correct"] += record.correct
        if bar is not None:
            bar.update(record.images)
            bar.set_postfix(acc=f"{seen['correct'] / seen['images']:.3f}", refresh=False)

    run = _Run(
        client=client,
        cfg=cfg,
        limits=_Limits(cfg.max_requests, cfg.max_seconds),
        semaphore=asyncio.Semaphore(cfg.concurrency or cfg.streams),
        on_batch=on_batch,
    )
    start = time.perf_counter()
    tasks = [asyncio.create_task(run.stream(sid, b)) for sid, b in zip(cfg.stream_ids, batches, strict=True)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one stream failing (e.g. a data error) stops the others
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    final: dict[str, StreamPublic] = {}
    for stream_id in cfg.stream_ids:
        with contextlib.suppress(APIError, TransportError):
            final[stream_id] = await client.get_stream(stream_id)
    return ReplayResult(cfg, run.records, run.errors, wall, run.limits.stopped_by, final)
