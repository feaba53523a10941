"""The predict pipeline, in parts with one job each:

  StreamService    policies and incarnations: PUT, reset, DELETE, what a predict's stream resolves to
  StateRepository  states: the device cache, preparing a step's state for storage, compare-and-set commit
  Scheduler        per-stream admission and locks, merging of queued requests, shared forwards
  Observer         per-step metrics and stream-lifecycle counters

A predict flows one way: `resolve` (one store round trip: policy, state record, TTL refresh) -> the
route decodes the images -> `predict` queues them on the stream -> the step and its state's host copy,
finiteness check and encoding run in one compute-thread hop -> one compare-and-set round trip -> the
answer. No HTTP here: errors are the core's, the records' or tta_server.errors' own, mapped to HTTP in
one place (tta_server.errors.to_http).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal, TypedDict, TypeVar

import torch
from safetensors.torch import save as st_save

from adapters import AdaptationState, ComposedStrategy, ModelHandle, StepResult, StrategyConfig, edge
from adapters.serialization import to_host
from tta_server.engine.observer import Observer
from tta_server.engine.repository import (
    CasOutcome,
    Prepared,
    StateRepository,
    WriteBack,
    encode_state,
    prepare,
)
from tta_server.engine.scheduler import Deadline, Pending, Scheduler
from tta_server.engine.streams import Resolved, StreamService, parse_config, strategy, validate_policy
from tta_server.errors import (
    DeadlineExceededError,
    StateCorruptError,
    StateMismatchError,
    StoreFullError,
    StoreUnavailableError,
    UnknownStreamError,
)
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool
from tta_server.records import CorruptRecordError, Policy, StateRecord
from tta_server.settings import Settings
from tta_server.state_store import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# Why an adapting request's step was not stored (None: it was, or the request did not ask to adapt).
NotAdapted = Literal["conflict", "stream_replaced", "non_finite", "store_unwritable"]


class _Resolution(TypedDict):
    """How the stream was resolved for a step: the PredictOutcome fields every outcome of it shares."""

    created: bool
    lost: str | None


@dataclass
class PredictOutcome:
    """One request's share of a step. `result` is the whole step, which may have served several merged
    requests (`requests`); this request's images are `result.logits[rows]`."""

    policy: Policy
    result: StepResult
    adapted: bool
    version: int
    rows: slice
    requests: int = 1
    not_adapted: NotAdapted | None = None
    created: bool = False
    lost: str | None = None
    durable: bool = True  # False: the update is held on this replica, not yet in the store (write-back)

    @property
    def conflict(self) -> bool:
        return self.not_adapted == "conflict"

    @property
    def logits(self) -> torch.Tensor:
        return self.result.logits[self.rows]


@dataclass(frozen=True)
class StreamView:
    policy: Policy
    meta: dict[str, Any]
    version: int


@dataclass(frozen=True)
class _Step:
    """What one step of a stream needs besides its images: resolved once per request."""

    ns: str
    stream: str
    resolved: Resolved
    handle: ModelHandle
    strat: ComposedStrategy
    cfg: StrategyConfig
    adapt: bool

    @property
    def policy(self) -> Policy:
        return self.resolved.policy


class Engine:
    def __init__(self, settings: Settings, pool: ModelPool, store: StateStore, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.store = store
        self.metrics = metrics
        devices = {h.device.type for h in pool.handles.values()}
        workers = settings.compute_workers or (4 if "cuda" in devices else 1)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tta-step")
        # Decoding has its own threads: a request's decode must not wait behind other streams' steps,
        # or requests of one stream reach its lock one by one and can never be merged.
        self.decoder = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="tta-decode"
        )
        self.observer = Observer(metrics)
        self.scheduler = Scheduler(self.executor, settings.max_step_images, settings.max_stream_queue)
        write_back = WriteBack(
            settings.write_back_steps, settings.write_back_min_bytes, settings.write_back_idle_seconds
        )
        self.repository = StateRepository(
            store,
            self.executor,
            metrics,
            settings.state_cache_size,
            settings.state_cache_bytes,
            write_back,
            {
                m: spec.max_cached_streams
                for m, spec in pool.specs.items()
                if spec.max_cached_streams is not None
            },
        )
        self._write_back_task: asyncio.Task[None] | None = None
        self.default_policy = validate_policy(
            pool, None, settings.default_strategy, settings.default_config, 0
        )
        self._store_down_since: float | None = None
        self.streams = StreamService(
            store, pool, self.observer, self.default_policy, settings.require_configured_streams
        )

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """Payload decoding, off the event loop and off the compute threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    def start(self) -> None:
        """Background work of a running server: the idle write-back of held states (write_back_steps > 1)."""
        if self.repository.write_back.steps > 1 and self._write_back_task is None:
            self._write_back_task = asyncio.create_task(self._write_back_idle())

    async def write_back(self, reason: str = "shutdown", idle_for: float = 0.0) -> int:
        """Store the held steps of every stream idle for `idle_for` seconds; the number of streams written."""
        written = 0
        for ns, stream in self.repository.held_streams(idle_for):
            async with self.scheduler.locks.hold(f"{ns}/{stream}"):
                written += await self.repository.write_back_now(ns, stream, reason)
        return written

    async def _write_back_idle(self) -> None:
        idle = self.repository.write_back.idle_seconds
        while True:
            await asyncio.sleep(min(1.0, idle / 2))
            try:
                await self.write_back("idle", idle)
            except Exception:  # keep the loop alive: the next round retries what is still held
                log.exception("idle write-back round failed")

    async def shutdown(self) -> None:
        """Stop the idle write-back and store every held state (a graceful stop loses no adaptation)."""
        if self._write_back_task is not None:
            self._write_back_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._write_back_task
            self._write_back_task = None
        written = await self.write_back("shutdown")
        left = len(self.repository.held_streams())
        if written or left:
            log.info("shutdown: %d held states written, %d could not be", written, left)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ streams
    def validate_policy(
        self, model: str | None, strategy_name: str, config: dict[str, Any] | None, seed: int
    ) -> Policy:
        return self.streams.validate(model, strategy_name, config, seed)

    # PUT, reset and DELETE leave the replica's cached state alone: it is never used under another
    # incarnation, and requests that resolved the old incarnation before the change still step on it
    # (and answer `not_adapted: "stream_replaced"`); the next commit of the stream replaces the entry.
    async def put_policy(
        self,
        ns: str,
        stream: str,
        model: str | None,
        strategy_name: str,
        config: dict[str, Any] | None,
        seed: int,
    ) -> Policy:
        new = self.validate_policy(model, strategy_name, config, seed)
        async with self.scheduler.locks.hold(f"{ns}/{stream}"):
            policy = await self.streams.put(ns, stream, new)
        return policy

    async def reset(self, ns: str, stream: str) -> Policy:
        async with self.scheduler.locks.hold(f"{ns}/{stream}"):
            policy = await self.streams.reset(ns, stream)
        return policy

    async def delete(self, ns: str, stream: str) -> None:
        await self.streams.delete(ns, stream)

    async def resolve(self, ns: str, stream: str, create: bool = True) -> Resolved:
        t0 = time.perf_counter()
        resolved = await self.streams.resolve(ns, stream, self.repository.cached_version(ns, stream), create)
        self.metrics.store_duration.labels("load").observe(time.perf_counter() - t0)
        self.metrics.store_up.set(1)
        return resolved

    async def health(self) -> dict[str, Any]:
        """Store health for /readyz: `ready` stays true through a store outage shorter than the grace
        period, so a Redis blip does not take every replica out of rotation at once."""
        now = time.monotonic()
        try:
            await self.store.ping()
            self.metrics.store_up.set(1)
            self._store_down_since = None
        except StoreUnavailableError:
            self.metrics.store_up.set(0)
            self._store_down_since = self._store_down_since or now
        down_for = now - self._store_down_since if self._store_down_since is not None else 0.0
        store = "down" if self._store_down_since is not None else "ok" if self.repository.writable else "full"
        ready = self._store_down_since is None or down_for < self.settings.store_grace_seconds
        return {"ready": ready, "store": store, "store_down_seconds": round(down_for, 1)}

    async def describe(self, ns: str, stream: str) -> StreamView:
        resolved = await self.resolve(ns, stream, create=False)
        held = self.repository.held_view(ns, stream, resolved.policy, resolved.state)
        if held is not None:  # this replica has steps of the stream the store has not yet
            return StreamView(resolved.policy, held[1], held[0])
        meta = resolved.state.meta if resolved.state is not None else {}
        return StreamView(resolved.policy, meta, resolved.version)

    async def export(self, ns: str, stream: str) -> bytes:
        """The stream's committed state as a safetensors patch of its model's network (adapters.edge), with
        the manifest (and the stream's version and incarnation) in its metadata."""
        for _ in range(self.settings.conflict_retries + 1):
            resolved = await self.resolve(ns, stream, create=False)
            policy = resolved.policy
            handle = self.pool.get(policy.model)
            strat = strategy(policy.strategy)
            cfg = parse_config(strat, policy.config)
            loaded = await self.repository.state_for(ns, stream, policy, resolved.state, handle, strat, cfg)
            if loaded is None:  # the skipped blob's cache entry is gone: read it again
                continue
            version, state = loaded
            info = {**edge.manifest(strat, handle, state, cfg), "stream_id": stream, "version": version}
            info["incarnation"] = policy.incarnation
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, _encode_patch, strat, handle, state, cfg, info
            )
        raise StateMismatchError(f"stream {stream!r} is changing too fast to export; retry")

    async def top_drift(self, ns: str, n: int) -> list[tuple[str, StreamView]]:
        """The namespace's streams with the largest BN distance; streams gone or unreadable are skipped
        (one corrupt stream must not break the namespace's board)."""
        rows = []
        for stream, _score in await self.store.top_drift(ns, n):
            try:
                view = await self.describe(ns, stream)
            except (UnknownStreamError, StateCorruptError, CorruptRecordError, StateMismatchError) as exc:
                log.info("drift board: skipping %s/%s (%s)", ns, stream, type(exc).__name__)
                continue
            drift = view.meta.get("drift")
            if isinstance(drift, dict) and drift.get("bn_distance") is not None:
                rows.append((stream, view))
        return rows

    # ------------------------------------------------------------------ predict
    async def predict(
        self,
        ns: str,
        stream: str,
        batch_u8: torch.Tensor,
        adapt: bool,
        resolved: Resolved | None = None,
        deadline: Deadline | None = None,
    ) -> PredictOutcome:
        """`resolved`: the stream as the caller already read it (the route needs its model to decode)."""
        resolved = resolved or await self.resolve(ns, stream)
        policy = resolved.policy
        handle = self.pool.get(policy.model)
        strat = strategy(policy.strategy)
        try:
            cfg = parse_config(strat, policy.config)
        except Exception as exc:  # the stored config no longer validates (strategy changed)
            raise StateMismatchError(
                f"stored policy of stream {stream!r} is not valid for {policy.strategy!r}; PUT a new policy",
                detail={"stream": stream},
            ) from exc
        # Checked per request, so whether a request fails never depends on what it was merged with.
        strat.check_batch(batch_u8, adapt)
        step = _Step(ns, stream, resolved, handle, strat, cfg, adapt)
        try:
            outcome: PredictOutcome = await self.scheduler.submit(
                f"{ns}/{stream}",
                (f"{ns}/{stream}/{policy.incarnation}", adapt),
                batch_u8,
                deadline,
                lambda group: self._serve(step, group),
            )
        except _Replaced:
            # The stream changed (reset, PUT, DELETE) after this request read it and before its step
            # could load the old state: serve it as a request that arrived after the change.
            current = await self.resolve(ns, stream)
            if current.policy.model != policy.model:
                raise StateMismatchError(
                    f"stream {stream!r} moved to model {current.policy.model!r} while this request waited; "
                    "send it again",
                    detail={"stream": stream},
                ) from None
            return await self.predict(ns, stream, batch_u8, adapt, current, deadline)
        return outcome

    async def _serve(self, step: _Step, group: list[Pending[PredictOutcome]]) -> None:
        """Run one step on the group's images and hand every member its rows (or the step's error)."""
        now = time.perf_counter()
        live = []
        for p in group:
            self.metrics.queue_wait.observe(now - p.queued_at)
            if p.gone():
                _fail(
                    p, DeadlineExceededError("the request's deadline passed while it waited for its stream")
                )
            else:
                live.append(p)
        if not live:
            return
        try:
            outcome = await self._step_and_commit(step, live)
        except BaseException as exc:
            for p in live:
                _fail(p, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.observer.step(step.policy, outcome.result, outcome.adapted, len(live))
        start = 0
        for p in live:
            n = p.x.shape[0]
            if not p.future.done():
                p.future.set_result(replace(outcome, rows=slice(start, start + n), requests=len(live)))
            start += n

    async def _step_and_commit(self, step: _Step, group: list[Pending[PredictOutcome]]) -> PredictOutcome:
        ns, stream, policy, adapt = step.ns, step.stream, step.policy, step.adapt
        x = [p.x for p in group]
        rows = slice(0, sum(b.shape[0] for b in x))
        record: StateRecord | None = step.resolved.state
        base: _Resolution = {"created": step.resolved.created, "lost": step.resolved.lost}
        for _attempt in range(self.settings.conflict_retries + 1):
            loaded = await self.repository.state_for(
                ns, stream, policy, record, step.handle, step.strat, step.cfg
            )
            if loaded is None:  # the skipped blob's cache entry is gone: read it
                record = await self._reread(step)  # _Replaced: predict() serves it under the new incarnation
                continue
            version, state = loaded
            hold = adapt and self.repository.holds(ns, stream, policy, version, state)
            result, prepared = await self._compute(step, x, state, not hold)
            if not adapt or prepared is None:
                return PredictOutcome(policy, result, False, version, rows, **base)
            if all(p.gone() for p in group):
                # Nobody waits for this answer any more: do not commit what nobody will see acknowledged.
                self.observer.discarded(policy, "deadline")
                raise DeadlineExceededError("the request's deadline passed during its step")
            if not prepared.finite:
                # Never store a broken update: the stream keeps its last good state.
                log.warning("non-finite adapted state for %s/%s discarded", ns, stream)
                self.observer.discarded(policy, "non_finite")
                self.observer.reset(policy, "non_finite_rollback")
                return PredictOutcome(policy, result, False, version, rows, not_adapted="non_finite", **base)
            blob = prepared.blob
            if blob is None:  # a held step (write-back)
                held = self.repository.hold(ns, stream, policy, version, prepared)
                if held is not None:
                    return PredictOutcome(policy, result, True, held, rows, durable=False, **base)
                # No room beside the other held states: store it now.
                blob = await self.scheduler.run(encode_state, prepared.state)
                prepared = replace(prepared, blob=blob)
            try:
                new_version = await self.repository.commit(ns, stream, policy, version, prepared)
            except StoreFullError as exc:
                log.warning("state of %s/%s not stored: %s", ns, stream, exc)
                self.observer.discarded(policy, "store_unwritable")
                return PredictOutcome(
                    policy, result, False, version, rows, not_adapted="store_unwritable", **base
                )
            if new_version > 0:
                self.observer.committed(policy, len(blob), prepared.drift.get("class_shift"))
                return PredictOutcome(policy, result, True, new_version, rows, **base)
            if new_version == CasOutcome.GONE:
                self.observer.discarded(policy, "stream_replaced")
                return PredictOutcome(
                    policy, result, False, version, rows, not_adapted="stream_replaced", **base
                )
            self.observer.discarded(policy, "conflict")
            log.info("state conflict on %s/%s (attempt %d)", ns, stream, _attempt + 1)
            try:
                record = await self._reread(step)
            except _Replaced:
                self.observer.discarded(policy, "stream_replaced")
                return PredictOutcome(
                    policy, result, False, version, rows, not_adapted="stream_replaced", **base
                )
        return PredictOutcome(policy, result, False, version, rows, not_adapted="conflict", **base)

    async def _reread(self, step: _Step) -> StateRecord | None:
        """The stream's current state record, or GONE semantics when its incarnation changed."""
        try:
            current = await self.streams.resolve(
                step.ns, step.stream, self.repository.cached_version(step.ns, step.stream), create=False
            )
        except UnknownStreamError as exc:
            raise _Replaced() from exc
        if current.policy.incarnation != step.policy.incarnation:
            raise _Replaced()
        return current.state

    async def _compute(
        self, step: _Step, x: list[torch.Tensor], state: AdaptationState, encode: bool = True
    ) -> tuple[StepResult, Prepared | None]:
        """The step and, when adapting, its state prepared for storage (`encode=False`: checked, not
        encoded, for a held step): one compute-thread hop (or one shared forward with other streams'
        steps, where the strategy allows it)."""
        if self._shares_forward(step.handle, sum(b.shape[0] for b in x)) and step.strat.can_step_many(
            step.adapt
        ):
            return await self.scheduler.shared(
                (step.policy.model, step.policy.strategy, step.policy.config, step.adapt),
                lambda: self._step_one(step, x, state, encode),
                (x, state, encode),
                lambda jobs: self._step_many(step, jobs),
            )
        return await self.scheduler.run(self._step_one, step, x, state, encode)

    def _step_one(
        self, step: _Step, x: list[torch.Tensor], state: AdaptationState, encode: bool = True
    ) -> tuple[StepResult, Prepared | None]:
        """Compute thread."""
        t0 = time.perf_counter()
        result = step.strat.step(
            step.handle, _to_unit_float(x, step.handle.device), state, step.cfg, step.adapt
        )
        if not bool(torch.isfinite(result.logits).all()):
            # The stored state itself is unusable: start over from the source state and count it.
            log.warning("non-finite predictions from a stored state; resetting to source")
            self.observer.reset(step.policy, "non_finite")
            fresh = step.strat.init_state(step.handle, step.cfg, step.policy.seed)
            fresh = fresh.with_updates(**_carry_counters(state))
            result = step.strat.step(
                step.handle, _to_unit_float(x, step.handle.device), fresh, step.cfg, step.adapt
            )
        self._observe_compute(step, time.perf_counter() - t0, 1)
        return result, self._prepare(step, result, encode)

    def _step_many(
        self, step: _Step, jobs: list[tuple[list[torch.Tensor], AdaptationState, bool]]
    ) -> list[tuple[StepResult, Prepared | None]]:
        """Compute thread: several streams' steps in one forward, each with its own statistics."""
        t0 = time.perf_counter()
        xs = [_to_unit_float(x, step.handle.device) for x, _, _ in jobs]
        results = step.strat.step_many(step.handle, xs, [s for _, s, _ in jobs], step.cfg, step.adapt)
        self._observe_compute(step, time.perf_counter() - t0, len(jobs))
        out: list[tuple[StepResult, Prepared | None]] = []
        for (x, state, encode), result in zip(jobs, results, strict=True):
            if not bool(torch.isfinite(result.logits).all()):
                out.append(self._step_one(step, x, state, encode))  # rare: redo this stream alone
            else:
                out.append((result, self._prepare(step, result, encode)))
        return out

    def _prepare(self, step: _Step, result: StepResult, encode: bool) -> Prepared | None:
        if not step.adapt:
            return None
        return prepare(result, step.policy, step.handle.num_classes, self.settings.drift_momentum, encode)

    def _observe_compute(self, step: _Step, seconds: float, streams: int) -> None:
        labels = (step.policy.model, step.policy.strategy)
        self.metrics.step_duration.labels(*labels).observe(seconds)  # compute only, no queueing
        self.metrics.forward_streams.labels(*labels).observe(streams)

    def _shares_forward(self, handle: ModelHandle, images: int) -> bool:
        if self.settings.share_forward is not None:
            return self.settings.share_forward
        # On CPU a bigger batch barely speeds convolutions up: sharing pays where the per-step overhead
        # dominates (small steps), measured 2.7x for one-image steps and slower for 16-image ResNet-50 ones.
        return handle.device.type == "cuda" or images <= self.settings.share_forward_cpu_images


class _Replaced(Exception):
    """The stream's incarnation changed during a step (reset, new policy, delete)."""


def _fail(p: Pending[Any], exc: BaseException) -> None:
    if not p.future.done():
        p.future.set_exception(exc)


def _to_unit_float(batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 NCHW batches -> one float batch in [0, 1] on `device`.

    Merged requests may arrive on different devices (JPEGs decoded on the GPU, raw arrays on the host);
    cat keeps the channels_last layout of raw uploads.
    """
    on_device = [b.to(device, non_blocking=True) for b in batches]
    x = on_device[0] if len(on_device) == 1 else torch.cat(on_device)
    return x.float().div_(255.0)


def _encode_patch(
    strat: ComposedStrategy,
    handle: ModelHandle,
    state: AdaptationState,
    cfg: StrategyConfig,
    info: dict[str, Any],
) -> bytes:
    """Compute thread: the patch's tensors on the host, in safetensors with the manifest as JSON."""
    patch = to_host(edge.edge_patch(strat, handle, state, cfg))
    return st_save(patch, metadata={edge.MANIFEST_KEY: json.dumps(info, sort_keys=True)})


def _carry_counters(state: AdaptationState) -> dict[str, Any]:
    return {k: state.meta[k] for k in ("steps", "updates", "samples_seen") if k in state.meta}


__all__ = ["Engine", "Policy", "PredictOutcome", "Resolved", "StreamView"]
