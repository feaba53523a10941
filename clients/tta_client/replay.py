"""Replay test streams at a running server over concurrent streams.

The batches come from a replay file (:func:`load_stream_file`), which ``tta-bench stream`` writes for
corrupted CIFAR-10 test streams, or from any :data:`BatchSource`. Each stream sends its batches in order
(the next batch waits for the previous answer, as adaptation needs); streams run concurrently up to
``concurrency`` requests in flight. The run stops when the data is exhausted, ``max_requests`` requests were
sent or ``max_seconds`` elapsed. Accuracy compares each prediction's top-1 index with the label. numpy,
tqdm and Pillow are imported only when a replay runs; nothing else of the repository is imported.

Edge mode (``ReplayConfig.edge``, :class:`EdgeConfig`) plays the device of a cloud-edge deployment: the
replay holds a local torch copy of the source network per stream, applies the stream's export to it
(downloaded before the first batch and every ``export_every`` batches), predicts every image locally (the
accuracy counts these predictions), and uploads only the images :func:`tta_client.edge.select_uploads`
picks (all of them without a selection) to the stream's ``predict`` with ``adapt=true``, for the server to
adapt on. It reports the images and request-body bytes uploaded against the totals, and the exports'
downloads and bytes. torch and safetensors (the ``edge`` extra) are imported in this mode only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
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

import httpx

from tta_client import edge as edge_lib
from tta_client._client import AsyncClient
from tta_client._exceptions import APIError, NotExportableError, RateLimitedError, TransportError
from tta_client._models import PredictResponse, StreamPublic
from tta_client._replay_stats import (
    BatchRecord,
    ErrorRecord,
    count_correct,
    edge_summary,
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
    "EdgeConfig",
    "ErrorRecord",
    "ReplayConfig",
    "ReplayResult",
    "StreamFile",
    "count_correct",
    "edge_summary",
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
class EdgeConfig:
    """Edge mode: predict locally with the stream's export, upload only the selected images.

    ``net`` (``package.module:callable``), ``kwargs`` and ``weights`` build the local copy of the source
    network (:func:`tta_client.edge.build_net`; for models.yaml's WRN-40-2
    ``adapters.models.wide_resnet:WideResNet``, ``{"depth": 40, "widen_factor": 2}`` and its weights file);
    ``mean``/``std`` where the served model normalises its inputs. ``upload_fraction`` or
    ``upload_max_entropy`` (nats) select the uploads (:func:`tta_client.edge.select_uploads`; at most one,
    neither uploads every image); ``export_every`` batches the export is downloaded again (and before the
    first); ``threads``: torch's intra-op threads for the local forward (None: torch's default).
    """

    net: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    upload_fraction: float | None = None
    upload_max_entropy: float | None = None
    export_every: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.upload_fraction is not None and self.upload_max_entropy is not None:
            raise ValueError("give at most one of upload_fraction and upload_max_entropy")
        if self.upload_fraction is not None and not 0.0 <= self.upload_fraction <= 1.0:
            raise ValueError(f"upload_fraction must be in [0, 1], got {self.upload_fraction}")
        if self.upload_max_entropy is not None and not self.upload_max_entropy >= 0.0:
            raise ValueError(f"upload_max_entropy must be >= 0 nats, got {self.upload_max_entropy}")
        if self.export_every < 1:
            raise ValueError(f"export_every must be >= 1, got {self.export_every}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    def select(self, probs: np.ndarray) -> np.ndarray:
        """Indices of the images to upload, ascending, for a batch's local probabilities."""
        import numpy as np

        if self.upload_fraction is None and self.upload_max_entropy is None:
            return np.arange(len(probs))
        return edge_lib.select_uploads(
            probs, fraction=self.upload_fraction, max_entropy=self.upload_max_entropy
        )


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
    edge: EdgeConfig | None = None

    def __post_init__(self) -> None:
        if self.edge is not None and not self.adapt:
            raise ValueError(
                "edge mode uploads images for the server to adapt on: it does not go with adapt=False"
            )
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
    #: Edge mode: stream id -> each answered batch's local top-1 predictions (not in ``to_json``).
    local_predictions: dict[str, list[list[int]]] = field(default_factory=dict)

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


class _BodyMeter:
    """Counts the body bytes of every predict request the client sends, per stream (an httpx request hook:
    what goes on the wire, retries included)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    async def __call__(self, request: httpx.Request) -> None:
        parts = request.url.path.rstrip("/").split("/")
        if len(parts) >= 3 and parts[-1] == "predict" and parts[-3] == "streams":
            body = await request.aread()
            self.bytes[parts[-2]] = self.bytes.get(parts[-2], 0) + len(body)


def _body_bytes(client: AsyncClient, stream_id: str, payload: Payload, body: Any) -> int:
    """Bytes of the body a predict request of ``body`` would send (built the client's way, not sent)."""
    if payload == "jpeg":
        call = client._predict_files(stream_id, body, True, 1)
    else:
        call = client._predict_array(stream_id, body, True, 1)
    request = httpx.Request(
        call.method,
        "http://edge.invalid" + call.path,
        content=call.content,
        files=call.files,
        headers=call.headers,
    )
    return len(request.read())


@dataclass
class _EdgeStream:
    """One stream's local network and what the replay knows of the stream's state."""

    net: Any
    version: int = 0
    needs_export: bool = True
    predictions: list[list[int]] = field(default_factory=list)


@dataclass
class _Run:
    client: AsyncClient
    cfg: ReplayConfig
    limits: _Limits
    semaphore: asyncio.Semaphore
    on_batch: Callable[[BatchRecord], None]
    records: list[BatchRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    edge_streams: dict[str, _EdgeStream] = field(default_factory=dict)
    meter: _BodyMeter = field(default_factory=_BodyMeter)

    async def _retrying(self, call: Callable[[], Any]) -> tuple[Any, float]:
        """``await call()`` and its latency in seconds; waits out ``rate_limited`` answers a few times."""
        retries = 0
        while True:
            try:
                async with self.semaphore:
                    start = time.perf_counter()
                    response = await call()
                    return response, time.perf_counter() - start
            except RateLimitedError as exc:
                retries += 1
                if retries > _MAX_RATE_LIMIT_RETRIES:
                    raise
                await asyncio.sleep(min(1.0 if exc.retry_after is None else exc.retry_after, 30.0))

    async def send(self, stream_id: str, body: Any) -> tuple[PredictResponse, float]:
        """The answer and its latency in seconds; waits out ``rate_limited`` answers a few times."""
        if self.cfg.payload == "jpeg":
            return await self._retrying(
                lambda: self.client.predict_files(stream_id, body, self.cfg.adapt, top_k=1)
            )
        return await self._retrying(
            lambda: self.client.predict_array(stream_id, body, self.cfg.adapt, top_k=1)
        )

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
                if self.cfg.edge is not None:
                    record = await self._edge_batch(stream_id, index, batch, body)
                else:
                    record = await self._server_batch(stream_id, index, batch, body)
            except NotExportableError:
                raise  # the strategy has no export: no batch of any stream can be played
            except (APIError, TransportError, ValueError) as exc:
                error_type = getattr(exc, "error_type", None) or type(exc).__name__
                self.errors.append(ErrorRecord(stream_id, index, error_type, str(exc)))
                consecutive_errors += 1
                if consecutive_errors >= _MAX_CONSECUTIVE_ERRORS:
                    return
                continue
            consecutive_errors = 0
            self.records.append(record)
            self.on_batch(record)

    async def _server_batch(self, stream_id: str, index: int, batch: BatchLike, body: Any) -> BatchRecord:
        response, latency = await self.send(stream_id, body)
        return BatchRecord(
            stream_id=stream_id,
            batch=index,
            corruption=batch.corruption,
            images=len(batch.labels),
            correct=count_correct(response, batch.labels.tolist()),
            latency_s=latency,
            adapted=response.adapted,
            conflict=response.conflict,
            version=response.version,
            mean_entropy=response.stats.mean_entropy,
            bn_distance=response.stats.bn_distance,
        )

    async def _edge_batch(self, stream_id: str, index: int, batch: BatchLike, body: Any) -> BatchRecord:
        """Refresh the export when due, predict locally, upload the selected images."""
        import numpy as np

        edge = self.cfg.edge
        assert edge is not None
        local = self.edge_streams[stream_id]
        start = time.perf_counter()
        exports = export_bytes = 0
        if local.needs_export or index % edge.export_every == 0:
            local.needs_export = True  # until a download succeeds
            blob, _ = await self._retrying(lambda: self.client.export_stream(stream_id))
            manifest = await asyncio.to_thread(edge_lib.load_export, local.net, blob)
            local.needs_export, local.version = False, int(manifest.get("version", local.version))
            exports, export_bytes = 1, len(blob)
        probs = await asyncio.to_thread(edge_lib.predict_probs, local.net, batch.images, edge.mean, edge.std)
        labels = np.asarray(batch.labels).reshape(-1)
        if len(probs) != len(labels):
            raise ValueError(f"{len(probs)} local predictions for {len(labels)} images")
        top1 = probs.argmax(1)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
        chosen = edge.select(probs)
        full_bytes = await asyncio.to_thread(_body_bytes, self.client, stream_id, self.cfg.payload, body)
        adapted = conflict = False
        version, bn_distance, upload_bytes = local.version, None, 0
        if len(chosen):
            part = [body[i] for i in chosen.tolist()] if self.cfg.payload == "jpeg" else body[chosen]
            sent_before = self.meter.bytes.get(stream_id, 0)
            response, _ = await self.send(stream_id, part)
            upload_bytes = self.meter.bytes.get(stream_id, 0) - sent_before
            if len(response.predictions) != len(chosen):
                raise ValueError(f"{len(response.predictions)} predictions for {len(chosen)} uploaded images")
            adapted, conflict, version = response.adapted, response.conflict, response.version
            bn_distance = response.stats.bn_distance
        local.predictions.append(top1.tolist())
        return BatchRecord(
            stream_id=stream_id,
            batch=index,
            corruption=batch.corruption,
            images=len(labels),
            correct=int((top1 == labels).sum()),
            latency_s=time.perf_counter() - start,
            adapted=adapted,
            conflict=conflict,
            version=version,
            mean_entropy=float(entropy.mean()) if len(entropy) else None,
            bn_distance=bn_distance,
            uploaded=len(chosen),
            upload_bytes=upload_bytes,
            full_bytes=full_bytes,
            exports=exports,
            export_bytes=export_bytes,
        )


async def _edge_streams(cfg: ReplayConfig) -> dict[str, _EdgeStream]:
    """Each stream's own copy of the edge network (built once, then copied)."""
    edge = cfg.edge
    assert edge is not None
    try:
        if edge.threads is not None:
            edge_lib.set_threads(edge.threads)
        net = await asyncio.to_thread(edge_lib.build_net, edge.net, edge.kwargs, edge.weights)
    except ImportError as exc:
        raise ValueError(
            f"edge mode needs torch and safetensors ({exc}): pip install 'tta-client[edge]'"
        ) from exc
    return {sid: _EdgeStream(net if i == 0 else copy.deepcopy(net)) for i, sid in enumerate(cfg.stream_ids)}


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
        edge_streams=await _edge_streams(cfg) if cfg.edge is not None else {},
    )
    # Edge mode counts the upload bytes as httpx sends them.
    hooks = client._http.event_hooks["request"] if cfg.edge is not None else []
    hooks.append(run.meter)
    start = time.perf_counter()
    tasks = [asyncio.create_task(run.stream(sid, b)) for sid, b in zip(cfg.stream_ids, batches, strict=True)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one stream failing (e.g. a data error) stops the others
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hooks.remove(run.meter)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    final: dict[str, StreamPublic] = {}
    for stream_id in cfg.stream_ids:
        with contextlib.suppress(APIError, TransportError):
            final[stream_id] = await client.get_stream(stream_id)
    local = {sid: e.predictions for sid, e in run.edge_streams.items()}
    return ReplayResult(
        cfg, run.records, run.errors, wall, run.limits.stopped_by, final, dict(data or {}), local
    )
