"""The replica's device cache of stream states is bounded by count and by bytes (TTA_STATE_CACHE_SIZE,
TTA_STATE_CACHE_BYTES): least recently used states go first, one larger than the byte bound is not cached,
and the `tta_state_cache_bytes` gauge follows the cached total."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters import AdaptationState
from tta_server.engine.repository import Prepared, StateRepository, _Cached, _finite_on_host
from tta_server.errors import StoreUnavailableError
from tta_server.metrics import Metrics
from tta_server.records import Policy
from tta_server.state_store import InMemoryStateStore

NS = "ns"


def _prepared(n_floats: int) -> Prepared:
    state = AdaptationState({"w": torch.zeros(n_floats)}, {})
    return Prepared(state, b"blob", b"{}", {})


async def _commit(repo: StateRepository, store: InMemoryStateStore, stream: str, n_floats: int) -> None:
    policy = Policy("m", "norm", {}, incarnation=f"inc-{stream}")
    await store.create(NS, stream, policy.incarnation, policy.encode())
    assert await repo.commit(NS, stream, policy, 0, _prepared(n_floats)) == 1


def _gauge(metrics: Metrics) -> float:
    return metrics.state_cache_bytes._value.get()


def test_the_cache_keeps_the_most_recent_states_within_its_byte_bound() -> None:
    async def scenario() -> None:
        store, metrics = InMemoryStateStore(ttl_seconds=60), Metrics()
        with ThreadPoolExecutor(1) as pool:
            repo = StateRepository(store, pool, metrics, cache_size=10, cache_bytes=1000)
            for name in ("a", "b", "c"):
                await _commit(repo, store, name, 100)  # 400 bytes each
            # 3 x 400 > 1000: the oldest went.
            assert repo.cached_version(NS, "a") is None
            assert repo.cached_version(NS, "b") and repo.cached_version(NS, "c")
            assert repo.cached_bytes == 800 == _gauge(metrics)
            # Larger than the bound: not cached, and nothing else is evicted for it.
            await _commit(repo, store, "huge", 300)
            assert repo.cached_version(NS, "huge") is None and repo.cached_bytes == 800
            repo.forget(NS, "b")
            assert repo.cached_bytes == 400 == _gauge(metrics)
            # The count bound still holds with room in bytes.
            small = StateRepository(store, pool, Metrics(), cache_size=1, cache_bytes=10**6)
            await _commit(small, store, "d", 10)
            await _commit(small, store, "e", 10)
            assert small.cached_version(NS, "d") is None and small.cached_bytes == 40

    asyncio.run(scenario())


def test_recommitting_a_stream_replaces_its_entry_without_double_counting() -> None:
    async def scenario() -> None:
        store, metrics = InMemoryStateStore(ttl_seconds=60), Metrics()
        with ThreadPoolExecutor(1) as pool:
            repo = StateRepository(store, pool, metrics, cache_size=10, cache_bytes=10**6)
            policy = Policy("m", "norm", {}, incarnation="inc")
            await store.create(NS, "s", policy.incarnation, policy.encode())
            for version in range(3):
                assert await repo.commit(NS, "s", policy, version, _prepared(50)) == version + 1
            assert repo.cached_version(NS, "s") == ("inc", 3)
            assert repo.cached_bytes == 200 == _gauge(metrics)

    asyncio.run(scenario())


class _FailingCas(InMemoryStateStore):
    """Applies the commit, then fails as a store does when the reply is lost (a primary dying mid-commit)."""

    async def cas(
        self,
        ns: str,
        stream: str,
        inc: str,
        expected: int,
        blob: bytes,
        meta: bytes,
        rec: bytes,
        drift: float | None,
        steps: int = 1,
    ) -> int:
        await super().cas(ns, stream, inc, expected, blob, meta, rec, drift, steps)
        raise StoreUnavailableError("connection lost mid-commit")


def test_a_commit_whose_outcome_is_unknown_drops_the_cached_state() -> None:
    async def scenario() -> None:
        store = _FailingCas(ttl_seconds=60)
        with ThreadPoolExecutor(1) as pool:
            repo = StateRepository(store, pool, Metrics(), cache_size=10, cache_bytes=10**6)
            policy = Policy("m", "norm", {}, incarnation="inc-a")
            await store.create(NS, "a", policy.incarnation, policy.encode())
            repo._remember(NS, "a", _Cached(policy.incarnation, 0, _prepared(4).state))
            assert repo.cached_version(NS, "a") == ("inc-a", 0)
            with pytest.raises(StoreUnavailableError):
                await repo.commit(NS, "a", policy, 0, _prepared(4))
            # The write landed as version 1; a cache still at 0 would make the next step conflict.
            assert repo.cached_version(NS, "a") is None and repo.cached_bytes == 0
            raw = await store.load(NS, "a", None)
            assert raw.state is not None and int(raw.state["v"]) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_state_with_a_non_finite_value_is_refused_whatever_its_dtype(
    dtype: torch.dtype, bad: float
) -> None:
    good = {"a": torch.ones(3, 4, dtype=dtype), "steps": torch.tensor([5], dtype=torch.int64)}
    assert _finite_on_host(good) is not None
    view = torch.zeros(4, 3, dtype=dtype)
    view[2, 1] = bad
    # A transposed view and a tensor that requires grad are checked like any other.
    assert _finite_on_host({**good, "b": view.t()}) is None
    leaf = torch.zeros(5, dtype=dtype).requires_grad_(dtype.is_floating_point)
    with torch.no_grad():
        leaf[3] = bad
    assert _finite_on_host({**good, "c": leaf}) is None
