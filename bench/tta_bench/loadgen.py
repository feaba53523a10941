"""A lean HTTP/1.1 load generator: one keep-alive connection per simulated client, nothing else.

With many small requests the load generator runs on the same cores as the server it measures: httpx's
async client spends about as much CPU per request as the server does (measured: 64 clients posting one
image each took 0.9 of a core for 40 requests/s), so what it measured was mostly itself. This client
writes each request in one `write` and reads the answer by its Content-Length, a few tens of
microseconds per request. It speaks only to servers whose answers carry Content-Length (no chunked
transfer encoding), which the bench's servers do.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


class LoadError(RuntimeError):
    """A request failed (connection, status, or an answer this client cannot read)."""


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/octet-stream"
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        reused = self._writer is not None
        status_line = await self._send(head + body)
        if not status_line and reused:
            # The server closed the idle keep-alive connection (its keep-alive timeout) before reading
            # this request: nothing was served, so send it once more on a new connection.
            await self.close()
            status_line = await self._send(head + body)
        assert self._reader is not None
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise LoadError(f"{method} {path}: no HTTP status line ({status_line[:80]!r})")
        length = None
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise LoadError(f"{method} {path}: chunked answers are not supported")
        status = int(parts[1])
        if length is None and (status in (204, 304) or 100 <= status < 200):
            length = 0  # answers that never have a body (RFC 9110 §6.4.1)
        if length is None:
            raise LoadError(f"{method} {path}: answer without Content-Length")
        return status, await self._reader.readexactly(length)

    async def _send(self, data: bytes) -> bytes:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        try:
            self._writer.write(data)
            return await self._reader.readline()
        except ConnectionError:
            return b""

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class Timings:
    """Per-request latencies (seconds) of one timed run and its wall time."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        """Requests, wall time and latency percentiles (ms) of the run."""
        ms = np.array(self.latencies) * 1000
        return {
            "requests": len(ms),
            "wall_s": self.wall_s,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }


async def closed_loop(
    conns: list[Connection],
    request: list[tuple[str, str, bytes, str]],
    requests_per_client: int,
    cap_s: float,
) -> Timings:
    """Every client sends `requests_per_client` requests back to back (client k cycles through `request`
    from position k), until done or `cap_s` has passed; every answer must be 2xx."""
    out = Timings()
    start = time.perf_counter()

    async def client(k: int, conn: Connection) -> None:
        for j in range(requests_per_client):
            method, path, body, ctype = request[(k + j) % len(request)]
            t0 = time.perf_counter()
            status, data = await conn.request(method, path.format(client=k), body, ctype)
            out.latencies.append(time.perf_counter() - t0)
            if not 200 <= status < 300:
                raise LoadError(f"{method} {path} answered {status}: {data[:300]!r}")
            if time.perf_counter() - start > cap_s:
                return

    await asyncio.gather(*(client(k, c) for k, c in enumerate(conns)))
    out.wall_s = time.perf_counter() - start
    return out
