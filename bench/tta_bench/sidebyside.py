"""`tta-bench sidebyside`: the service against a LitServe server of the bare model, same load generator.

Both servers run at once on this machine (the idle one costs nothing: measured below in `idle_cpu_s`),
each on its own port. For every `--clients` count, rounds visit the targets in turn (order reversed
every other round, so load from other processes hits all alike): LitServe serving the bare network
(`tta_bench.litserve_bare`) and the service with each `--strategies` strategy, one stream per client.
In a round each client posts `--requests` batches of `--batch-size` images back to back on its own
keep-alive connection (`tta_bench.loadgen`), after `--warmup-rounds` untimed rounds of every target.
The service gets raw arrays (`application/x-npy`); LitServe, which hands its decoder parsed JSON, the
same array base64-encoded in JSON. Both answer with the top 3 classes and the entropy per image.
`ratio` is the strategy's img/s over LitServe's at the same client count; img/s is images over summed
round wall time.

    tta-bench sidebyside --model wrn --batch-size 64 --clients 4,16 --strategies source,norm \\
        --threads 2 --rounds 3 --json .bench/sidebyside.json

Needs the `litserve` extra (`pip install -e "bench[litserve]"`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tta_bench.loadgen import Connection, LoadError, closed_loop
from tta_bench.paths import MODELS_CONFIG, REPO_ROOT
from tta_bench.redis_server import free_port
from tta_bench.throughput import BenchError, input_images, npy_body, resolve_spec, serve

Post = tuple[str, str, bytes, str]  # method, path (`{client}` filled in), body, content type
Cleanup = Callable[[list[Connection]], Awaitable[None]]
Setup = Callable[[list[Connection]], Awaitable[Cleanup]]  # prepares a target for a round's clients


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tta-bench sidebyside", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn", help="as tta-bench throughput --model")
    p.add_argument("--models-config", type=Path, default=MODELS_CONFIG)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clients", default="4,16", help="comma-separated client counts")
    p.add_argument("--strategies", default="source,norm", help="the service's strategies, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="untimed rounds of every target before each client count's timed ones (first-request costs)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each server")
    p.add_argument("--server-timeout", type=float, default=180.0)
    p.add_argument("--round-seconds", type=float, default=300.0, help="cap on one round's wall time")
    p.add_argument("--litserve-fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.device = "cpu"
    args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    args.strategy_names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not args.client_counts or min(args.client_counts) < 1 or args.requests < 1 or args.rounds < 1:
        p.error("--clients, --requests and --rounds must be positive")
    if args.warmup_rounds < 0:
        p.error("--warmup-rounds must be 0 or more")
    return args


@contextlib.contextmanager
def litserve_server(args: argparse.Namespace) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`python -m tta_bench.litserve_bare` in a subprocess; yields its port and process."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "bench"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    cmd = [sys.executable, "-m", "tta_bench.litserve_bare", "--model", args.model]
    cmd += ["--models-config", str(args.models_config), "--port", str(port), "--threads", str(args.threads)]
    if args.litserve_fast_queue:
        cmd.append("--fast-queue")
    with tempfile.TemporaryDirectory(prefix="tta-bench-ls-") as tmp:
        log_path = Path(tmp) / "litserve.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=log, start_new_session=True)
            try:
                asyncio.run(_wait_ready(port, proc, log_path, args.server_timeout))
                yield port, proc
            finally:
                # LitServe runs its API server and inference worker as child processes: end the group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(timeout=15)


async def _wait_ready(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"LitServe exited with {proc.returncode}:\n{tail}")
        conn = Connection("127.0.0.1", port)
        with contextlib.suppress(OSError, LoadError):
            status, _ = await conn.request("GET", "/health")
            if status == 200:
                await conn.close()
                return
        await conn.close()
        if time.monotonic() > deadline:
            raise BenchError(f"LitServe not ready after {timeout:.0f} s")
        await asyncio.sleep(0.25)


def litserve_body(batch_u8: np.ndarray) -> bytes:
    return json.dumps({"npy": base64.b64encode(npy_body(batch_u8)).decode()}).encode()


async def _round(
    port: int, clients: int, posts: list[Post], requests: int, cap_s: float, setup: Setup
) -> dict[str, Any]:
    """One closed-loop round; `setup(conns)` prepares the target (streams) and returns its cleanup."""
    conns = [Connection("127.0.0.1", port) for _ in range(clients)]
    cleanup = await setup(conns)
    try:
        await closed_loop(conns, posts, 1, cap_s)  # one untimed request per client
        timed = await closed_loop(conns, posts, requests, cap_s)
    finally:
        await cleanup(conns)
        for conn in conns:
            await conn.close()
    return dict(timed.summary())


def _stream_setup(strategy: str) -> tuple[Setup, str]:
    """A Setup that gives each client a stream of its own under `strategy` (deleted after the round),
    and the streams' name prefix."""
    prefix = f"sbs-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    policy = json.dumps({"strategy": strategy}).encode()

    async def setup(conns: list[Connection]) -> Cleanup:
        for k, conn in enumerate(conns):
            status, data = await conn.request("PUT", f"/v1/streams/{prefix}-{k}", policy, "application/json")
            if status != 200:
                raise LoadError(f"PUT stream answered {status}: {data[:300]!r}")

        async def cleanup(conns: list[Connection]) -> None:
            for k, conn in enumerate(conns):
                with contextlib.suppress(OSError, LoadError):
                    await conn.request("DELETE", f"/v1/streams/{prefix}-{k}")

        return cleanup

    return setup, prefix


async def _no_setup(conns: list[Connection]) -> Cleanup:
    async def cleanup(conns: list[Connection]) -> None:
        return None

    return cleanup


async def _same_predictions(ls_port: int, tta_port: int, ls_body: bytes, raw_body: bytes) -> dict[str, Any]:
    """Both servers' answers to one batch (the service with `source`): the same network, the same classes."""
    ls, tta = Connection("127.0.0.1", ls_port), Connection("127.0.0.1", tta_port)
    stream = f"sbs-check-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        status, ls_data = await ls.request("POST", "/predict", ls_body, "application/json")
        if status != 200:
            raise LoadError(f"LitServe answered {status}: {ls_data[:300]!r}")
        policy = json.dumps({"strategy": "source"}).encode()
        await tta.request("PUT", f"/v1/streams/{stream}", policy, "application/json")
        status, tta_data = await tta.request(
            "POST", f"/v1/streams/{stream}/predict", raw_body, "application/x-npy"
        )
        if status != 200:
            raise LoadError(f"the service answered {status}: {tta_data[:300]!r}")
        await tta.request("DELETE", f"/v1/streams/{stream}")
    finally:
        await ls.close()
        await tta.close()
    a = json.loads(ls_data)["predictions"]
    b = json.loads(tta_data)["predictions"]
    top = [[t["index"] for t in p["top_k"]] for p in a] == [[t["index"] for t in p["top_k"]] for p in b]
    diff = max(
        abs(x["probability"] - y["probability"])
        for p, q in zip(a, b, strict=True)
        for x, y in zip(p["top_k"], q["top_k"], strict=True)
    )
    return {"images": len(a), "same_top_k": top, "max_probability_diff": diff}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (psutil)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = resolve_spec(args)
    b = args.batch_size
    images = input_images(spec, max(4 * b, 256))
    batches = [images[i : i + b] for i in range(0, len(images) - b + 1, b)]
    raw = [npy_body(x) for x in batches]
    js = [litserve_body(x) for x in batches]
    report: dict[str, Any] = {
        "model": spec.id,
        "batch": b,
        "threads": args.threads,
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "results": {},
    }
    env = {"TTA_MAX_PENDING_REQUESTS": str(max(64, 4 * max(args.client_counts)))}
    with litserve_server(args) as (ls_port, ls_proc), serve(args, spec, None, env) as base:
        tta_port = int(base.rsplit(":", 1)[1])
        cpu0 = _cpu_seconds(ls_proc.pid)
        time.sleep(5.0)
        report["idle_cpu_s"] = {"litserve_per_5s": _cpu_seconds(ls_proc.pid) - cpu0}
        report["same_predictions"] = asyncio.run(_same_predictions(ls_port, tta_port, js[0], raw[0]))
        targets: dict[str, tuple[int, list[Post], Setup]] = {
            "litserve": (ls_port, [("POST", "/predict", body, "application/json") for body in js], _no_setup)
        }
        for name in args.strategy_names:
            setup, prefix = _stream_setup(name)
            posts = [
                ("POST", f"/v1/streams/{prefix}-{{client}}/predict", r, "application/x-npy") for r in raw
            ]
            targets[name] = (tta_port, posts, setup)
        for clients in args.client_counts:
            rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            # Warm-up rounds first (reported, not counted): a server's first requests at a new load pay
            # one-time costs (allocator growth, oneDNN primitives for new shapes) that are not its speed.
            for r in range(-args.warmup_rounds, args.rounds):
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for t in order:
                    port, posts, setup = targets[t]
                    res = asyncio.run(_round(port, clients, posts, args.requests, args.round_seconds, setup))
                    res["images"] = res["requests"] * b
                    if r < 0:
                        label = f"warm-up {r + args.warmup_rounds + 1}/{args.warmup_rounds}"
                    else:
                        label = f"round {r + 1}/{args.rounds}"
                        rounds[t].append(res)
                    print(
                        f"sidebyside: {clients} clients, {label}, {t}: {res['images'] / res['wall_s']:.1f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
            ips = {t: sum(x["images"] for x in v) / sum(x["wall_s"] for x in v) for t, v in rounds.items()}
            report["results"][str(clients)] = {
                t: {
                    "ips": ips[t],
                    "ratio": ips[t] / ips["litserve"],
                    "p50_ms": float(np.median([x["p50_ms"] for x in rounds[t]])),
                    "p99_ms": float(max(x["p99_ms"] for x in rounds[t])),
                    "rounds": rounds[t],
                }
                for t in targets
            }
    report["loadavg_end"] = list(os.getloadavg())
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"sidebyside: {report['model']} batch {report['batch']}, {report['threads']} torch threads per server, "
        f"{report['rounds']} rounds (after {report.get('warmup_rounds', 0)} warm-up) x "
        f"{report['requests_per_client']} requests per client",
        f"same network: top-3 classes equal {report['same_predictions']['same_top_k']}, "
        f"max probability difference {report['same_predictions']['max_probability_diff']:.1e}",
        f"{'clients':>8}  {'target':<12}{'img/s':>9}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for clients, res in report["results"].items():
        for t, r in res.items():
            lines.append(
                f"{clients:>8}  {t:<12}{r['ips']:>9.1f}{r['ratio']:>8.2f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (BenchError, OSError, LoadError) as exc:
        print(f"sidebyside: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
