"""Replay test streams at a running server over concurrent streams.

The batches come from a replay file (:func:`load_stream_file`), which ``tta-bench stream`` writes for
corrupted CIFAR-10 test streams, or from any :data:`BatchSource`. Each stream sends its batches in order
(the next batch waits for the previous answer, as adaptation needs); streams run concurrently up to
``concurrency`` requests in flight. The run stops when the data is exhausted, ``max_requests`` requests were
sent or ``max_seconds`` elapsed. Accuracy compares each prediction's top-1 index with the label. numpy,
tqdm and Pillow are imported only when a replay runs; nothing else of the repository is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import json
import os
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
    "STREAM_FILE_FORMAT",
    "Batch",
    "BatchLike",
    "BatchRecord",
    "ErrorRecord",
    "ReplayConfig",
    "ReplayResult",
    "StreamFile",
    "count_correct",
    "format_report",
    "load_stream_file",
    "percentile",
    "run_replay",
    "save_stream_file",
    "summarize",
]

Payload = Literal["raw", "jpeg"]
_MAX_CONSECUTIVE_ERRORS = 3
_MAX_RATE_LIMIT_RETRIES = 5


class BatchLike(Protocol):
    """What a batch source yields (:class:`Batch`, and ``tta_data.StreamBatch``, fit)."""

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
    """How to replay; see ``tta replay --help`` for each field. What is replayed is the batch source's."""

    streams: int = 4
    stream_prefix: str = "replay"
    strategy: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    keep_policy: bool = False
    seed: int = 0
    payload: Payload = "raw"
    reset_first: bool = False
    adapt: bool = True
    concurrency: int | None = None
    max_requests: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
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


@dataclass
class ReplayResult:
    """Everything a replay observed."""

    config: ReplayConfig
    records: list[BatchRecord]
    errors: list[ErrorRecord]
    wall_seconds: float
    stopped_by: str | None = None
    final_streams: dict[str, StreamPublic] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Aggregated accuracy, throughput and latency (see :func:`summarize`)."""
        return summarize(self.records, self.errors, self.wall_seconds, self.stopped_by)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable report: config, data, summary, per-batch records, errors and final states."""
        return {
            "config": dataclasses.asdict(self.config),
            "data": self.data,
            "summary": self.summary(),
            "batches": [dataclasses.asdict(r) for r in self.records],
            "errors": [dataclasses.asdict(e) for e in self.errors],
            "streams": {sid: s.model_dump(mode="json") for sid, s in self.final_streams.items()},
        }


# Data: replay files.

#: Value of a replay file's ``format`` field.
STREAM_FILE_FORMAT = "tta-replay-stream/1"


@dataclass(frozen=True)
class Batch:
    """One request's images (uint8 NHWC RGB), their labels and the corruption they were made with."""

    corruption: str
    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, eq=False)
class StreamFile:
    """A replay file in memory: the images of one or more streams, cut into batches.

    Fields of the ``.npz`` (no pickles): ``images`` uint8 (N, H, W, 3) and ``labels`` int (N,), every
    stream's images one stream after the other; ``batch_offsets`` int64 (B + 1,) batch boundaries in
    ``images``; ``batch_streams`` int64 (B,) the stream of each batch (a stream's batches play in file
    order); ``batch_corruptions`` str (B,); ``meta`` a JSON string (how the file was made); ``format``
    :data:`STREAM_FILE_FORMAT`. A file with only ``images`` and ``labels`` is one stream, cut into batches
    of the loader's ``batch_size`` and named after the file.
    """

    images: np.ndarray
    labels: np.ndarray
    batch_offsets: np.ndarray
    batch_streams: np.ndarray
    batch_corruptions: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, b = len(self.labels), len(self.batch_streams)
        if self.images.dtype.name != "uint8" or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if self.images.shape[0] != n:
            raise ValueError(f"{self.images.shape[0]} images but {n} labels")
        if len(self.batch_offsets) != b + 1 or len(self.batch_corruptions) != b:
            raise ValueError("batch_offsets needs one boundary more than batch_streams and batch_corruptions")
        if b == 0:
            raise ValueError("a replay file needs at least one batch")
        offsets = [int(o) for o in self.batch_offsets]
        if offsets[0] != 0 or offsets[-1] != n or any(a >= z for a, z in itertools.pairwise(offsets)):
            raise ValueError("batch_offsets must rise strictly from 0 to the number of images")
        if sorted({int(s) for s in self.batch_streams}) != list(range(self.num_streams)):
            raise ValueError("batch_streams must number the streams 0, 1, ... without gaps")

    @property
    def num_streams(self) -> int:
        """Streams in the file."""
        return int(self.batch_streams.max()) + 1

    def batches(self, stream: int) -> list[Batch]:
        """The batches of file stream ``stream``, in order (views into the arrays)."""
        if not 0 <= stream < self.num_streams:
            raise IndexError(f"stream {stream} out of range for a file of {self.num_streams} stream(s)")
        out = []
        for i in (int(i) for i in (self.batch_streams == stream).nonzero()[0]):
            lo, hi = int(self.batch_offsets[i]), int(self.batch_offsets[i + 1])
            out.append(Batch(self.batch_corruptions[i], self.images[lo:hi], self.labels[lo:hi]))
        return out

    def images_per_stream(self, stream: int) -> int:
        """Images file stream ``stream`` sends when nothing stops it early."""
        return sum(len(b.labels) for b in self.batches(stream))

    def source(self) -> BatchSource:
        """Replay stream ``i`` plays file stream ``i % num_streams``."""
        return lambda i: self.batches(i % self.num_streams)


def load_stream_file(path: str | os.PathLike[str], batch_size: int = 64) -> StreamFile:
    """Read a replay file (see :class:`StreamFile`); ``batch_size`` cuts a file of bare images + labels."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder; tta replay reads replay files. Write one from a dataset folder (CIFAR-10-C "
            f".npy files, ImageNet-C or class folders) with: tta-bench stream --dataset {path} --out stream.npz"
        )
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with np.load(path, allow_pickle=False) as archive:
        fields = set(archive.files)
        missing = {"images", "labels"} - fields
        if missing:
            raise ValueError(
                f"{path} is no replay file: it lacks {sorted(missing)} (tta-bench stream writes them)"
            )
        if "format" in fields and str(archive["format"]) != STREAM_FILE_FORMAT:
            raise ValueError(
                f"{path}: format {str(archive['format'])!r}, this client reads {STREAM_FILE_FORMAT!r}"
            )
        images, labels = archive["images"], archive["labels"].astype(np.int64).reshape(-1)
        if "batch_offsets" in fields:
            offsets = archive["batch_offsets"].astype(np.int64)
            streams = archive["batch_streams"].astype(np.int64)
            corruptions = tuple(str(c) for c in archive["batch_corruptions"])
        else:
            offsets = np.unique(np.append(np.arange(0, len(labels), batch_size), len(labels)))
            streams = np.zeros(len(offsets) - 1, dtype=np.int64)
            corruptions = (path.stem,) * len(streams)
        meta = json.loads(str(archive["meta"])) if "meta" in fields else {}
    return StreamFile(images, labels, offsets, streams, corruptions, meta)


def save_stream_file(
    path: str | os.PathLike[str], streams: Iterable[Iterable[BatchLike]], meta: dict[str, Any] | None = None
) -> Path:
    """Write the batches of each stream in ``streams`` (in order) as a replay file; returns its path."""
    import numpy as np

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    offsets, batch_streams, corruptions = [0], [], []
    for s, batches in enumerate(streams):
        for batch in batches:
            if len(batch.labels) == 0:
                continue
            images.append(np.asarray(batch.images, dtype=np.uint8))
            labels.append(np.asarray(batch.labels, dtype=np.int64).reshape(-1))
            offsets.append(offsets[-1] + len(labels[-1]))
            batch_streams.append(s)
            corruptions.append(str(batch.corruption))
    if not images:
        raise ValueError("no batches to write")
    stream_file = StreamFile(
        np.concatenate(images),
        np.concatenate(labels),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(batch_streams, dtype=np.int64),
        tuple(corruptions),
        dict(meta or {}),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(
            f,
            format=np.array(STREAM_FILE_FORMAT),
            images=stream_file.images,
            labels=stream_file.labels,
            batch_offsets=stream_file.batch_offsets,
            batch_streams=stream_file.batch_streams,
            batch_corruptions=np.array(stream_file.batch_corruptions, dtype=str),
            meta=np.array(json.dumps(stream_file.meta)),
        )
    return path


def _encode_jpeg(images: np.ndarray) -> list[bytes]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ValueError("--payload jpeg needs Pillow: pip install 'tta-client[replay]'") from exc

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


def _progress_bar(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="replay", dynamic_ncols=True)


async def run_replay(
    client: AsyncClient,
    cfg: ReplayConfig,
    source: BatchSource | StreamFile,
    progress: bool = True,
    data: dict[str, Any] | None = None,
) -> ReplayResult:
    """Set up the streams, replay ``source`` (a :class:`StreamFile` or a :data:`BatchSource`) and collect the
    results; ``data`` describes the source in the report (default: the file's ``meta``)."""
    if isinstance(source, StreamFile):
        data = source.meta if data is None else data
        source = source.source()
    batches = [source(i) for i in range(cfg.streams)]
    await _prepare_streams(client, cfg)
    sized = all(isinstance(b, Sequence) for b in batches)
    total = sum(len(batch.labels) for b in batches for batch in b) if sized else None
    bar = _progress_bar(total, progress)
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
    return ReplayResult(cfg, run.records, run.errors, wall, run.limits.stopped_by, final, dict(data or {}))
