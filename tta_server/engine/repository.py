"""Stream states: load (through a device-side cache), prepare for storage, and compare-and-set commit.

A cached state is used only under the incarnation and version the store confirms (or newer, when this
replica committed it after the store was read): a re-created, reset or evicted stream can never be
answered from an old incarnation's cache, whatever its version number.

Write-back (`WriteBack.steps` > 1): a large state's step may be *held*, kept in the cache as version v+1
while the store still has v, and written with the N-th step, when its stream has been idle for a while, or
at shutdown. One compare-and-set then moves the store from the version it last had to the held one, so the
version still counts steps. A held entry is used only while the store's version is the one this replica
wrote last: if another replica commits the stream meanwhile, the held steps are dropped (counted) and the
store's state wins. Held entries are never evicted; a step whose state does not fit beside them is stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters import AdaptationState, ComposedStrategy, ModelHandle, StepResult, StrategyConfig
from adapters.serialization import state_from_bytes, state_to_bytes, to_host
from tta_server import drift
from tta_server.errors import StateMismatchError, StoreFullError
from tta_server.metrics import Metrics
from tta_server.records import Policy, StateRecord, encode_meta
from tta_server.state_store import CasOutcome, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteBack:
    """When a step's state is stored (Settings.write_back_*)."""

    steps: int = 1  # store every N-th step of a large state; 1 = every step
    min_bytes: int = 1024**2  # smaller states are stored at every step
    idle_seconds: float = 5.0  # a held state is written once its stream had no step this long


@dataclass(frozen=True)
class Prepared:
    """A step's new state, ready to store: made on the compute thread in the same hop as the step."""

    state: AdaptationState  # device tensors, with the drift figures and policy hash in its meta
    blob: bytes | None  # None: not encoded (a held step, or a non-finite update)
    meta: bytes
    drift: dict[str, Any]
    finite: bool = True  # False: the update held inf/nan and must not be stored


def prepare(
    result: StepResult, policy: Policy, num_classes: int, momentum: float, encode: bool = True
) -> Prepared:
    """Compute thread: fold the step into the drift figures, copy the state to the host once (one copy
    per dtype), check it is finite and encode it. `encode=False` (a held step): only the finiteness check,
    on the state's own device."""
    new_drift = drift.update(result.state.meta.get("drift"), result, num_classes, momentum)
    state = result.state.with_updates(drift=new_drift, policy=policy.config_hash())
    meta = encode_meta(dict(state.meta))
    if not encode:
        finite = all(_finite(t) for t in state.tensors.values() if t.is_floating_point())
        return Prepared(state, None, meta, new_drift, finite)
    host = _finite_on_host(state.tensors)
    blob = None if host is None else state_to_bytes(AdaptationState(host, state.meta))
    return Prepared(state, blob, meta, new_drift, host is not None)


def encode_state(state: AdaptationState) -> bytes:
    """Compute thread: the blob of a state known to be finite (a held one, checked when it was made)."""
    return state_to_bytes(AdaptationState(to_host(state.tensors), state.meta))


def _finite_on_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Host copies of `tensors`, or None when any of them holds inf or nan."""
    host = to_host(tensors)
    return host if all(_finite(t) for t in host.values() if t.is_floating_point()) else None


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(t: torch.Tensor) -> bool:
    # numpy checks a host tensor in place, single-threaded: torch's isfinite + all costs a temporary and a
    # wake-up of the intra-op thread pool per call, 10x the time on a 350 KB state, more while the cores are busy.
    if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())  # device tensors (a held state), bfloat16 and dtypes numpy lacks


@dataclass
class _Cached:
    incarnation: str
    version: int
    state: AdaptationState
    stored: int = -1  # the version the store has of this incarnation (-1: `version`, nothing held)
    model: str = ""  # the stream's model, for its per-model bound
    policy: Policy | None = None  # while steps are held: what their write-back commits under
    last_step: float = 0.0  # time.monotonic() of the latest held step

    def __post_init__(self) -> None:
        if self.stored < 0:
            self.stored = self.version

    @property
    def held(self) -> int:
        """Steps in this entry that the store does not have."""
        return self.version - self.stored

    @property
    def nbytes(self) -> int:
        return _nbytes(self.state)


def _nbytes(state: AdaptationState) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors.values())


class StateRepository:
    def __init__(
        self,
        store: StateStore,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
        cache_size: int,
        cache_bytes: int = 2 * 1024**3,
        write_back: WriteBack | None = None,
        model_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.metrics = metrics
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.write_back = write_back or WriteBack()
        self.model_limits = dict(model_limits or {})  # model -> most cached streams (models.yaml)
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._bytes = 0  # sum of the entries' nbytes
        self.writable = True  # False after the store refused a write for lack of memory

    def cached_version(self, ns: str, stream: str) -> tuple[str, int] | None:
        """(incarnation, version) the store last had from this cache: it skips sending a blob that matches."""
        hit = self._cache.get((ns, stream))
        return (hit.incarnation, hit.stored) if hit else None

    def forget(self, ns: str, stream: str, lost: str = "replaced") -> None:
        """Drop the stream's entry; held steps in it are counted as lost for `lost`."""
        gone = self._cache.pop((ns, stream), None)
        if gone is not None:
            self._account(-gone.nbytes)
            if gone.held:
                self.metrics.write_back_lost.labels(lost).inc(gone.held)
                self._count_held()

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def _account(self, delta: int) -> None:
        self._bytes += delta
        self.metrics.state_cache_bytes.set(self._bytes)

    def _count_held(self) -> None:
        self.metrics.unwritten_steps.set(sum(e.held for e in self._cache.values()))

    # ------------------------------------------------------------------ write-back
    def holds(self, ns: str, stream: str, policy: Policy, version: int, state: AdaptationState) -> bool:
        """Whether the adapting step about to run on `state` (at `version`) is held instead of stored: the
        state is large, this entry has fewer than steps-1 held steps, and it fits beside the held entries."""
        wb = self.write_back
        if wb.steps <= 1:
            return False
        size = _nbytes(state)
        if size < wb.min_bytes:
            return False
        if version + 1 - self._stored(ns, stream, policy, version) >= wb.steps:
            return False  # this is the N-th step: it is stored
        return self._fits(ns, stream, policy.model, size)

    def hold(self, ns: str, stream: str, policy: Policy, version: int, prepared: Prepared) -> int | None:
        """Keep `prepared` as version+1 in the cache only (the store keeps the version it has): the new
        version, or None when it does not fit beside the other held states (then it must be stored)."""
        if not self._fits(ns, stream, policy.model, _nbytes(prepared.state)):
            return None
        stored = self._stored(ns, stream, policy, version)
        held = _Cached(
            policy.incarnation, version + 1, prepared.state, stored, policy.model, policy, time.monotonic()
        )
        self._remember(ns, stream, held)
        self._count_held()
        return version + 1

    def _stored(self, ns: str, stream: str, policy: Policy, version: int) -> int:
        """The version the store has of a state this replica has at `version`."""
        entry = self._cache.get((ns, stream))
        if entry is not None and entry.incarnation == policy.incarnation and entry.version == version:
            return entry.stored
        return version

    def _fits(self, ns: str, stream: str, model: str, size: int) -> bool:
        """Whether a held state of `size` bytes fits in the cache beside the other streams' held states, within
        the replica's bounds and its model's."""
        others = [e for k, e in self._cache.items() if e.held and k != (ns, stream)]
        same_model = sum(e.model == model for e in others)
        return (
            len(others) < self.cache_size
            and same_model < self.model_limits.get(model, self.cache_size)
            and sum(e.nbytes for e in others) + size <= self.cache_bytes
        )

    def held_view(
        self, ns: str, stream: str, policy: Policy, record: StateRecord | None
    ) -> tuple[int, dict[str, Any]] | None:
        """(version, meta) of the stream's state when this replica holds steps of it the store lacks."""
        hit = self._cache.get((ns, stream))
        if hit is None or not hit.held or hit.incarnation != policy.incarnation:
            return None
        if record is not None and record.version > hit.stored:
            return None  # another replica committed since: the held steps will be dropped
        return hit.version, dict(hit.state.meta)

    def held_streams(self, idle_for: float = 0.0) -> list[tuple[str, str]]:
        """Streams with held steps whose latest step is at least `idle_for` seconds old."""
        now = time.monotonic()
        return [k for k, e in self._cache.items() if e.held and now - e.last_step >= idle_for]

    async def write_back_now(self, ns: str, stream: str, reason: str) -> bool:
        """Store the stream's held steps (the caller holds the stream's lock). False: nothing was held, or
        the store is unavailable (the entry stays held and is tried again); a conflict or a replaced stream
        drops the entry and counts its steps as lost."""
        entry = self._cache.get((ns, stream))
        if entry is None or not entry.held or entry.policy is None:
            return False
        blob = await self._run(encode_state, entry.state)
        meta = dict(entry.state.meta)  # the drift figures of the held step are in it, as prepare() put them
        prepared = Prepared(entry.state, blob, encode_meta(meta), meta.get("drift") or {})
        try:
            result = await self._cas(
                ns, stream, entry.policy, entry.stored, entry.version - entry.stored, prepared
            )
        except Exception as exc:  # store down or full: keep holding, retried at the next idle round
            log.warning("write-back of %s/%s failed (%s); kept on this replica", ns, stream, exc)
            return False
        if result > 0:
            entry.stored = entry.version = result
            entry.policy = None
            self._count_held()
            self.metrics.write_backs.labels(reason).inc()
            return True
        self.forget(ns, stream, "conflict" if result == CasOutcome.CONFLICT else "replaced")
        return False

    async def state_for(
        self,
        ns: str,
        stream: str,
        policy: Policy,
        record: StateRecord | None,
        handle: ModelHandle,
        strat: ComposedStrategy,
        cfg: StrategyConfig,
    ) -> tuple[int, AdaptationState] | None:
        """The state a step of `policy`'s incarnation starts from, given the store's `record` of it.

        None: the record's blob was skipped against a cache entry that is gone; load again without it.
        """
        hit = self._cache.get((ns, stream))
        if hit is not None and hit.incarnation == policy.incarnation:
            stored = record.version if record is not None else 0
            if hit.stored >= stored:
                self._cache.move_to_end((ns, stream))
                self.metrics.state_cache.labels("hit").inc()
                return hit.version, hit.state
            if hit.held:  # another replica committed the stream after this one held steps: the store wins
                self.forget(ns, stream, "conflict")
        if record is None:  # a stream's first step: nothing stored, neither hit nor miss
            return 0, await self._run(strat.init_state, handle, cfg, policy.seed)
        if record.blob is None:
            return None
        self.metrics.state_cache.labels("miss").inc()
        if record.meta.get("policy") != policy.config_hash():
            raise StateMismatchError(
                "stored state was written under another policy; reset the stream", detail={"stream": stream}
            )
        state = await self._run(state_from_bytes, record.blob, handle.device)
        state = strat.upgrade_state(handle, state)  # a state stored by an older release of the strategy
        strat.check_state(handle, state)  # adapters.StateMismatchError -> 409 state_mismatch
        return record.version, state

    async def commit(self, ns: str, stream: str, policy: Policy, version: int, prepared: Prepared) -> int:
        """Store `prepared` as version+1 of the stream's incarnation (with the steps this replica held
        before it): the new version, or a CasOutcome."""
        stored = self._stored(ns, stream, policy, version)
        result = await self._cas(ns, stream, policy, stored, version + 1 - stored, prepared)
        if result > 0:
            self._remember(
                ns, stream, _Cached(policy.incarnation, result, prepared.state, model=policy.model)
            )
            if version > stored:  # it stored the steps held before it too
                self.metrics.write_backs.labels("steps").inc()
                self._count_held()
        else:
            self.forget(ns, stream, "conflict" if result == CasOutcome.CONFLICT else "replaced")
        return result

    async def _cas(
        self, ns: str, stream: str, policy: Policy, expected: int, steps: int, prepared: Prepared
    ) -> int:
        assert prepared.blob is not None
        t0 = time.perf_counter()
        try:
            result = await self.store.cas(
                ns,
                stream,
                policy.incarnation,
                expected,
                prepared.blob,
                prepared.meta,
                policy.encode(),
                prepared.drift.get("bn_distance"),
                steps=steps,
            )
        except StoreFullError:
            self.writable = False
            self.metrics.store_writable.set(0)
            raise
        except BaseException:
            # The store failed mid-commit (or the step was cancelled): the write may still have landed, so
            # the cached state may be a version behind. Drop it: the next step reads the store (a miss)
            # instead of computing on a stale state and losing a CAS round. An entry with held steps stays:
            # if the write landed, the next read sees a newer version and loads it (counted as a conflict).
            entry = self._cache.get((ns, stream))
            if entry is None or not entry.held:
                self.forget(ns, stream)
            raise
        self.metrics.store_duration.labels("save").observe(time.perf_counter() - t0)
        self.metrics.store_up.set(1)
        self.metrics.store_writable.set(1)
        self.writable = True
        return result

    def _remember(self, ns: str, stream: str, entry: _Cached) -> None:
        """Cache `entry`, then drop the least recently used entries without held steps beyond the count and
        byte bounds. A state larger than the byte bound is not cached (its next step decodes the store's
        blob); `holds` keeps the held entries within both bounds and their model's."""
        old = self._cache.get((ns, stream))
        if old is not None and old.held and old.incarnation != entry.incarnation:
            self.forget(ns, stream, "replaced")  # steps held under the stream's old incarnation go with it
        old = self._cache.pop((ns, stream), None)
        if old is not None:
            self._account(-old.nbytes)
        size = entry.nbytes
        if self.cache_size <= 0 or size > self.cache_bytes:  # never for a held entry: hold() checks it fits
            return
        self._cache[(ns, stream)] = entry
        self._account(size)
        if len(self._cache) > self.cache_size or self._bytes > self.cache_bytes:
            for key in list(self._cache):
                if len(self._cache) <= self.cache_size and self._bytes <= self.cache_bytes:
                    break
                if not self._cache[key].held:
                    self._account(-self._cache.pop(key).nbytes)
        limit = self.model_limits.get(entry.model)
        if limit is not None:  # the model's own bound (models.yaml max_cached_streams), least recent first
            clean = [k for k, e in self._cache.items() if e.model == entry.model and not e.held]
            held = sum(e.model == entry.model and e.held for e in self._cache.values())
            for key in clean[: max(0, held + len(clean) - limit)]:
                self._account(-self._cache.pop(key).nbytes)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


__all__ = ["CasOutcome", "Prepared", "StateRepository", "WriteBack", "prepare"]
