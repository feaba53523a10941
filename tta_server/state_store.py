"""Where stream policies and adapted states live: Redis for production, a dict for embedded use.

Key scheme (prefix versioned; `{...}` is a Redis Cluster hash tag, so both keys of one stream share a
slot and every multi-key operation on a stream stays in that slot):

  tta:v2:{<ns>/<stream>}:policy   hash  inc (incarnation id), v (last committed version), rec (policy JSON)
  tta:v2:{<ns>/<stream>}:state    hash  inc, v, blob (safetensors), meta (JSON), policy (copy of rec)
  tta:v2:drift:{<ns>/<shard>}     zset  stream -> BN-distance EMA, 16 shards per namespace

`/` never occurs in a namespace or stream id, so the tag cannot be forged by a stream name. The drift
board is split into shards by a hash of the stream id: one namespace's board spreads over 16 slots
instead of making one slot hot; the top-N read merges the shards' top-N.

A state is valid only under the incarnation its record names: every create, policy change, reset and
delete-and-recreate draws a fresh random incarnation, so no old state can ever be read or committed on
(the version sequence may restart; the incarnation never repeats). A state write is one compare-and-set
script over the policy's incarnation and the state's version. Both keys carry the state TTL, refreshed
together by every read and write, so a stream in use (adapting or not) never expires.

Connectors (one setting, `TTA_REDIS_URL`, parsed by :func:`parse_store_url`):

  redis://[user:pass@]host:port/db                          one server (also rediss://, unix://)
  redis+cluster://[user:pass@]host:port[,host:port...]      Redis Cluster from its startup nodes (db 0 only)
  redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/db]   the primary Sentinel names

Every script touches the keys of one stream only (one hash tag, one slot). The commit pipeline holds the
script, an optional WAIT and the drift-board update; under Cluster redis-py sends each node its own part
of it on one connection (the script and its WAIT go to the stream's primary, the board update to the
board shard's), so nothing crosses a slot. The board was never atomic with the commit (advisory, see
`cas`), so nothing is lost by splitting. MOVED/ASK redirects, cluster failovers and Sentinel primary
changes are followed by the redis-py clients; a request caught in the failover answers 503.

The store returns raw fields; `tta_server.records` decodes them defensively.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.typing import EncodableT

from tta_server.errors import StateCorruptError, StoreFullError, StoreUnavailableError, TTAError

log = logging.getLogger(__name__)

PREFIX = "tta:v2"
DRIFT_SHARDS = 16


def _tag(ns: str, stream: str) -> str:
    return f"{{{ns}/{stream}}}"


def policy_key(ns: str, stream: str) -> str:
    return f"{PREFIX}:{_tag(ns, stream)}:policy"


def state_key(ns: str, stream: str) -> str:
    return f"{PREFIX}:{_tag(ns, stream)}:state"


def drift_shard(stream: str) -> int:
    return zlib.crc32(stream.encode()) % DRIFT_SHARDS


def drift_key(ns: str, shard: int) -> str:
    return f"{PREFIX}:drift:{{{ns}/{shard}}}"


StoreKind = Literal["standalone", "cluster", "sentinel"]


@dataclass(frozen=True)
class StoreUrl:
    """A parsed `TTA_REDIS_URL`: which kind of Redis, its seed nodes and (Sentinel) service name."""

    kind: StoreKind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_store_url(url: str) -> StoreUrl:
    """Parse and check a store URL; a malformed one raises ValueError saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"redis_url {url!r} has no scheme (redis://, redis+cluster://, redis+sentinel://)")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        try:
            aioredis.connection.parse_url(url)
        except ValueError as exc:
            raise ValueError(f"redis_url {url!r}: {exc}") from exc
        db_path = urlsplit(url).path.strip("/")
        if scheme != "unix" and db_path and not db_path.isdigit():
            raise ValueError(f"redis_url {url!r}: the database {db_path!r} is not a number")
        return StoreUrl("standalone", url)
    if scheme not in ("redis+cluster", "redis+sentinel"):
        raise ValueError(
            f"redis_url scheme {scheme!r} is not one of redis, rediss, unix, redis+cluster, redis+sentinel"
        )
    parts = urlsplit("x://" + rest)
    username, password, nodes = _userinfo_and_nodes(url, parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    if parts.query or parts.fragment:
        raise ValueError(f"redis_url {url!r}: query options are not supported for {scheme}")
    if scheme == "redis+cluster":
        if path and path != ["0"]:
            raise ValueError(f"redis_url {url!r}: Redis Cluster has database 0 only; give no path")
        return StoreUrl("cluster", url, tuple(nodes), None, 0, username, password)
    if not path or len(path) > 2:
        raise ValueError(f"redis_url {url!r}: give the Sentinel service name: .../<service>[/db]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"redis_url {url!r}: the database {path[1]!r} is not a number")
    db = int(path[1]) if len(path) == 2 else 0
    return StoreUrl("sentinel", url, tuple(nodes), unquote(path[0]), db, username, password)


def _userinfo_and_nodes(url: str, netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
        if not colon:  # `password@host`, as redis:// allows
            username, password = None, unquote(user)
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis_url {url!r}: {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return username, password, nodes


@dataclass(frozen=True)
class RawStream:
    """A stream's stored fields as bytes, undecoded. `state_blob` is None when the caller's cached copy
    (same incarnation and version) is current; `wrong_type` names a key holding something else than a hash."""

    policy: dict[str, bytes] | None
    state: dict[str, bytes] | None
    wrong_type: str | None = None


class CasOutcome:
    GONE = -2  # the stream's incarnation changed (deleted, reset or re-created): nothing written
    CONFLICT = -1  # another step committed first


class StateStore(Protocol):
    async def ping(self) -> None: ...
    async def load(self, ns: str, stream: str, cached: tuple[str, int] | None) -> RawStream: ...
    async def create(self, ns: str, stream: str, inc: str, rec: bytes, version: int = 0) -> bool: ...
    async def replace(
        self, ns: str, stream: str, inc: str, rec: bytes, expected: str | None = None
    ) -> bool: ...
    async def delete(self, ns: str, stream: str) -> bool: ...
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
    ) -> int: ...
    async def set_drift(self, ns: str, stream: str, score: float | None) -> None: ...
    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]: ...
    async def close(self) -> None: ...


def _wants_blob(state: dict[str, bytes], cached: tuple[str, int] | None) -> bool:
    if cached is None:
        return True
    try:
        return (state.get("inc", b"").decode(), int(state.get("v", b"-1"))) != cached
    except (UnicodeDecodeError, ValueError):
        return True


class InMemoryStateStore:
    """Single-process store with the same records and semantics (incarnations, CAS, TTL) as Redis."""

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

    def _touch(self, *keys: str) -> None:
        for key in keys:
            value = self._get(key)
            if value is not None:
                self._put(key, value)

    async def ping(self) -> None:
        return None

    async def load(self, ns: str, stream: str, cached: tuple[str, int] | None) -> RawStream:
        pk, sk = policy_key(ns, stream), state_key(ns, stream)
        policy, state = self._get(pk), self._get(sk)
        self._touch(pk, sk)
        if state is not None and not _wants_blob(state, cached):
            state = {k: v for k, v in state.items() if k != "blob"}
        return RawStream(dict(policy) if policy else None, dict(state) if state else None)

    async def create(self, ns: str, stream: str, inc: str, rec: bytes, version: int = 0) -> bool:
        async with self._lock:
            if self._get(policy_key(ns, stream)) is not None:
                return False
            self._put(policy_key(ns, stream), {"inc": inc.encode(), "v": str(version).encode(), "rec": rec})
            return True

    async def replace(self, ns: str, stream: str, inc: str, rec: bytes, expected: str | None = None) -> bool:
        async with self._lock:
            if expected is not None:
                current = self._get(policy_key(ns, stream))
                if not isinstance(current, dict) or current.get("inc") != expected.encode():
                    return False
            self._data.pop(state_key(ns, stream), None)
            self._put(policy_key(ns, stream), {"inc": inc.encode(), "v": b"0", "rec": rec})
            self._set_drift(ns, stream, None)
            return True

    async def delete(self, ns: str, stream: str) -> bool:
        async with self._lock:
            existed = self._data.pop(policy_key(ns, stream), None) is not None
            existed |= self._data.pop(state_key(ns, stream), None) is not None
            self._set_drift(ns, stream, None)
            return existed

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
        async with self._lock:
            pk, sk = policy_key(ns, stream), state_key(ns, stream)
            policy = self._get(pk)
            if policy is None or policy.get("inc") != inc.encode():
                self._set_drift(ns, stream, None)
                return CasOutcome.GONE
            state = self._get(sk)
            current = int(state["v"]) if state and state.get("inc") == inc.encode() else 0
            if current != expected:
                self._set_drift(ns, stream, drift)
                return CasOutcome.CONFLICT
            nv = str(expected + steps).encode()
            self._put(sk, {"inc": inc.encode(), "v": nv, "blob": blob, "meta": meta, "policy": rec})
            self._put(pk, {**policy, "v": nv})
            self._set_drift(ns, stream, drift)
            return expected + steps

    async def set_drift(self, ns: str, stream: str, score: float | None) -> None:
        self._set_drift(ns, stream, score)

    def _set_drift(self, ns: str, stream: str, score: float | None) -> None:
        key = drift_key(ns, drift_shard(stream))
        board = self._get(key) or {}
        if score is None:
            board.pop(stream, None)
        else:
            board[stream] = score
        self._put(key, board)

    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]:
        rows: list[tuple[str, float]] = []
        for shard in range(DRIFT_SHARDS):
            rows.extend((self._get(drift_key(ns, shard)) or {}).items())
        return sorted(rows, key=lambda kv: -kv[1])[:n]

    async def close(self) -> None:
        return None


# KEYS: policy, state. ARGV: cached incarnation ('' = none), cached version, TTL ms.
# Returns {wrong-typed key or '', #policy fields, policy fields..., state fields...}: a key holding anything
# but a hash is named and not read, so the other record still is.
_LOAD = """
local bad = ''
local p = {}
local s = {}
local tp = redis.call('TYPE', KEYS[1])['ok']
if tp == 'hash' then p = redis.call('HGETALL', KEYS[1]) elseif tp ~= 'none' then bad = KEYS[1] end
local ts = redis.call('TYPE', KEYS[2])['ok']
if ts == 'hash' then
  local f = redis.call('HMGET', KEYS[2], 'inc', 'v', 'meta', 'policy')
  local names = {'inc', 'v', 'meta', 'policy'}
  for i = 1, 4 do
    if f[i] then s[#s + 1] = names[i]; s[#s + 1] = f[i] end
  end
  if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then
    local b = redis.call('HGET', KEYS[2], 'blob')
    if b then s[#s + 1] = 'blob'; s[#s + 1] = b end
  end
elseif ts ~= 'none' then
  bad = KEYS[2]
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local out = {bad, #p}
for _, x in ipairs(p) do out[#out + 1] = x end
for _, x in ipairs(s) do out[#out + 1] = x end
return out
"""

# KEYS: policy, state. ARGV: incarnation, expected version, blob, meta, policy copy, TTL ms, commit token,
# steps (the new version is expected + steps: a write-back of several steps held on a replica counts them all).
# The token makes a re-sent commit idempotent: redis-py re-sends a command whose connection dropped (a Cluster
# failover), and when the first send had been applied the second finds its own token and answers the version
# it wrote, instead of a conflict that would make the engine apply the same batch a second time.
_CAS = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return -2 end
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return -2 end
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'hash' and t ~= 'none' then return -3 end
local cur = 0
if redis.call('HGET', KEYS[2], 'inc') == ARGV[1] then cur = tonumber(redis.call('HGET', KEYS[2], 'v')) or -1 end
local nv = tonumber(ARGV[2]) + tonumber(ARGV[8])
if cur == nv and redis.call('HGET', KEYS[2], 'tok') == ARGV[7] then return cur end
if cur ~= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[2], 'inc', ARGV[1], 'v', nv, 'blob', ARGV[3], 'meta', ARGV[4], 'policy', ARGV[5],
  'tok', ARGV[7])
redis.call('HSET', KEYS[1], 'v', nv)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return nv
"""

# KEYS: policy. ARGV: incarnation, version, rec, TTL ms. Creates only where no policy record exists.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'v', ARGV[2], 'rec', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: policy, state. ARGV: incarnation, rec, TTL ms, expected incarnation ('' = replace whatever is there).
# Drops the old state with the old policy: DEL works on a key of any type, so this also repairs.
_REPLACE = """
if ARGV[4] ~= '' then
  local cur = false
  if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then cur = redis.call('HGET', KEYS[1], 'inc') end
  if cur ~= ARGV[4] then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'v', 0, 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisStateStore:
    """redis-py (hiredis parser) over asyncio, on one server, a Cluster or a Sentinel-managed primary.
    Redis unreachable (or failing over) -> StoreUnavailableError (503); Redis out of memory ->
    StoreFullError (503, counted apart); a key of the wrong type -> StateCorruptError.

    `wait_replicas` > 0: every commit (state CAS, policy create/replace) is followed, on the same
    connection and in the same round trip, by `WAIT wait_replicas wait_timeout_ms`; the answer is
    only sent once that many replicas have the write or the timeout passed (then the commit stands
    on the primary alone: logged and counted in `wait_shortfalls`)."""

    def __init__(
        self,
        url: str,
        ttl_seconds: int,
        timeout: float,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.ttl_ms = ttl_seconds * 1000
        self.target = parse_store_url(url)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.wait_shortfalls = 0
        self._sentinel: Sentinel | None = None
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "username": self.target.username,
            "password": self.target.password,
        }
        if self.target.kind == "cluster":
            # A dead primary's slots move to its replica within the cluster's node timeout: a few quick
            # retries (each re-reads the slot map) ride out redirects; a longer outage fails fast (503).
            self.client: Any = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self.target.nodes],
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
                **common,
            )
        elif self.target.kind == "sentinel":
            self._sentinel = Sentinel(
                list(self.target.nodes),
                sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
                **common,
            )
            assert self.target.service is not None
            # Each new connection asks the sentinels for the current primary; a connection to a demoted
            # one fails (READONLY -> ConnectionError) and the one retry reconnects to the new primary.
            self.client = self._sentinel.master_for(
                self.target.service,
                db=self.target.db,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        else:
            self.client = aioredis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                health_check_interval=30,
                # One immediate retry on a dropped connection: after a Redis restart every pooled connection
                # is dead, and each would otherwise fail one request. Timeouts are not retried (fail fast).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        self._load = self.client.register_script(_LOAD)
        self._cas = self.client.register_script(_CAS)
        self._create = self.client.register_script(_CREATE)
        self._replace = self.client.register_script(_REPLACE)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("OOM") or "maxmemory" in text:
                raise StoreFullError(f"state store is full: {text}") from exc
            if "WRONGTYPE" in text:
                raise StateCorruptError(
                    "a stored record has the wrong type; DELETE the stream", detail={"store": text}
                ) from exc
            raise _unavailable(f"state store error: {text}") from exc
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise _unavailable(f"state store unavailable: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if not _closed_transport(exc):
                raise  # any other RuntimeError is a bug: 500 with a request id
            raise _unavailable(f"state store connection lost: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def load(self, ns: str, stream: str, cached: tuple[str, int] | None) -> RawStream:
        keys = [policy_key(ns, stream), state_key(ns, stream)]
        inc, version = cached if cached else ("", -1)
        out = await self._call(self._load(keys=keys, args=[inc, version, self.ttl_ms]))
        n = int(out[1])
        policy, state = _pairs(out[2 : 2 + n]), _pairs(out[2 + n :])
        return RawStream(policy or None, state or None, wrong_type=out[0].decode() or None)

    async def create(self, ns: str, stream: str, inc: str, rec: bytes, version: int = 0) -> bool:
        args: list[EncodableT] = [inc, version, rec, self.ttl_ms]
        replies = await self._commit(self._create, [policy_key(ns, stream)], args, [])
        return bool(replies[0])

    async def replace(self, ns: str, stream: str, inc: str, rec: bytes, expected: str | None = None) -> bool:
        keys = [policy_key(ns, stream), state_key(ns, stream)]
        replies = await self._commit(self._replace, keys, [inc, rec, self.ttl_ms, expected or ""], [])
        done = replies[0]
        if done:
            await self.set_drift(ns, stream, None)
        return bool(done)

    async def delete(self, ns: str, stream: str) -> bool:
        deleted = await self._call(self.client.delete(policy_key(ns, stream), state_key(ns, stream)))
        await self.set_drift(ns, stream, None)
        return bool(deleted)

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
        """The compare-and-set and the drift-board update in one round trip (the board lives in other hash
        slots, so no script may touch both). The board is advisory: a conflicting step's score is still
        this stream's; a replaced stream's entry is removed again (rare, one more round trip), and readers
        skip streams that no longer exist."""
        keys = [policy_key(ns, stream), state_key(ns, stream)]
        token = secrets.token_hex(8)  # one per commit; every re-send of it carries the same
        args: list[EncodableT] = [inc, expected, blob, meta, rec, self.ttl_ms, token, steps]
        board = drift_key(ns, drift_shard(stream))
        extra: list[tuple[Any, ...]] = (
            [("ZREM", board, stream)]
            if drift is None
            else [("ZADD", board, drift, stream), ("PEXPIRE", board, self.ttl_ms)]
        )
        replies = await self._commit(self._cas, keys, args, extra)
        for reply in replies[1:]:
            if isinstance(reply, Exception):
                log.warning("drift board of %s not updated: %s", ns, reply)
        first = replies[0]
        result = int(first)
        if result == CasOutcome.GONE:  # the board entry was this stream's old incarnation's
            await self.set_drift(ns, stream, None)
        if result == -3:
            raise StateCorruptError("the stored state has the wrong type; DELETE the stream")
        return result

    async def _commit(
        self, script: Any, keys: list[str], args: list[EncodableT], extra: list[tuple[Any, ...]]
    ) -> list[Any]:
        """One round trip: EVALSHA of `script`, WAIT (when configured) on the same connection, then
        `extra` commands (other slots: under Cluster sent to their own nodes in the same round). Returns
        the script's reply (an exception is raised) followed by the extra commands' replies or errors."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            # EVALSHA, not the Script object: a pipeline holding Script objects first asks SCRIPT EXISTS,
            # one more round trip on every commit. A server that lost its scripts (a restarted or newly
            # promoted primary) answers NOSCRIPT, having written nothing: load and send again.
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            if self.wait_replicas:
                wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
                if self.target.kind == "cluster":
                    await self.client.initialize()
                    node = self.client.get_node_from_key(keys[0])
                    pipe.execute_command(*wait, target_nodes=node)
                else:
                    pipe.execute_command(*wait)
            for command in extra:
                pipe.execute_command(*command)
            replies = await self._call(pipe.execute(raise_on_error=False))
            first = replies[0]
            if isinstance(first, NoScriptError) and attempt == 0:
                await self._call(self.client.script_load(script.script))
                continue
            if isinstance(first, Exception):
                await self._call(_raise(first))
            if self.wait_replicas:
                acked = replies[1]
                if isinstance(acked, Exception):
                    await self._call(_raise(acked))
                if int(acked) < self.wait_replicas:
                    self.wait_shortfalls += 1
                    log.warning(
                        "a commit reached %s of %d replicas within %d ms; it stands on the primary",
                        acked,
                        self.wait_replicas,
                        self.wait_timeout_ms,
                    )
                return [first, *replies[2:]]
            return list(replies)
        raise _unavailable("state store lost its scripts twice in a row")

    async def set_drift(self, ns: str, stream: str, score: float | None) -> None:
        key = drift_key(ns, drift_shard(stream))
        if score is None:
            await self._call(self.client.zrem(key, stream))
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(key, {stream: score})
        pipe.pexpire(key, self.ttl_ms)
        await self._call(pipe.execute())

    async def top_drift(self, ns: str, n: int) -> list[tuple[str, float]]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(DRIFT_SHARDS):
            pipe.zrevrange(drift_key(ns, shard), 0, n - 1, withscores=True)
        rows = [
            (m.decode() if isinstance(m, bytes) else m, float(s))
            for shard_rows in await self._call(pipe.execute())
            for m, s in shard_rows
        ]
        return sorted(rows, key=lambda kv: -kv[1])[:n]

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()


def _pairs(flat: Sequence[Any]) -> dict[str, bytes]:
    it = iter(flat)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(it, it, strict=True)}


async def _raise(exc: Exception) -> Any:
    raise exc


def _unavailable(message: str) -> TTAError:
    # Every store outage answers 503 with Retry-After, as an overloaded replica does: the client's
    # retry waits that long instead of its own backoff's guess.
    return StoreUnavailableError(message, headers={"Retry-After": "1"})


# uvloop's transports (uvicorn runs on uvloop when it is installed) raise this RuntimeError, not an
# OSError, on a write to a transport that is already closed; redis-py maps only OSError to its
# ConnectionError, so a pooled connection whose peer vanished (a Redis primary killed mid-failover)
# lets it through. It is a connection loss like any other, so it is matched by uvloop's exact wording
# *and* by a redis-py frame in its traceback: a RuntimeError of our own code (or a closed transport
# that is not the store's) stays a bug and answers 500.
_UVLOOP_CLOSED = re.compile(r"unable to perform operation on <\w+Transport .*>; the handler is closed")


def _closed_transport(exc: RuntimeError) -> bool:
    if not _UVLOOP_CLOSED.fullmatch(str(exc)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("redis."):
            return True
        tb = tb.tb_next
    return False
