#!/usr/bin/env python3
"""Attacks on the HTTP edge of one `python -m tta_server` replica, with the server's peak RSS under each.

    .venv/bin/python scripts/edge_attacks.py [--only png,uploads,stalled,slow,overload] [--json out.json]

Starts a replica on a free loopback port (CPU, one torch thread, in-process store, API keys on) and runs:
  png       2 concurrent requests of 16 PNGs of 4096x4096 (49 kB each on the wire), while another tenant
            sends 8-image predicts: statuses, time, the other tenant's latency, RSS growth;
  uploads   20 unauthenticated chunked uploads of 30 MiB each that then stall: what they were answered,
            RSS growth, whether the server closed them;
  uploads_authed  the same with a valid key (admitted up to the queue bound, cut at the body timeout);
  stalled   340 connections that send half a request line and stall: how many are still open after
            the header timeout (+2 s) and after 60 s;
  slow      one authenticated upload that stalls mid-body: answer and when the connection closed;
  overload  48 concurrent 64-image predicts with a 2 s X-Request-Timeout against a small queue bound:
            statuses, Retry-After, and whether the stream's version moved for refused requests.
Prints one JSON document (and writes it to --json). Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tta_bench.redis_server import free_port  # noqa: E402
from tta_bench.soak import start_replica, stop_process, wait_ready  # noqa: E402

KEY = "attacker-is-not-this-0123456789"
VICTIM = "victim-key-0123456789abcdef"
HOST = "127.0.0.1"


class RssPeak:
    """Samples a process's RSS every 20 ms in a thread; `window()` gives the peak since it was opened."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.current = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.current = self.proc.memory_info().rss
                self.peak = max(self.peak, self.current)

    @contextlib.contextmanager
    def window(self, out: dict[str, Any]) -> Any:
        base = self.proc.memory_info().rss
        self.peak = base
        yield
        out["rss_before_mib"] = round(base / 2**20, 1)
        out["rss_peak_mib"] = round(self.peak / 2**20, 1)
        out["rss_growth_mib"] = round((self.peak - base) / 2**20, 1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def png_4096() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


def npy(n: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error_type(r: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return r.json()["error_type"]
    return None


# ------------------------------------------------------------------------------------------ attacks
async def attack_png(base: str, rss: RssPeak) -> dict[str, Any]:
    out: dict[str, Any] = {}
    img = png_4096()
    files = [("files", (f"{i}.png", img, "image/png")) for i in range(16)]
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        # The other tenant's latency when the server is idle.
        t0 = time.perf_counter()
        r = await c.post("/v1/streams/v/predict", content=npy(8), headers={**auth(VICTIM), **NPY})
        out["victim_idle_s"] = round(time.perf_counter() - t0, 3)
        out["victim_idle_status"] = r.status_code

        async def attack() -> tuple[int, str | None, float]:
            t = time.perf_counter()
            resp = await c.post("/v1/streams/a/predict", files=files, headers=auth(KEY))
            return resp.status_code, _error_type(resp), round(time.perf_counter() - t, 2)

        async def victim() -> tuple[int, float]:
            await asyncio.sleep(0.2)  # the attacks are in flight
            t = time.perf_counter()
            resp = await c.post("/v1/streams/v/predict", content=npy(8, 1), headers={**auth(VICTIM), **NPY})
            return resp.status_code, round(time.perf_counter() - t, 3)

        with rss.window(out):
            t0 = time.perf_counter()
            a1, a2, v = await asyncio.gather(attack(), attack(), victim())
            out["wall_s"] = round(time.perf_counter() - t0, 2)
        out["request_bytes"] = 16 * len(img)
        out["attack_answers"] = [a1, a2]
        out["victim_under_attack"] = v
    return out


async def attack_uploads(
    base: str, rss: RssPeak, n: int = 20, mib: int = 30, key: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    port = int(base.rsplit(":", 1)[1])
    chunk = b"x" * 65536
    answers: list[str] = []
    sent_mib: list[float] = []
    closed = 0

    async def one() -> None:
        nonlocal closed
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(
            b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            + (f"Authorization: Bearer {key}\r\n".encode() if key else b"")
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        answer = asyncio.ensure_future(reader.read(200))  # read while sending: the server may answer early
        try:
            while sent < mib * 2**20 and not answer.done():
                writer.write(b"10000\r\n" + chunk + b"\r\n")
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        except (ConnectionError, TimeoutError):
            pass  # the server stopped reading, or closed the connection
        # Stall: never send the last chunk. Whatever the server answers within 10 s.
        head = b""
        try:
            head = await asyncio.wait_for(answer, 45 if key else 10)
            await asyncio.wait_for(reader.read(), 5)  # b"" once the server closes
            closed += 1
        except ConnectionResetError:  # closed with our unread upload in its buffer: the kernel resets
            closed += 1
        except (TimeoutError, ConnectionError) as exc:
            head = head or f"no answer ({type(exc).__name__})".encode()
        try:
            answers.append(head.split(b"\r\n", 1)[0].decode(errors="replace") or "reset by server")
        finally:
            sent_mib.append(round(sent / 2**20, 1))
            writer.close()

    with rss.window(out):
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["uploads"] = n
    out["answers"] = dict(_count(answers))
    out["closed_by_server"] = closed
    out["max_mib_sent_before_the_answer"] = max(sent_mib)
    return out


async def attack_stalled(base: str, rss: RssPeak, n: int = 340, first_check: float = 12.0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    port = int(base.rsplit(":", 1)[1])
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    with rss.window(out):
        for _ in range(n):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nX-Pad")
            conns.append((reader, writer))
        t0 = time.monotonic()

        async def still_open() -> int:
            alive = 0
            for reader, _ in conns:
                if reader.at_eof():
                    continue
                try:
                    data = await asyncio.wait_for(reader.read(1), 0.01)
                    if data:  # an answer (400/408/503) arrived: the server dealt with it
                        continue
                except TimeoutError:
                    alive += 1
            return alive

        await asyncio.sleep(first_check)
        out[f"open_after_{first_check:.0f}s"] = await still_open()
        # A legitimate request meanwhile.
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            r = await c.get("/healthz")
            out["healthz_during"] = r.status_code
        await asyncio.sleep(max(0.0, 60 - (time.monotonic() - t0)))
        out["open_after_60s"] = await still_open()
    for _, writer in conns:
        writer.close()
    out["connections"] = n
    return out


async def attack_slow(base: str, rss: RssPeak) -> dict[str, Any]:
    out: dict[str, Any] = {}
    port = int(base.rsplit(":", 1)[1])
    body = npy(8)
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        f"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/x-npy\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    t0 = time.monotonic()
    try:
        head = await asyncio.wait_for(reader.read(200), 90)
        out["answer"] = head.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without answer"
        out["answer_after_s"] = round(time.monotonic() - t0, 1)
        await asyncio.wait_for(reader.read(), 10)
        out["closed_after_s"] = round(time.monotonic() - t0, 1)
    except TimeoutError:
        out["answer"] = "none within 90 s"
    writer.close()
    return out


async def attack_overload(base: str, rss: RssPeak, n: int = 48) -> dict[str, Any]:
    out: dict[str, Any] = {}
    body = npy(64, 3)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        hdr = {**auth(KEY), **NPY}
        await c.put("/v1/streams/o", json={"strategy": "tent"}, headers=auth(KEY))
        before = (await c.get("/v1/streams/o", headers=auth(KEY))).json()["version"]

        async def one(i: int) -> tuple[int, str | None, str | None]:
            r = await c.post("/v1/streams/o/predict", content=body, headers={**hdr, "X-Request-Timeout": "2"})
            return r.status_code, _error_type(r), r.headers.get("retry-after")

        with rss.window(out):
            t0 = time.perf_counter()
            answers = await asyncio.gather(*(one(i) for i in range(n)))
            out["wall_s"] = round(time.perf_counter() - t0, 2)
        after = (await c.get("/v1/streams/o", headers=auth(KEY))).json()["version"]
    ok = sum(1 for s, _, _ in answers if s == 200)
    out["answers"] = dict(_count(f"{s} {e or ''}".strip() for s, e, _ in answers))
    out["retry_after"] = sorted({ra for _, _, ra in answers if ra})
    out["version_moved_by"] = after - before
    out["answered_200"] = ok
    return out


NPY = {"Content-Type": "application/x-npy"}


async def attack_uploads_authed(base: str, rss: RssPeak) -> dict[str, Any]:
    return await attack_uploads(base, rss, key=KEY)


ATTACKS = {
    "png": attack_png,
    "uploads": attack_uploads,
    "uploads_authed": attack_uploads_authed,
    "stalled": attack_stalled,
    "slow": attack_slow,
    "overload": attack_overload,
}


def _count(items: Any) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item)] = counts.get(str(item), 0) + 1
    return sorted(counts.items())


async def run(base: str, pid: int, only: list[str]) -> dict[str, Any]:
    rss = RssPeak(pid)
    report: dict[str, Any] = {"rss_start_mib": round(rss.proc.memory_info().rss / 2**20, 1)}
    try:
        for name in only:
            t0 = time.perf_counter()
            try:
                report[name] = await ATTACKS[name](base, rss)
            except Exception as exc:  # report it and go on with the next attack
                report[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            report[name]["took_s"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(report[name]), file=sys.stderr, flush=True)
            await asyncio.sleep(1)
        report["rss_end_mib"] = round(rss.proc.memory_info().rss / 2**20, 1)
        report["rss_max_mib"] = round(max(rss.peak, rss.current) / 2**20, 1)
    finally:
        rss.close()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(ATTACKS), help="comma-separated attacks to run")
    parser.add_argument("--header-timeout", default="10", help="TTA_HEADER_TIMEOUT_SECONDS of the server")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--log", type=Path, help="the server's log file")
    args = parser.parse_args()
    only = [a for a in args.only.split(",") if a]
    port = free_port()
    env = {
        "TTA_API_KEYS": f"attacker:{KEY},victim:{VICTIM}",
        # Small enough for the overload attack to reach it on two cores; the rest are the defaults.
        "TTA_MAX_PENDING_REQUESTS": os.environ.get("TTA_MAX_PENDING_REQUESTS", "8"),
        "TTA_LOG_LEVEL": "INFO",
        "TTA_HEADER_TIMEOUT_SECONDS": args.header_timeout,
    }
    proc = start_replica(port, "", log_file=args.log, **env)
    base = f"http://{HOST}:{port}"
    try:
        wait_ready(base, proc)
        report = asyncio.run(run(base, proc.pid, only))
    finally:
        stop_process(proc)
    report["server_env"] = {k: v for k, v in env.items() if k != "TTA_API_KEYS"}
    report["machine"] = f"{os.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30, 1)} GiB RAM"
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    raise SystemExit(main())
