"""Stream states: load (through a device-side cache), prepare for storage, and compare-and-set commit.

A cached state is used only under the incarnation and version the store confirms (or newer, when this
replica committed it after the store was read): a re-created, reset or evicted stream can never be
answered from an old incarnation's cache, whatever its version number.
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
class Prepared:
    """A step's new state, ready to store: made on the compute thread in the same hop as the step."""

    state: AdaptationState  # device tensors, with the drift figures and policy hash in its meta
    blob: bytes | None  # None: the update held inf/nan and must not be stored
    meta: bytes
    drift: dict[str, Any]


def prepare(result: StepResult, policy: Policy, num_classes: int, momentum: float) -> Prepared:
    """Compute thread: fold the step into the drift figures, copy the state to the host once (one copy
    per dtype), check it is finite and encode it."""
    new_drift = drift.update(result.state.meta.get("drift"), result, num_classes, momentum)
    state = result.state.with_updates(drift=new_drift, policy=policy.config_hash())
    host = _finite_on_host(state.tensors)
    blob = None if host is None else state_to_bytes(AdaptationState(host, state.meta))
    return Prepared(state, blob, encode_meta(dict(state.meta)), new_drift)


def _finite_on_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Host copies of `tensors`, or None when any of them holds inf or nan."""
    host = to_host(tensors)
    return host if all(_finite(t) for t in host.values() if t.is_floating_point()) else None


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(t: torch.Tensor) -> bool:
    # numpy checks a host tensor in place, single-threaded: torch's isfinite + all costs a temporary and a
    # wake-up of the intra-op thread pool per call, 10x the time on a 350 KB state, more while the cores are busy.
    if t.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())  # bfloat16 and other dtypes numpy lacks


@dataclass
class _Cached:
    incarnation: str
    version: int
    state: AdaptationState

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.tensors.values())


class StateRepository:
    def __init__(
        self,
        store: StateStore,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
        cache_size: int,
        cache_bytes: int = 2 * 1024**3,
    ) -> None:
        self.store = store
        self.executor = executor
        self.metrics = metrics
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._bytes = 0  # sum of the entries' nbytes
        self.writable = True  # False after the store refused a write for lack of memory

    def cached_version(self, ns: str, stream: str) -> tuple[str, int] | None:
        """(incarnation, version) of the cached state: the store skips sending a blob that matches it."""
        hit = self._cache.get((ns, stream))
        return (hit.incarnation, hit.version) if hit else None

    def forget(self, ns: str, stream: str) -> None:
        gone = self._cache.pop((ns, stream), None)
        if gone is not None:
            self._account(-gone.nbytes)

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def _account(self, delta: int) -> None:
        self._bytes += delta
        self.metrics.state_cache_bytes.set(self._bytes)

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
            if hit.version >= stored:
                self._cache.move_to_end((ns, stream))
                self.metrics.state_cache.labels("hit").inc()
                return hit.version, hit.state
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
        """Store `prepared` as version+1 of the stream's incarnation: the new version, or a CasOutcome."""
        assert prepared.blob is not None
        t0 = time.perf_counter()
        try:
            result = await self.store.cas(
                ns,
                stream,
                policy.incarnation,
                version,
                prepared.blob,
                prepared.meta,
                policy.encode(),
                prepared.drift.get("bn_distance"),
            )
        except StoreFullError:
            self.writable = False
            self.metrics.store_writable.set(0)
            raise
        except BaseException:
            # The store failed mid-commit (or the step was cancelled): the write may still have landed, so
            # the cached state may be a version behind. Drop it: the next step reads the store (a miss)
            # instead of computing on a stale state and losing a CAS round.
            self.forget(ns, stream)
            raise
        self.metrics.store_duration.labels("save").observe(time.perf_counter() - t0)
        self.metrics.store_up.set(1)
        self.metrics.store_writable.set(1)
        self.writable = True
        if result > 0:
            self._remember(ns, stream, _Cached(policy.incarnation, result, prepared.state))
        else:
            self.forget(ns, stream)
        return result

    def _remember(self, ns: str, stream: str, entry: _Cached) -> None:
        """Cache `entry`, then drop the least recently used entries beyond the count and byte bounds. A state
        larger than the byte bound is not cached (its next step decodes the store's blob)."""
        self.forget(ns, stream)
        size = entry.nbytes
        if self.cache_size <= 0 or size > self.cache_bytes:
            return
        self._cache[(ns, stream)] = entry
        self._account(size)
        while len(self._cache) > self.cache_size or self._bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._account(-old.nbytes)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


__all__ = ["CasOutcome", "Prepared", "StateRepository", "prepare"]
