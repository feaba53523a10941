"""One adaptation step per request: resolve the stream's policy, load its state, run the strategy,
commit the new state with compare-and-set, and report stats. No HTTP here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

import adapters
from adapters import AdaptationState, ComposedStrategy, ModelHandle, StepResult, StrategyConfig
from adapters.serialization import CorruptStateError, state_from_bytes, state_to_bytes, to_host
from tta_server import drift
from tta_server.errors import (
    StateCorruptError,
    StateMismatchError,
    UnknownStrategyError,
    UnknownStreamError,
    ValidationError,
    from_core,
)
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool
from tta_server.settings import Settings
from tta_server.state_store import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    model: str
    strategy: str
    config: dict[str, Any]
    seed: int = 0
    epoch: int = 0

    def config_hash(self) -> str:
        raw = json.dumps([self.model, self.strategy, self.config, self.seed], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class PredictOutcome:
    """One request's share of an adaptation step.

    `result` is the whole step, which may have served several merged requests (`requests`); this
    request's images are `result.logits[rows]`.
    """

    policy: Policy
    result: StepResult
    adapted: bool
    conflict: bool
    version: int
    rows: slice
    requests: int = 1

    @property
    def logits(self) -> torch.Tensor:
        return self.result.logits[self.rows]


@dataclass(frozen=True)
class _StepContext:
    """What one step of a stream needs besides its images: resolved once per request."""

    ns: str
    stream: str
    policy: Policy
    handle: ModelHandle
    strat: ComposedStrategy
    cfg: StrategyConfig
    adapt: bool

    @property
    def key(self) -> str:
        return f"{self.ns}:{self.stream}:{self.policy.epoch}"


@dataclass(eq=False)
class _SharedJob:
    """One stream's step waiting to share a forward with other streams' steps."""

    x: list[torch.Tensor]  # uint8 batches of the stream's merged requests
    state: AdaptationState
    future: asyncio.Future[StepResult]


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


@dataclass(eq=False)
class _Pending:
    """A request waiting for its stream; whoever holds the stream lock may serve it in a merged step."""

    x: torch.Tensor
    future: asyncio.Future[PredictOutcome]


class _StreamLocks:
    """One asyncio.Lock per stream, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


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
        self.locks = _StreamLocks()
        # Requests queued behind a stream's lock, per (stream state key, adapt): merged into one step.
        self._queues: dict[tuple[str, bool], list[_Pending]] = {}
        self._inflight: set[asyncio.Future[None]] = set()  # merged steps running (kept referenced)
        # Steps of different streams waiting for a compute thread, per (model, strategy, config, adapt).
        self._shared: dict[tuple[str, ...], list[_SharedJob]] = {}
        self._shared_lock = threading.Lock()
        # Latest committed state per stream, kept on the device; used only when its version is current.
        self._cache: OrderedDict[str, tuple[int, AdaptationState]] = OrderedDict()
        self.default_policy = self.validate_policy(
            None, settings.default_strategy, settings.default_config, 0
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Torch work happens off the event loop, in the step executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """Payload decoding, off the event loop and off the step threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- policies
    def validate_policy(
        self, model: str | None, strategy: str, config: dict[str, Any] | None, seed: int
    ) -> Policy:
        handle = self.pool.get(model)
        strat = self.strategy(strategy)
        try:
            cfg = strat.parse_config(config or {})
        except Exception as exc:  # pydantic.ValidationError: report every bad field
            errors = getattr(exc, "errors", None)
            detail = errors(include_url=False, include_context=False) if errors else str(exc)
            raise ValidationError(f"invalid config for strategy {strategy!r}", detail=detail) from exc
        try:
            strat.check_model(handle)
        except adapters.AdaptError as exc:
            raise from_core(exc) from exc
        return Policy(handle.model_id, strategy, cfg.model_dump(mode="json"), seed)

    @staticmethod
    def strategy(name: str) -> ComposedStrategy:
        try:
            return adapters.get_strategy(name)
        except adapters.UnknownStrategyError as exc:
            raise UnknownStrategyError(str(exc)) from exc

    async def get_policy(self, ns: str, stream: str) -> Policy | None:
        try:
            rec = await self.store.get_policy(ns, stream)
            return Policy(**rec) if rec else None
        except (ValueError, TypeError) as exc:  # undecodable JSON, missing or unknown fields
            raise StateCorruptError(
                f"stored policy of stream {stream!r} is corrupt; PUT a policy or DELETE the stream",
                detail={"stream": stream},
            ) from exc

    async def put_policy(
        self, ns: str, stream: str, model: str | None, strategy: str, config: dict[str, Any] | None, seed: int
    ) -> Policy:
        new = self.validate_policy(model, strategy, config, seed)
        async with self.locks.hold(f"{ns}:{stream}"):
            try:
                old = await self.get_policy(ns, stream)
                epoch = (old.epoch + 1) if old else 0
            except StateCorruptError:
                # A new policy replaces a corrupt record; its epoch is unknown, so take one no old state has.
                old, epoch = None, int(time.time())
            if old is not None and (old.model, old.strategy, old.config, old.seed) == (
                new.model,
                new.strategy,
                new.config,
                new.seed,
            ):
                return old
            # A new epoch points at a fresh state key: in-flight writes of the old policy cannot leak into it.
            policy = Policy(new.model, new.strategy, new.config, new.seed, epoch)
            await self.store.set_policy(ns, stream, policy.__dict__)
            return policy

    async def reset(self, ns: str, stream: str, reason: str = "api") -> Policy:
        async with self.locks.hold(f"{ns}:{stream}"):
            old = await self.get_policy(ns, stream)
            if old is None:
                raise UnknownStreamError(f"stream {stream!r} does not exist")
            policy = Policy(old.model, old.strategy, old.config, old.seed, old.epoch + 1)
            await self.store.set_policy(ns, stream, policy.__dict__)
            self.metrics.resets.labels(policy.model, policy.strategy, reason).inc()
            return policy

    async def delete(self, ns: str, stream: str) -> None:
        try:
            policy = await self.get_policy(ns, stream)
        except StateCorruptError:
            policy = Policy("", "", {}, epoch=0)  # drop the corrupt record (its states expire)
        if policy is None:
            raise UnknownStreamError(f"stream {stream!r} does not exist")
        await self.store.delete_stream(ns, stream, policy.epoch)
        self._cache.pop(f"{ns}:{stream}:{policy.epoch}", None)

    async def describe(self, ns: str, stream: str) -> tuple[Policy, dict[str, Any], int]:
        policy = await self.get_policy(ns, stream)
        if policy is None:
            raise UnknownStreamError(f"stream {stream!r} does not exist")
        stored = await self.store.get_state(ns, stream, policy.epoch, with_blob=False)
        return policy, (stored.meta if stored else {}), (stored.version if stored else 0)

    # ------------------------------------------------------------------ predict
    async def predict(
        self,
        ns: str,
        stream: str,
        batch_u8: torch.Tensor,
        adapt: bool,
        policy: Policy | None = None,
        deadline: Any = None,  # tta_server.admission.Deadline: not honoured yet
    ) -> PredictOutcome:
        """`policy`: the stream's stored policy when the caller already read it (saves a store round trip)."""
        policy = policy or await self.get_policy(ns, stream)
        if policy is None:
            await self.store.set_policy(ns, stream, self.default_policy.__dict__, only_if_new=True)
            policy = await self.get_policy(ns, stream) or self.default_policy
        handle = self.pool.get(policy.model)
        strat = self.strategy(policy.strategy)
        try:
            cfg = strat.parse_config(policy.config)
        except ValueError as exc:  # pydantic: the stored config no longer validates
            raise StateMismatchError(
                f"stored policy of stream {stream!r} is not valid for {policy.strategy!r}; PUT a new policy",
                detail={"stream": stream},
            ) from exc
        try:
            # Checked per request, so whether a request fails never depends on what it was merged with.
            strat.check_batch(batch_u8, adapt)
        except adapters.AdaptError as exc:
            raise from_core(exc) from exc
        ctx = _StepContext(ns, stream, policy, handle, strat, cfg, adapt)
        me = _Pending(batch_u8, asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault((ctx.key, adapt), [])
        queue.append(me)
        try:
            async with self.locks.hold(ctx.key):
                if me in queue:  # not yet taken into the step of a request ahead of it
                    # Shielded: if this request is cancelled (client gone), the step still runs to the
                    # end for the requests merged into it.
                    task = asyncio.ensure_future(self._serve(ctx, self._take(queue, me)))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                    await asyncio.shield(task)
        finally:
            if me in queue:
                queue.remove(me)  # cancelled while waiting
            if not queue:
                self._queues.pop((ctx.key, adapt), None)
        # Done, or still running in the step of a request ahead of it that was cancelled meanwhile.
        return await me.future

    def _take(self, queue: list[_Pending], me: _Pending) -> list[_Pending]:
        """`me` plus the requests queued behind it, oldest first, up to `max_step_images` in all."""
        queue.remove(me)
        group = [me, *queue]
        n = _fitting([p.x.shape[0] for p in group], self.settings.max_step_images)
        del queue[: n - 1]
        return group[:n]

    async def _serve(self, ctx: _StepContext, group: list[_Pending]) -> None:
        """Run one step on the group's images and hand every member its rows (or the step's error)."""
        try:
            outcome = await self._step_and_commit(ctx, group)
        except BaseException as exc:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.metrics.step_requests.labels(ctx.policy.model, ctx.policy.strategy).observe(len(group))
        start = 0
        for p in group:
            n = p.x.shape[0]
            if not p.future.done():
                p.future.set_result(replace(outcome, rows=slice(start, start + n), requests=len(group)))
            start += n

    async def _step_and_commit(self, ctx: _StepContext, group: list[_Pending]) -> PredictOutcome:
        ns, stream, policy, adapt = ctx.ns, ctx.stream, ctx.policy, ctx.adapt
        # uint8 batches: the compute thread converts them as part of the step (no extra thread hop).
        x = [p.x for p in group]
        rows = slice(0, sum(b.shape[0] for b in x))
        for attempt in range(self.settings.conflict_retries + 1):
            version, state = await self._load(ns, stream, policy, ctx.handle, ctx.strat, ctx.cfg)
            result = await self._step(ctx, x, state)
            if not adapt:
                self._observe(policy, result, adapted=False)
                return PredictOutcome(policy, result, False, False, version, rows)
            new_version = await self._commit(ns, stream, policy, result, version)
            if new_version is not None:
                # _commit hands back the old version when it discarded a non-finite update.
                adapted = new_version != version
                self._observe(policy, result, adapted)
                return PredictOutcome(policy, result, adapted, False, new_version, rows)
            self.metrics.conflicts.labels(policy.model, policy.strategy).inc()
            self._cache.pop(ctx.key, None)
            log.info("state conflict on %s (attempt %d)", ctx.key, attempt + 1)
        self._observe(policy, result, adapted=False)
        return PredictOutcome(policy, result, False, True, version, rows)

    def _observe(self, policy: Policy, result: StepResult, adapted: bool) -> None:
        """Per-step metrics, recorded once for a merged step."""
        m, labels, stats = self.metrics, (policy.model, policy.strategy), result.stats
        m.samples.labels(*labels).inc(stats.samples)
        m.entropy.labels(*labels).observe(stats.mean_entropy)
        m.confidence.labels(*labels).observe(stats.mean_confidence)
        if stats.bn_distance is not None:
            m.bn_distance.labels(*labels).observe(stats.bn_distance)
        if adapted:
            m.samples_adapted.labels(*labels).inc(stats.samples)
            m.samples_used.labels(*labels).inc(stats.used)
            m.samples_filtered.labels(*labels).inc(stats.filtered)

    async def _load(
        self,
        ns: str,
        stream: str,
        policy: Policy,
        handle: ModelHandle,
        strat: ComposedStrategy,
        cfg: StrategyConfig,
    ) -> tuple[int, AdaptationState]:
        key = f"{ns}:{stream}:{policy.epoch}"
        cached = self._cache.get(key)
        t0 = time.perf_counter()
        stored = await self.store.get_state(ns, stream, policy.epoch, with_blob=cached is None)
        if stored is not None and cached is not None and cached[0] != stored.version:
            stored = await self.store.get_state(ns, stream, policy.epoch, with_blob=True)
        self.metrics.store_duration.labels("load").observe(time.perf_counter() - t0)
        if stored is None:
            return 0, await self.run(strat.init_state, handle, cfg, policy.seed)
        if cached is not None and cached[0] == stored.version:
            self._cache.move_to_end(key)
            return cached
        if stored.meta.get("policy") != policy.config_hash():
            raise StateMismatchError(
                "stored state was written under another policy; reset the stream", detail={"stream": stream}
            )
        try:
            state = await self.run(state_from_bytes, stored.blob or b"", handle.device)
            strat.check_state(handle, state)
        except (CorruptStateError, adapters.StateMismatchError) as exc:
            log.warning("refusing stored state of %s: %s", key, exc)
            raise from_core(exc) from exc
        return stored.version, state

    async def _step(self, ctx: _StepContext, x: list[torch.Tensor], state: AdaptationState) -> StepResult:
        """One step on the uint8 batches `x` (merged requests of the stream), shared with other streams'
        steps where the strategy allows it."""
        handle, strat, cfg, adapt, policy = ctx.handle, ctx.strat, ctx.cfg, ctx.adapt, ctx.policy
        t0 = time.perf_counter()
        try:
            if self._shares_forward(handle) and strat.can_step_many(adapt):
                result = await self._shared_step(ctx, x, state)
            else:
                result = await self.run(_step_u8, strat, handle, x, state, cfg, adapt)
        except adapters.AdaptError as exc:
            raise from_core(exc) from exc
        self.metrics.step_duration.labels(policy.model, policy.strategy).observe(time.perf_counter() - t0)
        if not bool(torch.isfinite(result.logits).all()):
            # The stored state itself is unusable: start over from the source state and count it.
            log.warning("non-finite predictions from a stored state; resetting to source")
            self.metrics.resets.labels(policy.model, policy.strategy, "non_finite").inc()
            fresh = await self.run(strat.init_state, handle, cfg, policy.seed)
            result = await self.run(
                _step_u8, strat, handle, x, fresh.with_updates(**_carry_counters(state)), cfg, adapt
            )
        return result

    # --------------------------------------------------------- shared forwards
    def _shares_forward(self, handle: ModelHandle) -> bool:
        if self.settings.share_forward is not None:
            return self.settings.share_forward
        # On CPU a bigger batch barely speeds convolutions up, while every BN layer then joins the
        # streams' outputs (one more pass over the activations): measured slower for ResNet-50.
        return handle.device.type == "cuda"

    async def _shared_step(
        self, ctx: _StepContext, x: list[torch.Tensor], state: AdaptationState
    ) -> StepResult:
        """Queue this stream's step; the compute thread that picks the queue up runs every step queued by
        then (same model, strategy and config) as one `step_many` forward, each with its own statistics.

        Nothing waits on a timer: steps only share a forward when they would have queued for the
        compute threads anyway.
        """
        key = (
            ctx.policy.model,
            ctx.policy.strategy,
            json.dumps(ctx.policy.config, sort_keys=True),
            ctx.adapt,
        )
        loop = asyncio.get_running_loop()
        job = _SharedJob(x, state, loop.create_future())
        with self._shared_lock:
            queue = self._shared.setdefault(key, [])
            queue.append(job)
            first = len(queue) == 1
        if first:
            loop.run_in_executor(self.executor, self._drain_shared, key, ctx, loop)
        return await job.future

    def _drain_shared(self, key: tuple[str, ...], ctx: _StepContext, loop: asyncio.AbstractEventLoop) -> None:
        """Compute thread: run the queued steps of `key` (up to max_step_images images) as one forward."""
        with self._shared_lock:
            queue = self._shared.pop(key, [])
            n = _fitting([sum(b.shape[0] for b in job.x) for job in queue], self.settings.max_step_images)
            group, rest = queue[:n], queue[n:]
            if rest:
                self._shared[key] = rest
                loop.call_soon_threadsafe(
                    loop.run_in_executor, self.executor, self._drain_shared, key, ctx, loop
                )
        if not group:
            return
        self.metrics.forward_streams.labels(ctx.policy.model, ctx.policy.strategy).observe(len(group))
        try:
            if len(group) == 1:
                results = [_step_u8(ctx.strat, ctx.handle, group[0].x, group[0].state, ctx.cfg, ctx.adapt)]
            else:
                xs = [_to_unit_float(j.x, ctx.handle.device) for j in group]
                results = ctx.strat.step_many(ctx.handle, xs, [j.state for j in group], ctx.cfg, ctx.adapt)
        except Exception as exc:
            for job in group:
                loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        for job, result in zip(group, results, strict=True):
            loop.call_soon_threadsafe(_settle, job.future, result, None)

    async def _commit(
        self, ns: str, stream: str, policy: Policy, result: StepResult, version: int
    ) -> int | None:
        state = result.state
        # The tensors cross to the host once (one copy per dtype); the check and the encoding both use them.
        host = await self.run(_finite_on_host, state.tensors)
        if host is None:
            # Never store a broken update: the stream keeps its last good state.
            self.metrics.resets.labels(policy.model, policy.strategy, "non_finite_rollback").inc()
            log.warning("non-finite adapted state for %s/%s discarded", ns, stream)
            return version
        handle = self.pool.get(policy.model)
        new_drift = drift.update(
            state.meta.get("drift"), result, handle.num_classes, self.settings.drift_momentum
        )
        state = state.with_updates(drift=new_drift, policy=policy.config_hash())
        blob = await self.run(state_to_bytes, AdaptationState(host, state.meta))
        t0 = time.perf_counter()
        new_version = await self.store.cas_state(
            ns,
            stream,
            policy.epoch,
            version,
            blob,
            dict(state.meta),
            float(new_drift.get("bn_distance") or 0.0),
        )
        self.metrics.store_duration.labels("save").observe(time.perf_counter() - t0)
        self.metrics.store_up.set(1)  # the store answered
        if new_version is not None:
            self.metrics.state_bytes.labels(policy.model, policy.strategy).observe(len(blob))
            self.metrics.updates.labels(policy.model, policy.strategy).inc()
            if new_drift.get("class_shift") is not None:
                self.metrics.class_shift.labels(policy.model, policy.strategy).observe(
                    new_drift["class_shift"]
                )
            self._remember(f"{ns}:{stream}:{policy.epoch}", new_version, state)
        return new_version

    def _remember(self, key: str, version: int, state: AdaptationState) -> None:
        if self.settings.state_cache_size <= 0:
            return
        self._cache[key] = (version, state)
        self._cache.move_to_end(key)
        while len(self._cache) > self.settings.state_cache_size:
            self._cache.popitem(last=False)


def _fitting(sizes: list[int], cap: int) -> int:
    """How many leading items (at least one) fit in `cap` images together."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > cap:
            return n
    return len(sizes)


def _to_unit_float(batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 NCHW batches -> one float batch in [0, 1] on `device`.

    Merged requests may arrive on different devices (JPEGs decoded on the GPU, raw arrays on the host);
    cat keeps the channels_last layout of raw uploads.
    """
    on_device = [b.to(device, non_blocking=True) for b in batches]
    x = on_device[0] if len(on_device) == 1 else torch.cat(on_device)
    return x.float().div_(255.0)


def _step_u8(
    strat: ComposedStrategy,
    handle: ModelHandle,
    batches: list[torch.Tensor],
    state: AdaptationState,
    cfg: StrategyConfig,
    adapt: bool,
) -> StepResult:
    return strat.step(handle, _to_unit_float(batches, handle.device), state, cfg, adapt)


def _finite_on_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Host copies of `tensors`, or None when any of them holds inf or nan."""
    host = to_host(tensors)
    sums = [t.float().sum() for t in host.values() if t.is_floating_point()]
    return host if not sums or bool(torch.isfinite(torch.stack(sums)).all()) else None


def _carry_counters(state: AdaptationState) -> dict[str, Any]:
    return {k: state.meta[k] for k in ("steps", "updates", "samples_seen") if k in state.meta}
