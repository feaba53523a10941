"""Write-back (TTA_WRITE_BACK_STEPS > 1): a large state's steps are held in the replica's cache and stored
with the N-th step, when the stream goes idle, or at shutdown; a crash loses only the held steps, another
replica's commit wins over them, and held entries are never evicted.

Two Engines on one InMemoryStateStore are two replicas; dropping an Engine without `shutdown` is a crash."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from adapters import AdaptationState
from adapters.serialization import state_from_bytes
from tests.conftest import MODELS_YAML
from tta_server.engine import Engine, PredictOutcome
from tta_server.engine.repository import Prepared, StateRepository, WriteBack
from tta_server.errors import StoreUnavailableError
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool
from tta_server.records import Policy
from tta_server.settings import Settings
from tta_server.state_store import InMemoryStateStore

NS, STREAM = "ns", "cam"


def _engine(pool: ModelPool, store: InMemoryStateStore, **overrides: Any) -> Engine:
    settings = Settings(models_config=MODELS_YAML, write_back_min_bytes=0, **overrides)
    return Engine(settings, pool, store, Metrics())


def _batches(cifar_array: np.ndarray, n: int, size: int = 8) -> list[torch.Tensor]:
    nchw = torch.from_numpy(np.ascontiguousarray(cifar_array)).permute(0, 3, 1, 2)
    return [nchw[i * size : (i + 1) * size] for i in range(n)]


async def _steps(engine: Engine, batches: list[torch.Tensor], adapt: bool = True) -> list[PredictOutcome]:
    return [await engine.predict(NS, STREAM, b, adapt) for b in batches]


async def _stored_version(store: InMemoryStateStore) -> int:
    raw = await store.load(NS, STREAM, None)
    return int(raw.state["v"]) if raw.state else 0


def _count(counter: Any, label: str) -> float:
    return float(counter.labels(label)._value.get())


def test_held_steps_are_stored_with_the_nth_step(pool: ModelPool, cifar_array: np.ndarray) -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        engine = _engine(pool, store, write_back_steps=3)
        await engine.put_policy(NS, STREAM, None, "tent", {}, 0)
        durable, stored = [], []
        for batch in _batches(cifar_array, 7):
            out = await engine.predict(NS, STREAM, batch, True)
            assert out.adapted and out.not_adapted is None
            durable.append(out.durable)
            stored.append(await _stored_version(store))
        assert durable == [False, False, True, False, False, True, False]
        assert stored == [0, 0, 3, 3, 3, 6, 6]
        # The version counts steps; this replica's view of the stream includes the held one.
        assert (await engine.describe(NS, STREAM)).version == 7
        m = engine.metrics
        assert m.unwritten_steps._value.get() == 1 and _count(m.write_backs, "steps") == 2
        engine.close()

    asyncio.run(scenario())


def test_small_states_are_stored_at_every_step(pool: ModelPool, cifar_array: np.ndarray) -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        # tent's state on the WRN is about 86 KB, below the 1 MiB default bound.
        settings = Settings(models_config=MODELS_YAML, write_back_steps=4)
        engine = Engine(settings, pool, store, Metrics())
        await engine.put_policy(NS, STREAM, None, "tent", {}, 0)
        outs = await _steps(engine, _batches(cifar_array, 3))
        assert [o.durable for o in outs] == [True] * 3 and await _stored_version(store) == 3
        engine.close()

    asyncio.run(scenario())


def test_a_crash_loses_only_the_held_steps(pool: ModelPool, cifar_array: np.ndarray) -> None:
    batches = _batches(cifar_array, 5)
    probe = _batches(cifar_array[100:], 1)[0]

    async def scenario() -> None:
        store = InMemoryStateStore(60)
        crashed = _engine(pool, store, write_back_steps=3)
        await crashed.put_policy(NS, STREAM, None, "tent", {}, 0)
        await _steps(crashed, batches)
        crashed.close()  # no shutdown: steps 4 and 5 were only on this replica
        survivor = _engine(pool, store)
        after = await survivor.predict(NS, STREAM, probe, False)
        assert after.version == 3
        # The stored state is exactly the one three stored steps give.
        reference = _engine(pool, InMemoryStateStore(60))
        await reference.put_policy(NS, STREAM, None, "tent", {}, 0)
        await _steps(reference, batches[:3])
        expected = await reference.predict(NS, STREAM, probe, False)
        assert torch.equal(after.logits, expected.logits)
        survivor.close()
        reference.close()

    asyncio.run(scenario())


def test_shutdown_stores_every_held_state_bit_for_bit(pool: ModelPool, cifar_array: np.ndarray) -> None:
    probe = _batches(cifar_array[100:], 1)[0]

    async def scenario() -> None:
        store = InMemoryStateStore(60)
        first = _engine(pool, store, write_back_steps=10)
        await first.put_policy(NS, STREAM, None, "tent", {}, 0)
        await _steps(first, _batches(cifar_array, 4))
        assert await _stored_version(store) == 0
        held = first.repository._cache[(NS, STREAM)].state
        before = await first.predict(NS, STREAM, probe, False)
        await first.shutdown()
        assert _count(first.metrics.write_backs, "shutdown") == 1
        assert first.metrics.unwritten_steps._value.get() == 0
        raw = await store.load(NS, STREAM, None)
        assert raw.state is not None and raw.state["v"] == b"4"
        stored = state_from_bytes(raw.state["blob"], torch.device("cpu"))
        assert stored.tensors.keys() == held.tensors.keys()
        assert all(torch.equal(stored.tensors[k], held.tensors[k]) for k in held.tensors)
        first.close()
        second = _engine(pool, store)
        after = await second.predict(NS, STREAM, probe, False)
        assert after.version == 4 and torch.equal(after.logits, before.logits)
        second.close()

    asyncio.run(scenario())


def test_an_idle_stream_is_written_back(pool: ModelPool, cifar_array: np.ndarray) -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        engine = _engine(pool, store, write_back_steps=100, write_back_idle_seconds=0.2)
        engine.start()
        await engine.put_policy(NS, STREAM, None, "tent", {}, 0)
        outs = await _steps(engine, _batches(cifar_array, 2))
        assert not any(o.durable for o in outs)
        for _ in range(50):
            if await _stored_version(store) == 2:
                break
            await asyncio.sleep(0.1)
        assert await _stored_version(store) == 2
        assert _count(engine.metrics.write_backs, "idle") == 1
        await engine.shutdown()
        engine.close()

    asyncio.run(scenario())


def test_another_replicas_commit_wins_over_held_steps(pool: ModelPool, cifar_array: np.ndarray) -> None:
    batches = _batches(cifar_array, 4)

    async def scenario() -> None:
        store = InMemoryStateStore(60)
        holder = _engine(pool, store, write_back_steps=5)
        other = _engine(pool, store)
        await holder.put_policy(NS, STREAM, None, "tent", {}, 0)
        await _steps(holder, batches[:2])  # held: the store still has version 0
        (won,) = await _steps(other, batches[2:3])
        assert won.version == 1 and won.durable
        # The holder's next step starts from the other replica's state, not from its held one.
        (next_step,) = await _steps(holder, batches[3:4])
        assert next_step.version == 2 and not next_step.durable
        assert _count(holder.metrics.write_back_lost, "conflict") == 2
        reference = _engine(pool, InMemoryStateStore(60))
        await reference.put_policy(NS, STREAM, None, "tent", {}, 0)
        (expected,) = await _steps(reference, batches[2:3])
        (expected,) = await _steps(reference, batches[3:4])
        assert torch.equal(next_step.logits, expected.logits)
        for engine in (holder, other, reference):
            engine.close()

    asyncio.run(scenario())


def test_a_reset_discards_the_held_steps(pool: ModelPool, cifar_array: np.ndarray) -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        engine = _engine(pool, store, write_back_steps=5)
        await engine.put_policy(NS, STREAM, None, "tent", {}, 0)
        await _steps(engine, _batches(cifar_array, 2))
        policy = await engine.reset(NS, STREAM)
        await engine.shutdown()  # the write-back finds the old incarnation gone
        assert _count(engine.metrics.write_back_lost, "replaced") == 2
        raw = await store.load(NS, STREAM, None)
        assert (
            raw.state is None and raw.policy is not None and raw.policy["inc"] == policy.incarnation.encode()
        )
        engine.close()

    asyncio.run(scenario())


# ----------------------------------------------------------------- the repository alone


def _prepared(n_floats: int) -> Prepared:
    return Prepared(AdaptationState({"w": torch.ones(n_floats)}, {}), None, b"{}", {})


class _Outage(InMemoryStateStore):
    down = False

    async def cas(self, *args: Any, **kwargs: Any) -> int:
        if self.down:
            raise StoreUnavailableError("store down")
        return await super().cas(*args, **kwargs)


def test_held_entries_are_never_evicted_and_a_state_that_does_not_fit_is_stored() -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        with ThreadPoolExecutor(1) as pool:
            # 1000 bytes: two 400-byte held states fit, a third does not.
            repo = StateRepository(store, pool, Metrics(), 10, 1000, WriteBack(steps=5, min_bytes=0))
            for name in ("a", "b", "c"):
                policy = Policy("m", "tent", {}, incarnation=f"inc-{name}")
                await store.create(NS, name, policy.incarnation, policy.encode())
                prepared = _prepared(100)
                if repo.holds(NS, name, policy, 0, prepared.state):
                    assert repo.hold(NS, name, policy, 0, prepared) == 1
            assert sorted(repo.held_streams()) == [(NS, "a"), (NS, "b")]
            assert not repo.holds(
                NS, "c", Policy("m", "tent", {}, incarnation="inc-c"), 0, _prepared(100).state
            )
            # A clean entry that needs room evicts nothing held: it is not cached.
            clean = Policy("m", "tent", {}, incarnation="inc-d")
            await store.create(NS, "d", clean.incarnation, clean.encode())
            encoded = Prepared(_prepared(100).state, b"blob", b"{}", {})
            assert await repo.commit(NS, "d", clean, 0, encoded) == 1
            assert repo.cached_version(NS, "d") is None
            assert repo.cached_version(NS, "a") == ("inc-a", 0) and repo.cached_version(NS, "b") == (
                "inc-b",
                0,
            )

    asyncio.run(scenario())


def test_a_store_outage_keeps_the_held_steps_for_the_next_round() -> None:
    async def scenario() -> None:
        store = _Outage(60)
        metrics = Metrics()
        with ThreadPoolExecutor(1) as pool:
            repo = StateRepository(store, pool, metrics, 10, 10**6, WriteBack(steps=5, min_bytes=0))
            policy = Policy("m", "tent", {}, incarnation="inc")
            await store.create(NS, STREAM, policy.incarnation, policy.encode())
            assert repo.hold(NS, STREAM, policy, 0, _prepared(10)) == 1
            assert repo.hold(NS, STREAM, policy, 1, _prepared(10)) == 2
            store.down = True
            assert not await repo.write_back_now(NS, STREAM, "idle")
            assert repo.held_streams() == [(NS, STREAM)] and metrics.unwritten_steps._value.get() == 2
            store.down = False
            assert await repo.write_back_now(NS, STREAM, "idle")
            assert repo.held_streams() == [] and await _stored_version(store) == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("steps", [0, 10_001])
def test_write_back_steps_out_of_range_are_refused(steps: int) -> None:
    with pytest.raises(ValueError):
        Settings(models_config=MODELS_YAML, write_back_steps=steps)


NPY = {"content-type": "application/x-npy"}


@pytest.mark.redis
def test_a_graceful_restart_keeps_the_held_steps(make_client: Any, redis_url: str, cifar_array: Any) -> None:
    from tests.conftest import npy_bytes

    first = make_client(redis_url=redis_url, write_back_steps=3, write_back_min_bytes=0)
    first.put("/v1/streams/wb", json={"strategy": "tent"})
    answers = [
        first.post(
            "/v1/streams/wb/predict", content=npy_bytes(cifar_array[i * 8 : (i + 1) * 8]), headers=NPY
        ).json()
        for i in range(4)
    ]
    assert [(a["version"], a["durable"], a["adapted"]) for a in answers] == [
        (1, False, True),
        (2, False, True),
        (3, True, True),
        (4, False, True),
    ]
    assert first.get("/v1/streams/wb").json()["version"] == 4
    probe = npy_bytes(cifar_array[100:108])
    before = first.post("/v1/streams/wb/predict?adapt=false", content=probe, headers=NPY).json()
    first.__exit__(None, None, None)  # graceful stop: the lifespan writes the held step
    second = make_client(redis_url=redis_url)
    after = second.post("/v1/streams/wb/predict?adapt=false", content=probe, headers=NPY).json()
    assert after["version"] == 4 and second.get("/v1/streams/wb").json()["steps"] == 4
    assert [p["top_k"] for p in after["predictions"]] == [p["top_k"] for p in before["predictions"]]


def test_a_models_bound_limits_its_cached_and_held_streams() -> None:
    """models.yaml `max_cached_streams`: at most that many streams of the model stay cached (held ones count
    and are never evicted); other models keep only the replica's bounds."""

    async def scenario() -> None:
        store = InMemoryStateStore(60)
        with ThreadPoolExecutor(1) as pool:
            wb = WriteBack(steps=5, min_bytes=0)
            repo = StateRepository(store, pool, Metrics(), 10, 10**6, wb, {"big": 2})
            policies = {
                f"{m}{i}": Policy(m, "tent", {}, incarnation=f"inc-{m}{i}")
                for m in ("big", "small")
                for i in range(3)
            }
            for name, policy in policies.items():
                await store.create(NS, name, policy.incarnation, policy.encode())
            # One held stream of `big`, then three stored ones: only the newest stored one stays beside it.
            assert repo.hold(NS, "big0", policies["big0"], 0, _prepared(10)) == 1
            for name in ("big1", "big2", "small0", "small1", "small2"):
                encoded = Prepared(_prepared(10).state, b"blob", b"{}", {})
                assert await repo.commit(NS, name, policies[name], 0, encoded) == 1
            cached = {s for (_, s) in repo._cache}
            assert cached == {"big0", "big2", "small0", "small1", "small2"}
            # A second held stream of `big` would exceed its bound with big0 held... after big2 went clean, one
            # more held one fits (2 held at most); a third does not.
            assert repo.holds(NS, "big1", policies["big1"], 1, _prepared(10).state)
            assert repo.hold(NS, "big1", policies["big1"], 1, _prepared(10)) == 2
            assert not repo.holds(NS, "big2", policies["big2"], 1, _prepared(10).state)
            assert repo.hold(NS, "big2", policies["big2"], 1, _prepared(10)) is None
            assert sorted(s for (_, s) in repo.held_streams()) == ["big0", "big1"]

    asyncio.run(scenario())


def test_max_cached_streams_of_a_model_spec_bounds_the_engines_cache(pool: ModelPool) -> None:
    from adapters.models import ModelSpec

    spec = pool.specs["cifar10_wrn40_2"].model_copy(update={"max_cached_streams": 3})
    limited = ModelPool(dict(pool.handles), {**pool.specs, spec.id: spec}, pool.default_model)
    engine = Engine(Settings(models_config=MODELS_YAML), limited, InMemoryStateStore(60), Metrics())
    assert engine.repository.model_limits == {"cifar10_wrn40_2": 3}
    engine.close()
    with pytest.raises(ValueError):
        ModelSpec.model_validate({**spec.model_dump(), "max_cached_streams": -1})


def test_a_step_after_a_reset_counts_the_old_incarnations_held_steps_as_lost(
    pool: ModelPool, cifar_array: np.ndarray
) -> None:
    async def scenario() -> None:
        store = InMemoryStateStore(60)
        engine = _engine(pool, store, write_back_steps=5)
        await engine.put_policy(NS, STREAM, None, "tent", {}, 0)
        batches = _batches(cifar_array, 3)
        await _steps(engine, batches[:2])
        await engine.reset(NS, STREAM)
        (first,) = await _steps(engine, batches[2:])  # the new incarnation's entry replaces the old one
        assert first.version == 1 and not first.durable
        m = engine.metrics
        assert _count(m.write_back_lost, "replaced") == 2 and m.unwritten_steps._value.get() == 1
        engine.close()

    asyncio.run(scenario())
