"""Admission per stream, stream locks, merging of queued requests, and shared forwards across streams.

The scheduler decides *when* and *with what* a step runs; what a step does is the caller's `serve`
callback (engine) and `compute` function (a pure function run on a compute thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from tta_server.errors import OverloadedError

T = TypeVar("T")
R = TypeVar("R")


class Deadline(Protocol):
    """When a request stops being worth serving (tta_server.admission builds them from the request)."""

    def expired(self) -> bool: ...


@dataclass(eq=False)
class Pending(Generic[R]):
    """A request waiting for its stream; whoever holds the stream lock may serve it in a merged step."""

    x: torch.Tensor
    future: asyncio.Future[R]
    deadline: Deadline | None = None
    queued_at: float = field(default_factory=time.perf_counter)

    def gone(self) -> bool:
        """Its client will never read the answer: cancelled, or past its deadline."""
        return self.future.done() or (self.deadline is not None and self.deadline.expired())


class StreamLocks:
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


@dataclass(eq=False)
class _SharedJob:
    """One stream's step waiting to share a forward with other streams' steps."""

    run_one: Callable[[], Any]  # the step alone, if it ends up by itself
    args: Any  # what `run_many` needs of this job
    future: asyncio.Future[Any]


def fitting(sizes: list[int], cap: int) -> int:
    """How many leading items (at least one) fit in `cap` images together."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > cap:
            return n
    return len(sizes)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class Scheduler:
    def __init__(self, executor: ThreadPoolExecutor, max_step_images: int, max_stream_queue: int) -> None:
        self.executor = executor
        self.max_step_images = max_step_images
        self.max_stream_queue = max_stream_queue
        self.locks = StreamLocks()
        # Requests queued behind a stream's lock, per (stream incarnation key, adapt): merged into one step.
        self.queues: dict[tuple[str, bool], list[Pending[Any]]] = {}
        self._inflight: set[asyncio.Future[None]] = set()  # merged steps running (kept referenced)
        # Steps of different streams waiting for a compute thread, per (model, strategy, config, adapt).
        self._shared: dict[tuple[str, ...], list[_SharedJob]] = {}
        self._shared_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Torch work happens off the event loop, on the compute threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ----------------------------------------------------------- one stream's queue
    async def submit(
        self,
        lock_key: str,
        queue_key: tuple[str, bool],
        x: torch.Tensor,
        deadline: Deadline | None,
        serve: Callable[[list[Pending[R]]], Awaitable[None]],
    ) -> R:
        """Queue `x` on its stream; the request holding the stream lock serves every request queued by
        then (up to `max_step_images` images) in one step through `serve`, which settles their futures."""
        queue = self.queues.setdefault(queue_key, [])
        if len(queue) >= self.max_stream_queue:
            if not queue:
                self.queues.pop(queue_key, None)
            raise OverloadedError(
                f"this stream already has {len(queue)} requests waiting; retry later",
                headers={"Retry-After": "1"},
            )
        me: Pending[R] = Pending(x, asyncio.get_running_loop().create_future(), deadline)
        queue.append(me)
        try:
            async with self.locks.hold(lock_key):
                if me in queue:  # not yet taken into the step of a request ahead of it
                    # Shielded: if this request is cancelled (client gone), the step still runs to the end
                    # for the requests merged into it.
                    task = asyncio.ensure_future(serve(self._take(queue, me)))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                    await asyncio.shield(task)
        finally:
            if me in queue:
                queue.remove(me)  # cancelled while waiting
            if not queue:
                self.queues.pop(queue_key, None)
        # Done, or still running in the step of a request ahead of it that was cancelled meanwhile.
        return await me.future

    def _take(self, queue: list[Pending[Any]], me: Pending[Any]) -> list[Pending[Any]]:
        """`me` plus the requests queued behind it, oldest first, up to `max_step_images` in all."""
        queue.remove(me)
        group = [me, *queue]
        n = fitting([p.x.shape[0] for p in group], self.max_step_images)
        del queue[: n - 1]
        return group[:n]

    # -------------------------------------------------------------- shared forwards
    async def shared(
        self,
        key: tuple[str, str, dict[str, Any], bool],
        run_one: Callable[[], T],
        args: Any,
        run_many: Callable[[list[Any]], list[T]],
    ) -> T:
        """Queue this stream's step; the compute thread that picks the queue up runs every step queued by
        then under the same key (model, strategy, config, adapt) as one `run_many` call.

        Nothing waits on a timer: steps only share a forward when they would have queued for the compute
        threads anyway.
        """
        model, strategy, config, adapt = key
        qkey = (model, strategy, json.dumps(config, sort_keys=True), str(adapt))
        loop = asyncio.get_running_loop()
        job = _SharedJob(run_one, args, loop.create_future())
        with self._shared_lock:
            queue = self._shared.setdefault(qkey, [])
            queue.append(job)
            first = len(queue) == 1
        if first:
            loop.run_in_executor(self.executor, self._drain, qkey, run_many, loop)
        result: T = await job.future
        return result

    def _drain(
        self,
        qkey: tuple[str, ...],
        run_many: Callable[[list[Any]], list[Any]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Compute thread: run the queued steps of `qkey` (up to max_step_images images) as one call."""
        with self._shared_lock:
            queue = self._shared.pop(qkey, [])
            sizes = [sum(b.shape[0] for b in job.args[0]) for job in queue]
            n = fitting(sizes, self.max_step_images)
            group, rest = queue[:n], queue[n:]
            if rest:
                self._shared[qkey] = rest
                loop.call_soon_threadsafe(
                    loop.run_in_executor, self.executor, self._drain, qkey, run_many, loop
                )
        if not group:
            return
        try:
            results = [group[0].run_one()] if len(group) == 1 else run_many([j.args for j in group])
        except Exception as exc:
            for job in group:
                loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        for job, result in zip(group, results, strict=True):
            loop.call_soon_threadsafe(_settle, job.future, result, None)
