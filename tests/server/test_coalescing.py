"""Requests of one stream that queue behind a running step are served by one merged step."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import adapters
from tests.conftest import MODELS_YAML
from tta_server.engine import Engine, Policy, PredictOutcome
from tta_server.metrics import Metrics
from tta_server.model_pool import ModelPool
from tta_server.settings import Settings
from tta_server.state_store import InMemoryStateStore

NS, STREAM = "ns", "cam"
# A request not yet started: calling it gives the predict coroutine.
Job = Callable[[], Coroutine[Any, Any, PredictOutcome]]


def _engine(pool: ModelPool, **overrides: Any) -> Engine:
    settings = Settings(models_config=MODELS_YAML, **overrides)
    return Engine(settings, pool, InMemoryStateStore(60), Metrics())


def _batches(cifar_array: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    nchw = torch.from_numpy(cifar_array).permute(0, 3, 1, 2)
    bounds = np.cumsum([0, *sizes])
    return [nchw[a:b] for a, b in itertools.pairwise(bounds)]


async def _queued(
    engine: Engine, policy: Policy, jobs: Sequence[Job]
) -> list[PredictOutcome | BaseException]:
    """Start `jobs` while the stream is busy, so they all queue, then let them run."""
    async with engine.scheduler.locks.hold(f"{NS}/{STREAM}"):
        tasks = [asyncio.create_task(job()) for job in jobs]
        for _ in range(20):
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def _start_predicts(
    engine: Engine, policy: Policy, batches: list[torch.Tensor]
) -> list[asyncio.Task[PredictOutcome]]:
    """Start one adapting predict per batch, and let each reach (and queue on) the stream's lock."""
    tasks = [asyncio.create_task(engine.predict(NS, STREAM, b, True)) for b in batches]
    for _ in range(20):
        await asyncio.sleep(0)
    return tasks


def _run_queued(
    engine: Engine, strategy: str, batches: list[torch.Tensor], flags: list[bool] | None = None
) -> list[Any]:
    """Set the stream's policy, queue one request per batch behind a busy stream, return their outcomes."""

    async def scenario() -> list[Any]:
        policy = await engine.put_policy(NS, STREAM, None, strategy, {}, 0)
        adapt = flags or [True] * len(batches)
        jobs = [
            functools.partial(engine.predict, NS, STREAM, b, a) for b, a in zip(batches, adapt, strict=True)
        ]
        return await _queued(engine, policy, jobs)

    try:
        return asyncio.run(scenario())
    finally:
        engine.close()


def _histogram(engine: Engine, name: str, strategy: str) -> tuple[float, float]:
    """(count, sum) of a (model, strategy) histogram."""
    labels = {"model": "cifar10_wrn40_2", "strategy": strategy}
    count = engine.metrics.registry.get_sample_value(f"{name}_count", labels) or 0.0
    total = engine.metrics.registry.get_sample_value(f"{name}_sum", labels) or 0.0
    return count, total


def _reference(pool: ModelPool, strategy: str, x_u8: torch.Tensor) -> adapters.StepResult:
    handle, strat = pool.get(None), adapters.get_strategy(strategy)
    cfg = strat.parse_config({})
    return strat.step(handle, x_u8.float() / 255, strat.init_state(handle, cfg, 0), cfg, True)


@pytest.mark.parametrize("strategy", ["norm", "tent"])
def test_queued_requests_share_one_step_on_their_concatenation(
    pool: ModelPool, cifar_array: np.ndarray, strategy: str
) -> None:
    batches = _batches(cifar_array, [8, 4, 16])
    engine = _engine(pool)

    async def scenario() -> tuple[list[Any], dict[str, Any], tuple[Any, tuple[float, float]]]:
        policy = await engine.put_policy(NS, STREAM, None, strategy, {}, 0)
        outs = await _queued(
            engine, policy, [functools.partial(engine.predict, NS, STREAM, b, True) for b in batches]
        )
        meta = (await engine.describe(NS, STREAM)).meta
        samples = engine.metrics.samples.labels(policy.model, strategy)._value.get()
        merged = _histogram(engine, "tta_step_requests", strategy)
        return outs, meta, (samples, merged)

    outs, meta, (samples, merged) = asyncio.run(scenario())
    engine.close()
    ref = _reference(pool, strategy, torch.cat(batches))
    start = 0
    for out, b in zip(outs, batches, strict=True):
        assert isinstance(out, PredictOutcome)
        assert (out.requests, out.version, out.adapted) == (3, 1, True)
        assert out.logits.shape[0] == b.shape[0]
        # Each request gets its own rows of the merged step, which is one step on the concatenation.
        torch.testing.assert_close(out.logits, ref.logits[start : start + b.shape[0]], rtol=1e-4, atol=1e-4)
        start += b.shape[0]
    assert meta["steps"] == 1 and meta["samples_seen"] == 28
    assert samples == 28  # the step's metrics are recorded once, not once per request
    assert merged == (1.0, 3.0)  # one step, serving three requests


def test_merging_stops_at_max_step_images(pool: ModelPool, cifar_array: np.ndarray) -> None:
    outs = _run_queued(_engine(pool, max_step_images=12), "norm", _batches(cifar_array, [8, 4, 16, 2]))
    # Oldest first: 8 + 4 fill the first step; 16 runs alone; the 2 behind it get their own step.
    assert [(o.requests, o.version) for o in outs] == [(2, 1), (2, 1), (1, 2), (1, 3)]


def test_max_step_images_one_never_merges(pool: ModelPool, cifar_array: np.ndarray) -> None:
    outs = _run_queued(_engine(pool, max_step_images=1), "norm", _batches(cifar_array, [4, 4, 4]))
    assert [(o.requests, o.version) for o in outs] == [(1, 1), (1, 2), (1, 3)]


def test_adapting_and_frozen_requests_are_not_merged(pool: ModelPool, cifar_array: np.ndarray) -> None:
    batches = _batches(cifar_array, [8, 8, 8])
    first, frozen, third = _run_queued(_engine(pool), "norm", batches, [True, False, True])
    assert (first.requests, third.requests, frozen.requests) == (2, 2, 1)
    assert not frozen.adapted and first.adapted and third.adapted


def test_a_too_small_request_fails_alone(pool: ModelPool, cifar_array: np.ndarray) -> None:
    """tent needs 2 images: a 1-image request errors even though merging would have made it big enough."""
    a, small, c = _run_queued(_engine(pool), "tent", _batches(cifar_array, [8, 1, 8]))
    assert isinstance(small, adapters.BatchTooSmallError)  # the core's error; the API maps it
    assert (a.requests, c.requests, a.version, c.version) == (2, 2, 1, 1)


def test_a_failing_step_fails_every_merged_request_and_keeps_the_state(
    pool: ModelPool, cifar_array: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches(cifar_array, [8, 8, 8])
    engine = _engine(pool)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("device lost")

    async def scenario() -> tuple[list[Any], list[Any], int]:
        policy = await engine.put_policy(NS, STREAM, None, "norm", {}, 0)
        jobs = [functools.partial(engine.predict, NS, STREAM, b, True) for b in batches]
        monkeypatch.setattr(engine, "_compute", broken)
        failed = await _queued(engine, policy, jobs)
        monkeypatch.undo()
        after = await _queued(engine, policy, jobs)
        version = (await engine.describe(NS, STREAM)).version
        return failed, after, version

    failed, after, version = asyncio.run(scenario())
    engine.close()
    assert all(isinstance(e, RuntimeError) and str(e) == "device lost" for e in failed)
    assert not engine.scheduler.queues  # nothing left behind for the next holder
    assert [o.version for o in after] == [1, 1, 1] and version == 1


def test_a_cancelled_request_is_not_served(pool: ModelPool, cifar_array: np.ndarray) -> None:
    batches = _batches(cifar_array, [8, 8, 8])
    engine = _engine(pool)

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        policy = await engine.put_policy(NS, STREAM, None, "norm", {}, 0)
        async with engine.scheduler.locks.hold(f"{NS}/{STREAM}"):
            tasks = await _start_predicts(engine, policy, batches)
            tasks[1].cancel()  # the client went away while waiting
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        meta = (await engine.describe(NS, STREAM)).meta
        return outs, meta

    (a, cancelled, c), meta = asyncio.run(scenario())
    engine.close()
    assert isinstance(cancelled, asyncio.CancelledError)
    assert (a.requests, c.requests) == (2, 2) and meta["samples_seen"] == 16


# ------------------------------------------------------------------ forwards shared across streams
def _blocked_engine_run(engine: Engine, jobs: Sequence[Job]) -> list[PredictOutcome | BaseException]:
    """Run `jobs` while the single compute thread is busy, so their steps queue up, then free it."""
    gate = threading.Event()

    async def scenario() -> list[PredictOutcome | BaseException]:
        blocker = asyncio.get_running_loop().run_in_executor(engine.executor, gate.wait)
        tasks = [asyncio.create_task(job()) for job in jobs]
        for _ in range(50):
            await asyncio.sleep(0.01)
        gate.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return asyncio.run(scenario())
    finally:
        engine.close()


def _record_step_many(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Spy on `step_many`: each call appends the batch sizes of the streams it served."""
    calls: list[list[int]] = []
    real = adapters.ComposedStrategy.step_many

    def spy(self: adapters.ComposedStrategy, handle: Any, xs: list[torch.Tensor], *args: Any) -> Any:
        calls.append([x.shape[0] for x in xs])
        return real(self, handle, xs, *args)

    monkeypatch.setattr(adapters.ComposedStrategy, "step_many", spy)
    return calls


def _warm_streams(engine: Engine, strategy: str, streams: list[str], warmup: torch.Tensor) -> list[Any]:
    """Give each stream a stored state (kept on the device), so its next load needs no compute thread."""

    async def scenario() -> list[Any]:
        out = []
        for s in streams:
            policy = await engine.put_policy(NS, s, None, strategy, {}, 0)
            await engine.predict(NS, s, warmup, True)
            handle, strat = engine.pool.get(policy.model), adapters.get_strategy(strategy)
            cfg = strat.parse_config(policy.config)
            loaded = await engine.repository.state_for(NS, s, policy, None, handle, strat, cfg)
            assert loaded is not None and loaded[0] == 1  # the committed state, from the device cache
            out.append((policy, loaded[1]))
        return out

    return asyncio.run(scenario())


@pytest.mark.parametrize("strategy", ["norm", "unmix_tns"])
def test_steps_of_different_streams_share_one_forward(
    pool: ModelPool, cifar_array: np.ndarray, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmup, *batches = _batches(cifar_array, [4, 8, 3, 12])
    engine = _engine(pool, compute_workers=1, share_forward=True)
    streams = [f"s{i}" for i in range(3)]
    before = _warm_streams(engine, strategy, streams, warmup)
    calls = _record_step_many(monkeypatch)
    outs = _blocked_engine_run(
        engine,
        [functools.partial(engine.predict, NS, s, b, True) for s, b in zip(streams, batches, strict=True)],
    )
    assert calls == [[8, 3, 12]]  # one forward for the three streams
    # the warm-up steps ran alone (three forwards of one stream), then one forward of three streams
    assert _histogram(engine, "tta_forward_streams", strategy) == (4.0, 6.0)
    strat = adapters.get_strategy(strategy)
    cfg = strat.parse_config({})
    for out, b, (_, state) in zip(outs, batches, before, strict=True):
        assert isinstance(out, PredictOutcome) and out.adapted and out.version == 2 and out.requests == 1
        # Each stream got exactly what a step of its own gives: its own statistics, nothing mixed.
        want = strat.step(pool.get(None), b.float() / 255, state, cfg, True)
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_gradient_steps_and_disabled_sharing_run_alone(
    pool: ModelPool, cifar_array: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmup, *batches = _batches(cifar_array, [4, 4, 4])
    calls = _record_step_many(monkeypatch)
    # tent never shares; norm shares unless told not to, or (on the CPU, by default) when its steps are
    # larger than share_forward_cpu_images.
    for strategy, share, largest in (("tent", True, 8), ("norm", False, 8), ("norm", None, 3)):
        engine = _engine(pool, compute_workers=1, share_forward=share, share_forward_cpu_images=largest)
        _warm_streams(engine, strategy, ["s0", "s1"], warmup)
        jobs = [functools.partial(engine.predict, NS, f"s{i}", batches[i], True) for i in range(2)]
        outs = _blocked_engine_run(engine, jobs)
        assert all(isinstance(o, PredictOutcome) and o.adapted and o.version == 2 for o in outs)
    assert calls == []


def test_small_cpu_steps_share_a_forward_by_default(
    pool: ModelPool, cifar_array: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """share_forward unset on the CPU: steps of at most share_forward_cpu_images images share."""
    warmup, *batches = _batches(cifar_array, [4, 1, 1, 2])
    calls = _record_step_many(monkeypatch)
    engine = _engine(pool, compute_workers=1, share_forward_cpu_images=2)
    streams = ["s0", "s1", "s2"]
    _warm_streams(engine, "alpha_bn", streams, warmup)
    jobs = [functools.partial(engine.predict, NS, s, b, True) for s, b in zip(streams, batches, strict=True)]
    outs = _blocked_engine_run(engine, jobs)
    assert all(isinstance(o, PredictOutcome) and o.adapted for o in outs)
    assert calls == [[1, 1, 2]]


def test_a_cancelled_lock_holder_still_serves_the_requests_merged_into_its_step(
    pool: ModelPool, cifar_array: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches(cifar_array, [8, 8, 8])
    engine = _engine(pool)
    real_step = engine._compute
    started = asyncio.Event()

    async def slow_step(*args: Any) -> Any:
        started.set()
        await asyncio.sleep(0.3)
        return await real_step(*args)

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        policy = await engine.put_policy(NS, STREAM, None, "norm", {}, 0)
        monkeypatch.setattr(engine, "_compute", slow_step)
        async with engine.scheduler.locks.hold(f"{NS}/{STREAM}"):
            tasks = await _start_predicts(engine, policy, batches)
        await started.wait()
        tasks[0].cancel()  # the holder's client goes away while the merged step runs
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        meta = (await engine.describe(NS, STREAM)).meta
        return outs, meta

    (holder, b, c), meta = asyncio.run(scenario())
    engine.close()
    assert isinstance(holder, asyncio.CancelledError)
    assert isinstance(b, PredictOutcome) and isinstance(c, PredictOutcome)
    assert (b.requests, c.requests, b.version, c.version) == (3, 3, 1, 1)
    assert meta["steps"] == 1 and meta["samples_seen"] == 24  # the step ran once, for all three
