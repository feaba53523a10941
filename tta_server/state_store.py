"""Where stream policies and adapted states live: Redis for production, a dict for embedded use.

Key scheme (versioned, colon-separated; `ns` is the API key's namespace):
  tta:v1:stream:{ns}:{stream}            JSON policy record (model, strategy, config, seed, epoch)
  tta:v1:state:{ns}:{stream}:{epoch}     hash {v: version, blob: safetensors bytes, meta: JSON}
  tta:v1:drift:{ns}                      sorted set stream -> BN distance EMA (top-N export)
Every key carries the state TTL, refreshed on write. A state write is a compare-and-set on `v`
(one Lua script), so two replicas can never interleave half-updates or silently overwrite each other.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tta_server.errors import StoreUnavailableError

PREFIX = "tta:v1"


def stream_key(ns: str, stream: str) -> str:
    return f"{PREFIX}:stream:{ns}:{stream}"


def state_key(ns: str, stream: str, epoch: int) -> str:
    return f"{PREFIX}:state:{ns}:{stream}:{epoch}"


def drift_key(ns: str) -> str:
    return f"{PREFIX}:drift:{ns}"


# Resets leave the previous epochs' states to expire; deleting a stream removes them too (the most
# recent ones), or re-creating it at epoch 0 would resurrect an old state.
DELETE_EPOCHS = 1024


def epoch_state_keys(ns: str, stream: str, epoch: int) -> list[str]:
    return [state_key(ns, stream, e) for e in range(max(0, epoch - DELETE_EPOCHS + 1), epoch + 1)]


@dataclass(frozen=True)
class StoredState:
    version: int
    blob: bytes | None  # None when only the version/meta were asked for
    meta: dict[str, Any]


class StateStore(Protocol):
    async def ping(self) -> None: ...
    async def get_policy(self, ns: str, stream: str) -> dict[str, Any] | None: ...
    async def set_policy(
        self, ns: str, stream: str, record: dict[str, Any], only_if_new: bool = False
    ) -> bool: ...
    async def delete_stream(self, ns: str, stream: str, epoch: int) -> bool: ...
    async def get_state(self, ns: str, stream: str, epoch: int, with_blob: bool) -> StoredState | None: ...
    async def cas_state(
        self, ns: str, stream: str, epoch: int, expected: int, blob: bytes, meta: dict[str, Any], score: float
    ) -> int | None: ...
    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]: ...
    async def close(self) -> None: ...


class InMemoryStateStore:
    """Single-process store with the same semantics (CAS, TTL) as the Redis one."""

    def __init__(self, ttl_seconds: int) -> None:
        self.ttl = ttl_seconds
        self._data: dict[str, tuple[float, Any]] = {}
        self._lock = asyncio.Lock()

    def _get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None or item[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return item[1]

    def _put(self, key: str, value: Any) -> None:
        self._data[key] = (time.monotonic() + self.ttl, value)

    async def ping(self) -> None:
        return None

    async def get_policy(self, ns: str, stream: str) -> dict[str, Any] | None:
        rec = self._get(stream_key(ns, stream))
        return dict(rec) if rec is not None else None

    async def set_policy(
        self, ns: str, stream: str, record: dict[str, Any], only_if_new: bool = False
    ) -> bool:
        async with self._lock:
            if only_if_new and self._get(stream_key(ns, stream)) is not None:
                return False
            self._put(stream_key(ns, stream), dict(record))
            return True

    async def delete_stream(self, ns: str, stream: str, epoch: int) -> bool:
        async with self._lock:
            existed = self._data.pop(stream_key(ns, stream), None) is not None
            for key in epoch_state_keys(ns, stream, epoch):
                existed |= self._data.pop(key, None) is not None
            board = self._get(drift_key(ns)) or {}
            board.pop(stream, None)
            return existed

    async def get_state(self, ns: str, stream: str, epoch: int, with_blob: bool) -> StoredState | None:
        item = self._get(state_key(ns, stream, epoch))
        if item is None:
            return None
        version, blob, meta = item
        return StoredState(version, blob if with_blob else None, json.loads(meta))

    async def cas_state(
        self, ns: str, stream: str, epoch: int, expected: int, blob: bytes, meta: dict[str, Any], score: float
    ) -> int | None:
        async with self._lock:
            key = state_key(ns, stream, epoch)
            current = self._get(key)
            if (current[0] if current else 0) != expected:
                return None
            self._put(key, (expected + 1, blob, json.dumps(meta)))
            board = self._get(drift_key(ns)) or {}
            board[stream] = score
            self._put(drift_key(ns), board)
            return expected + 1

    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]:
        board = self._get(drift_key(ns)) or {}
        return sorted(board.items(), key=lambda kv: -kv[1])[:n]

    async def close(self) -> None:
        return None


_CAS = """
local v = redis.call('HGET', KEYS[1], 'v')
local cur = 0
if v then cur = tonumber(v) end
if cur ~= tonumber(ARGV[1]) then return -1 end
local nv = cur + 1
redis.call('HSET', KEYS[1], 'v', nv, 'blob', ARGV[2], 'meta', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return nv
"""


class RedisStateStore:
    """redis-py (hiredis parser) over asyncio; every Redis failure surfaces as StoreUnavailableError (503)."""

    def __init__(self, url: str, ttl_seconds: int, timeout: float) -> None:
        self.ttl_ms = ttl_seconds * 1000
        self.client = aioredis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            # One immediate retry on a dropped connection: after a Redis restart every pooled connection is
            # dead, and each would otherwise fail one request. Timeouts are not retried (fail fast).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._cas = self.client.register_script(_CAS)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailableError(f"state store unavailable: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def get_policy(self, ns: str, stream: str) -> dict[str, Any] | None:
        raw = await self._call(self.client.get(stream_key(ns, stream)))
        return json.loads(raw) if raw else None

    async def set_policy(
        self, ns: str, stream: str, record: dict[str, Any], only_if_new: bool = False
    ) -> bool:
        ok = await self._call(
            self.client.set(stream_key(ns, stream), json.dumps(record), px=self.ttl_ms, nx=only_if_new)
        )
        return bool(ok)

    async def delete_stream(self, ns: str, stream: str, epoch: int) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(stream_key(ns, stream), *epoch_state_keys(ns, stream, epoch))
        pipe.zrem(drift_key(ns), stream)
        deleted, _ = await self._call(pipe.execute())
        return bool(deleted)

    async def get_state(self, ns: str, stream: str, epoch: int, with_blob: bool) -> StoredState | None:
        fields = ("v", "meta", "blob") if with_blob else ("v", "meta")
        values = await self._call(self.client.hmget(state_key(ns, stream, epoch), fields))
        if values[0] is None:
            return None
        return StoredState(int(values[0]), values[2] if with_blob else None, json.loads(values[1]))

    async def cas_state(
        self, ns: str, stream: str, epoch: int, expected: int, blob: bytes, meta: dict[str, Any], score: float
    ) -> int | None:
        keys = [state_key(ns, stream, epoch), drift_key(ns), stream_key(ns, stream)]
        args = [expected, blob, json.dumps(meta), self.ttl_ms, score, stream]
        result = await self._call(self._cas(keys=keys, args=args))
        return None if int(result) < 0 else int(result)

    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]:
        rows = await self._call(self.client.zrevrange(drift_key(ns), 0, n - 1, withscores=True))
        return [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in rows]

    async def close(self) -> None:
        await self.client.aclose()
