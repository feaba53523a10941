"""A small reverse proxy in front of server replicas: consistent hashing on the stream id, or round robin.

``/v1/streams/<id>...`` requests go to the replica that owns ``<id>`` on a hash ring (64 virtual nodes per
replica); a replica that refuses the connection is marked down for ``down_seconds`` and the request goes
to the next replica on the ring, so a stream moves only when its replica leaves, and comes back when it
returns. Other paths (and ``mode="round-robin"``) rotate over the replicas that are up. This is what the
shipped nginx config does (``hash $tta_stream consistent``), in Python, for benches and tests.

`ProxyLog` keeps, per stream, the replicas that answered in order: the affinity figures of
``tta-bench multinode`` come from it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

__all__ = ["HashRing", "ProxyApp", "ProxyLog", "serve_proxy"]

STREAM_PATH = re.compile(r"^/v1/streams/([^/?]+)")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class HashRing:
    """Consistent hashing: each node owns ``vnodes`` points of a 64-bit ring."""

    def __init__(self, nodes: list[str], vnodes: int = 64) -> None:
        self.nodes = list(nodes)
        points = [(self._hash(f"{node}#{i}"), node) for node in nodes for i in range(vnodes)]
        points.sort()
        self._keys = [p for p, _ in points]
        self._owners = [n for _, n in points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def order(self, key: str) -> list[str]:
        """Every node, the key's owner first, then the next distinct nodes clockwise (the fallbacks)."""
        start = bisect.bisect(self._keys, self._hash(key)) % len(self._keys)
        seen: list[str] = []
        for i in range(len(self._keys)):
            node = self._owners[(start + i) % len(self._keys)]
            if node not in seen:
                seen.append(node)
                if len(seen) == len(self.nodes):
                    break
        return seen


@dataclass
class ProxyLog:
    upstream: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    fallbacks: int = 0
    no_upstream: int = 0


class ProxyApp:
    """The ASGI app of the proxy (run it with uvicorn; see :func:`serve_proxy`)."""

    def __init__(
        self,
        upstreams: list[str],
        mode: Literal["hash", "round-robin"] = "hash",
        *,
        down_seconds: float = 2.0,
        timeout: float = 60.0,
    ) -> None:
        self.upstreams = list(upstreams)
        self.mode = mode
        self.ring = HashRing(self.upstreams)
        self.down_seconds = down_seconds
        self.down_until: dict[str, float] = {}
        self.log = ProxyLog()
        self._rr = itertools.count()
        self.client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=1024, keepalive_expiry=2.0)
        )

    def candidates(self, path: str) -> tuple[str | None, list[str]]:
        m = STREAM_PATH.match(path)
        stream = m.group(1) if m else None
        if self.mode == "hash" and stream is not None:
            order = self.ring.order(stream)
        else:
            k = next(self._rr) % len(self.upstreams)
            order = self.upstreams[k:] + self.upstreams[:k]
        now = time.monotonic()
        up = [u for u in order if self.down_until.get(u, 0.0) <= now]
        return stream, up + [u for u in order if u not in up]  # all down: try them anyway

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        query = scope.get("query_string", b"").decode()
        headers = [
            (k.decode(), v.decode()) for k, v in scope["headers"] if k.decode().lower() not in _HOP_HEADERS
        ]
        stream, order = self.candidates(path)
        for i, base in enumerate(order):
            try:
                resp = await self.client.request(
                    scope["method"],
                    f"{base}{path}" + (f"?{query}" if query else ""),
                    headers=headers,
                    content=body,
                )
            except httpx.ConnectError:
                # The replica is gone: take it out for a while, send the request to the next one.
                self.down_until[base] = time.monotonic() + self.down_seconds
                if i + 1 < len(order):
                    self.log.fallbacks += 1
                continue
            except httpx.TransportError as exc:
                # It went (or is too slow) mid-request: the request may have been applied, so it is not
                # sent again. A timeout is a slow replica, which stays in rotation (504); a lost one is
                # taken out and the client gets a 503 (retry later), as from a store failing mid-commit.
                if isinstance(exc, httpx.TimeoutException):
                    await _plain(send, 504, b"replica did not answer in time")
                    return
                self.down_until[base] = time.monotonic() + self.down_seconds
                await _plain(send, 503, b"replica lost mid-request")
                return
            if stream is not None:
                self.log.upstream[stream].append(self.upstreams.index(base))
            out = [(k.encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS]
            out.append((b"x-tta-upstream", base.encode()))
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            await send({"type": "http.response.body", "body": resp.content})
            return
        self.log.no_upstream += 1
        await _plain(send, 502, b"no replica reachable")


async def _plain(send: Any, status: int, text: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


async def serve_proxy(app: ProxyApp, port: int) -> tuple[Any, asyncio.Task[None]]:
    """Run `app` on 127.0.0.1:port in this event loop; returns (uvicorn server, its task)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    return server, task
