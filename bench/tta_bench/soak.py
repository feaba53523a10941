"""`tta-bench soak`: several server replicas on one Redis, many concurrent streams, for a long time.

Starts a redis-server of its own on a free loopback port (or uses `--redis-url`, whose database it
flushes first: pass only a Redis you mean to give it), `--replicas` `python -m tta_server` processes on
free loopback ports, sets a mixed strategy policy on each of `--streams` streams, and drives them with
small raw uint8 batches, each request to a random replica, until `--duration` seconds or
`--max-requests` requests. Optionally kills its Redis mid-run (`--redis-outage SECONDS@AT`: the
server, with an append-only file, is SIGKILLed at AT seconds and restarted SECONDS later).

Checks (the exit status is 1 when one fails):
  * no 5xx and no transport error outside the outage window (a grace period after it included),
    and no unexpected 4xx at all;
  * accounting, per stream incarnation (a PUT, reset or DELETE starts a new one, `--churn-every`):
    the versions of the `adapted: true` answers of one incarnation are exactly 1..N with no gap (no
    committed step went unacknowledged), the answers sharing one version are no more than the merged
    step's `requests` (no step applied twice), and for each stream's final incarnation the stored
    `steps` equals N (nothing acknowledged was lost). A 503 may belong to a write Redis applied just
    before the reply was lost (the store died or timed out mid-CAS): a stream may show up to that many
    extra steps, reported as `steps_committed_behind_a_503`;
  * no stale reads: no answer to a request sent after a churn operation was acknowledged comes from an
    incarnation that operation retired, and no answer reports a version older than one already
    acknowledged for its incarnation before the request was sent;
  * every stored state decodes (safetensors) and its meta `steps` equals its CAS version;
  * replica RSS grows < `--max-rss-growth` between the end of the first minute and the end
    (runs shorter than two minutes report the figure without judging it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from tta_bench.paths import MODELS_CONFIG, REPO_ROOT, cifar10_archive, cifar10_dir
from tta_bench.redis_server import PrivateRedis, free_port, sync_client

DEFAULT_STRATEGIES = ("source", "norm", "alpha_bn", "unmix_tns", "tent", "eta")
OUTAGE_GRACE_S = 5.0
RSS_BASELINE_S = 60.0
CONFIG_KEYS = (
    "streams", "replicas", "duration", "max_requests", "batch_min", "batch_max", "strategies",
    "redis_outage", "torch_threads", "per_stream", "predict_only_fraction", "store_timeout",
    "churn_every", "churn_streams",
)  # fmt: skip


# --------------------------------------------------------------------------- processes
def start_replica(
    port: int, redis_url: str, *, torch_threads: int = 1, log_file: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """`python -m tta_server` on 127.0.0.1:port against redis_url (run from the repo root)."""
    full_env = {
        **os.environ,
        "TTA_REDIS_URL": redis_url,
        "TTA_TORCH_THREADS": str(torch_threads),
        "TTA_MODELS_CONFIG": str(MODELS_CONFIG),
        "TTA_LOG_LEVEL": "WARNING",
        "TTA_DEVICE": "cpu",
        **env,
    }
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    cmd = [sys.executable, "-m", "tta_server", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 180.0) -> None:
    """Poll /healthz until the replica answers (the model loads first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"replica at {base_url} exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"replica at {base_url} not up after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def check_store_integrity(redis_url: str) -> tuple[int, list[str]]:
    """Every stored state decodes and its meta `steps` equals its version. Returns (states, problems).
    Any store URL the service takes (a cluster's keys are scanned on every primary)."""
    from adapters.serialization import CorruptStateError, state_from_bytes

    client = sync_client(redis_url)
    problems: list[str] = []
    count = 0
    try:
        for key in client.scan_iter(match="tta:v2:{*}:state", count=500):
            version, blob, meta = client.hmget(key, ["v", "blob", "meta"])
            name = key.decode()
            count += 1
            if version is None or not isinstance(blob, bytes) or meta is None:
                problems.append(f"{name}: incomplete hash")
                continue
            try:
                state = state_from_bytes(blob)
            except CorruptStateError as exc:
                problems.append(f"{name}: {exc}")
                continue
            steps = int(state.meta.get("steps", -1))
            if steps != int(version) or json.loads(meta).get("steps") != steps:
                problems.append(f"{name}: version {int(version)} but steps {steps}")
    finally:
        client.close()
    return count, problems


# --------------------------------------------------------------------------- load
@dataclass
class Record:
    t: float
    stream: str
    replica: int
    status: int  # 0: transport error
    latency: float
    adapted: bool = False
    conflict: bool = False
    version: int | None = None
    incarnation: str | None = None
    requests: int = 1
    not_adapted: str | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def t_end(self) -> float:
        return self.t + self.latency


@dataclass
class Churn:
    """A PUT (new policy), reset or DELETE of a stream, sent at `t`, acknowledged at `t_end`."""

    t: float
    t_end: float
    stream: str
    op: str
    status: int
    incarnation: str | None = None  # the stream's incarnation after a PUT or reset


@dataclass
class Run:
    started: float = field(default_factory=time.monotonic)
    records: list[Record] = field(default_factory=list)
    churns: list[Churn] = field(default_factory=list)
    outage: tuple[float, float] | None = None  # seconds since start: (down, back up)
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def in_outage(self, rec: Record) -> bool:
        """The request overlapped the outage (or the grace period after it)."""
        if self.outage is None:
            return False
        return rec.t <= self.outage[1] + OUTAGE_GRACE_S and rec.t + rec.latency >= self.outage[0]


def _cifar_test() -> Path:
    return cifar10_dir() / "test_jpeg.npz"


def load_images(source: str, n: int = 512, seed: int = 0) -> np.ndarray:
    """A pool of 32x32 RGB uint8 images: CIFAR-10 test images when available, else random noise."""
    rng = np.random.default_rng(seed)
    if source == "cifar" or (source == "auto" and _cifar_test().is_file()):
        from tta_data import decode_images, load_jpeg_npz

        dataset = load_jpeg_npz(cifar10_archive("test"))
        return decode_images(dataset, rng.permutation(len(dataset))[:n])
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


async def drive_stream(
    client: httpx.AsyncClient,
    bases: list[str],
    stream: str,
    images: np.ndarray,
    args: argparse.Namespace,
    run: Run,
    budget: list[int],
    stop_at: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while run.elapsed() < stop_at and budget[0] > 0:
        budget[0] -= 1
        replica = rng.randrange(len(bases))
        n = rng.randint(args.batch_min, args.batch_max)
        start = rng.randrange(len(images) - n)
        adapt = rng.random() >= args.predict_only_fraction
        t0 = time.monotonic()
        t = run.elapsed()
        try:
            r = await client.post(
                f"{bases[replica]}/v1/streams/{stream}/predict",
                params={"adapt": "true" if adapt else "false"},
                content=npy(images[start : start + n]),
                headers={"content-type": "application/x-npy"},
            )
            rec = Record(t, stream, replica, r.status_code, time.monotonic() - t0)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200:
                rec.adapted, rec.conflict = bool(body["adapted"]), bool(body["conflict"])
                rec.version, rec.incarnation = int(body["version"]), body["incarnation"]
                rec.requests, rec.not_adapted = int(body["stats"]["requests"]), body["not_adapted"]
            else:
                rec.error_type, rec.error = body.get("error_type"), str(body.get("error"))[:300]
        except httpx.HTTPError as exc:
            rec = Record(
                t,
                stream,
                replica,
                0,
                time.monotonic() - t0,
                error_type=type(exc).__name__,
                error=str(exc)[:300],
            )
        run.records.append(rec)
        if rec.status != 200:
            await asyncio.sleep(0.5)  # a polite client backs off on errors


async def churn_task(
    client: httpx.AsyncClient,
    bases: list[str],
    streams: list[str],
    args: argparse.Namespace,
    run: Run,
    stop_at: float,
    log: Any,
) -> None:
    """Every `--churn-every` seconds, PUT another policy on, reset, or DELETE one of `streams`."""
    rng = random.Random(args.seed + 1)
    ops = Counter[str]()
    while run.elapsed() + args.churn_every < stop_at:
        await asyncio.sleep(args.churn_every)
        stream, op = rng.choice(streams), rng.choice(("put", "reset", "delete"))
        base = bases[rng.randrange(len(bases))]
        t = run.elapsed()
        try:
            if op == "put":
                body = {"strategy": rng.choice(args.strategies)}
                r = await client.put(f"{base}/v1/streams/{stream}", json=body)
            elif op == "reset":
                r = await client.post(f"{base}/v1/streams/{stream}/reset")
            else:
                r = await client.delete(f"{base}/v1/streams/{stream}")
            status = r.status_code
            inc = r.json().get("incarnation") if op != "delete" and status == 200 else None
        except httpx.HTTPError:
            status, inc = 0, None
        run.churns.append(Churn(t, run.elapsed(), stream, op, status, inc))
        ops[op] += 1
    log(f"churn: {dict(ops)} on {len(streams)} streams")


async def outage_task(redis_srv: PrivateRedis, at: float, seconds: float, run: Run, log: Any) -> None:
    await asyncio.sleep(max(0.0, at - run.elapsed()))
    down = run.elapsed()
    redis_srv.kill()
    run.outage = (down, float("inf"))
    log(f"[{down:7.1f}s] redis-server SIGKILLed for {seconds:.0f} s")
    await asyncio.sleep(seconds)
    await asyncio.to_thread(redis_srv.start)
    up = run.elapsed()
    run.outage = (down, up)
    log(f"[{up:7.1f}s] redis-server restarted (append-only file replayed)")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def progress_task(
    run: Run, procs: list[psutil.Process], every: float, stop_at: float, log: Any
) -> None:
    last_n = 0
    last_t = run.elapsed()
    while True:
        await asyncio.sleep(min(every, 1.0) if run.elapsed() < 5 else every)
        t = run.elapsed()
        for i, p in enumerate(procs):
            with contextlib.suppress(psutil.Error):
                run.rss[i].append((t, p.memory_info().rss))
        recs = run.records
        window = recs[last_n:]
        ok = [r.latency for r in window if r.status == 200]
        statuses = Counter(r.status for r in recs)
        rss = " ".join(f"{run.rss[i][-1][1] / 2**20:.0f}MiB" for i in range(len(procs)) if run.rss[i])
        p50, p99 = percentile(ok, 50), percentile(ok, 99)
        log(
            f"[{t:7.1f}s] requests {len(recs)} ({len(window) / max(t - last_t, 1e-9):.1f}/s)  "
            f"statuses {dict(sorted(statuses.items()))}  p50 {p50 or 0:.2f}s p99 {p99 or 0:.2f}s  rss {rss}"
        )
        last_n, last_t = len(recs), t
        if t >= stop_at + 1:
            return


# --------------------------------------------------------------------------- report
def account(run: Run, stored: dict[str, tuple[str, int] | None]) -> dict[str, Any]:
    """Lost, duplicated and stale updates, per stream incarnation (see the module docstring).

    `stored`: each stream's final (incarnation, steps) as GET reports it (None: the stream is gone).
    """
    ok = [r for r in run.records if r.status == 200 and r.incarnation is not None]
    acked: dict[tuple[str, str], dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if r.adapted and r.version is not None:
            acked[(r.stream, r.incarnation or "")][r.version].append(r)
    mismatched: dict[str, dict[str, Any]] = {}
    duplicated: list[dict[str, Any]] = []
    for (stream, inc), versions in acked.items():
        if sorted(versions) != list(range(1, len(versions) + 1)):
            mismatched[f"{stream}/{inc[:8]}"] = {"gap_in_versions": sorted(versions)[:20]}
        for version, answers in versions.items():
            if len(answers) > min(a.requests for a in answers) or len({a.requests for a in answers}) > 1:
                duplicated.append({"stream": stream, "version": version, "answers": len(answers)})
    ambiguous_503: Counter[str] = Counter(r.stream for r in run.records if r.status in (0, 503))
    extra_behind_503 = 0
    for stream, final in stored.items():
        if final is None:
            continue
        inc, steps = final
        want = len(acked.get((stream, inc), {}))
        if want <= steps <= want + ambiguous_503[stream]:
            extra_behind_503 += steps - want
        else:
            mismatched[stream] = {"steps": steps, "adapted_versions": want}
    return {
        "mismatched": mismatched,
        "duplicated": duplicated,
        "extra_behind_503": extra_behind_503,
        "stale": stale_reads(run, ok),
        "steps_acked": {(s, i, v) for (s, i), vs in acked.items() for v in vs},
    }


def stale_reads(run: Run, ok: list[Record]) -> list[dict[str, Any]]:
    """Answers from a retired incarnation, or older than an acknowledged version of their incarnation."""
    stale: list[dict[str, Any]] = []
    by_stream: dict[str, list[Record]] = defaultdict(list)
    for r in ok:
        by_stream[r.stream].append(r)
    churns: dict[str, list[Churn]] = defaultdict(list)
    for c in run.churns:
        if c.status in (200, 204):
            churns[c.stream].append(c)
    for stream, recs in by_stream.items():
        # A churn retires every incarnation answered before it was sent, except the one it leaves (a PUT
        # of the same settings keeps the incarnation); requests sent after its acknowledgement must not
        # be answered from a retired one.
        retired_at: dict[str, float] = {}
        for c in churns[stream]:
            for r in recs:
                inc = r.incarnation or ""
                if r.t_end < c.t and inc != c.incarnation and inc not in retired_at:
                    retired_at[inc] = c.t_end
        # Sweep in time: the newest version acknowledged (answer received) per incarnation so far.
        events = sorted(
            [(r.t_end, 1, r) for r in recs] + [(r.t, 0, r) for r in recs], key=lambda e: (e[0], e[1])
        )
        newest: dict[str, int] = {}
        for _t, kind, r in events:
            inc = r.incarnation or ""
            if kind == 1:
                newest[inc] = max(newest.get(inc, 0), r.version or 0)
                continue
            if inc in retired_at and r.t > retired_at[inc]:
                stale.append({"stream": stream, "t": round(r.t, 2), "why": "retired incarnation"})
            elif (r.version or 0) < newest.get(inc, 0):
                stale.append(
                    {"stream": stream, "t": round(r.t, 2), "why": f"version {r.version} < {newest[inc]}"}
                )
    return stale


def summarise(
    run: Run,
    stored_steps: dict[str, tuple[str, int] | None],
    integrity: tuple[int, list[str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    recs = run.records
    duration = max((r.t + r.latency for r in recs), default=0.0)
    by_status = Counter(str(r.status) for r in recs)
    by_error = Counter(r.error_type for r in recs if r.error_type)
    bad_outside = [r for r in recs if (r.status >= 500 or r.status == 0) and not run.in_outage(r)]
    unexpected_4xx = [r for r in recs if 400 <= r.status < 500]
    ok = [r.latency for r in recs if r.status == 200]

    acc = account(run, stored_steps)
    mismatched, extra_behind_503 = acc["mismatched"], acc["extra_behind_503"]
    adapted: Counter[str] = Counter(stream for stream, _inc, _v in acc["steps_acked"])
    bad_churn = [c for c in run.churns if c.status not in (200, 204, 404)]

    rss_growth: dict[str, float | None] = {}
    rss_ok = True
    judged = args.duration >= 2 * RSS_BASELINE_S and duration >= 2 * RSS_BASELINE_S
    for i, samples in run.rss.items():
        base = next((v for t, v in samples if t >= RSS_BASELINE_S), None) if judged else None
        base = base or (samples[0][1] if samples else None)
        growth = (samples[-1][1] - base) / base if samples and base else None
        rss_growth[f"replica{i}"] = growth
        if judged and growth is not None and growth >= args.max_rss_growth:
            rss_ok = False

    checks = {
        "no_5xx_outside_outage": not bad_outside,
        "no_unexpected_4xx": not unexpected_4xx,
        "accounting": not mismatched and len(stored_steps) == args.streams,
        "no_duplicated_steps": not acc["duplicated"],
        "no_stale_reads": not acc["stale"],
        "churn_acknowledged": not bad_churn,
        "store_integrity": not integrity[1],
        "rss_growth": rss_ok,
    }
    return {
        "config": {k: getattr(args, k) for k in CONFIG_KEYS},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "duration_s": round(duration, 1),
        "requests": len(recs),
        "throughput_rps": round(len(recs) / duration, 2) if duration else None,
        "ok_throughput_rps": round(len(ok) / duration, 2) if duration else None,
        "images": None,
        "status_counts": dict(sorted(by_status.items())),
        "error_types": dict(by_error),
        "adapted_responses": sum(adapted.values()),
        "conflict_responses": sum(1 for r in recs if r.conflict),
        "not_adapted": dict(Counter(r.not_adapted for r in recs if r.not_adapted)),
        "incarnations_seen": len({(r.stream, r.incarnation) for r in recs if r.incarnation}),
        "churn_ops": dict(Counter(c.op for c in run.churns)),
        "churn_failures": [vars(c) for c in bad_churn[:5]],
        "duplicated_steps": acc["duplicated"][:10],
        "stale_reads": len(acc["stale"]),
        "first_stale_reads": acc["stale"][:5],
        "latency_s": {
            "p50": percentile(ok, 50),
            "p90": percentile(ok, 90),
            "p99": percentile(ok, 99),
            "max": max(ok) if ok else None,
        },
        "outage_window_s": run.outage,
        "errors_outside_outage": len(bad_outside),
        "first_errors_outside_outage": [
            {"t": round(r.t, 2), "status": r.status, "error_type": r.error_type, "error": r.error}
            for r in bad_outside[:5]
        ],
        "unexpected_4xx": len(unexpected_4xx),
        "steps_committed_behind_a_503": extra_behind_503,
        "accounting_mismatches": mismatched,
        "stored_states": integrity[0],
        "integrity_problems": integrity[1][:20],
        "rss_mib_first_last": {
            f"replica{i}": [round(s[0][1] / 2**20, 1), round(s[-1][1] / 2**20, 1)]
            for i, s in run.rss.items()
            if s
        },
        "rss_growth": rss_growth,
        "rss_judged": judged,
        "checks": checks,
        "passed": all(checks.values()),
    }


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tta-bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--batch-min", type=int, default=8)
    p.add_argument("--batch-max", type=int, default=16)
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    p.add_argument(
        "--per-stream",
        type=int,
        default=1,
        help="concurrent request loops per stream (2+ makes replicas race on one stream's CAS)",
    )
    p.add_argument(
        "--churn-every",
        type=float,
        default=0.0,
        help="seconds between PUT/reset/DELETE operations on the churn streams (0: no churn)",
    )
    p.add_argument("--churn-streams", type=int, default=5, help="how many streams see churn")
    p.add_argument("--predict-only-fraction", type=float, default=0.1, help="share of adapt=false requests")
    p.add_argument(
        "--redis-url",
        help="use this Redis database instead of a redis-server of the bench's own (FLUSHED first)",
    )
    p.add_argument(
        "--redis-outage",
        metavar="SECONDS@AT",
        help="SIGKILL the bench's own redis-server at AT s for SECONDS s (e.g. 20@120)",
    )
    p.add_argument("--images", choices=("auto", "cifar", "random"), default="auto")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--store-timeout", type=float, help="TTA_STORE_TIMEOUT_SECONDS of the replicas")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--log-dir", type=Path, help="replica logs (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.redis_outage and args.redis_url:
        p.error("--redis-outage kills the bench's own redis-server; it cannot be combined with --redis-url")
    if args.redis_outage:
        seconds, _, at = args.redis_outage.partition("@")
        args.outage = (float(seconds), float(at or 0))
    else:
        args.outage = None
    return args


async def _soak(args: argparse.Namespace, redis_url: str, redis_srv: PrivateRedis | None, log: Any) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.close()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tta-soak-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(args.replicas)]
    timeout_env = {"TTA_STORE_TIMEOUT_SECONDS": str(args.store_timeout)} if args.store_timeout else {}
    # The soak measures integrity under sustained load, not admission: every request loop may land on one
    # replica, and none should be refused for queueing (the admission tests cover refusals).
    loops = args.streams * args.per_stream
    timeout_env |= {
        "TTA_MAX_PENDING_REQUESTS": str(loops + 8),
        "TTA_MAX_STREAM_QUEUE": str(args.per_stream + 8),
        "TTA_REQUEST_TIMEOUT_SECONDS": str(args.request_timeout),
        "TTA_MAX_REPLICA_PIXELS": str(max(4 * 4096 * 4096, loops * args.batch_max * 32 * 32)),
    }
    procs = [
        start_replica(
            port,
            redis_url,
            torch_threads=args.torch_threads,
            log_file=log_dir / f"replica{i}.log",
            **timeout_env,
        )
        for i, port in enumerate(ports)
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        t0 = time.monotonic()
        for base, proc in zip(bases, procs, strict=True):
            await asyncio.to_thread(wait_ready, base, proc)
        log(
            f"{args.replicas} replicas up in {time.monotonic() - t0:.1f} s: {', '.join(bases)} (logs {log_dir})"
        )
        images = load_images(args.images, seed=args.seed)
        streams = [f"soak-{i:03d}" for i in range(args.streams)]
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them under a request.
        limits = httpx.Limits(max_connections=4 * args.streams * args.per_stream, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
            for i, s in enumerate(streams):
                strategy = args.strategies[i % len(args.strategies)]
                resp = await client.put(
                    f"{bases[i % len(bases)]}/v1/streams/{s}", json={"strategy": strategy}
                )
                resp.raise_for_status()
            run = Run()
            budget = [args.max_requests]
            ps = [psutil.Process(p.pid) for p in procs]
            tasks = [
                asyncio.create_task(
                    drive_stream(
                        client, bases, s, images, args, run, budget, args.duration, args.seed * 7919 + k
                    )
                )
                for k, s in enumerate(streams * args.per_stream)
            ]
            side = [asyncio.create_task(progress_task(run, ps, args.progress, args.duration, log))]
            if args.churn_every > 0:
                churned = streams[: max(1, min(args.churn_streams, len(streams)))]
                side.append(
                    asyncio.create_task(churn_task(client, bases, churned, args, run, args.duration, log))
                )
            if args.outage and redis_srv is not None:
                side.append(
                    asyncio.create_task(outage_task(redis_srv, args.outage[1], args.outage[0], run, log))
                )
            await asyncio.gather(*tasks)
            await asyncio.gather(*side[1:])  # churn and outage are over before the final accounting
            side[0].cancel()
            for i, p in enumerate(ps):
                with contextlib.suppress(psutil.Error):
                    run.rss[i].append((run.elapsed(), p.memory_info().rss))
            stored: dict[str, tuple[str, int] | None] = {}
            for s in streams:
                resp = await client.get(f"{bases[0]}/v1/streams/{s}")
                view = resp.json()
                stored[s] = (view["incarnation"], view["steps"]) if resp.status_code == 200 else None
        integrity = await asyncio.to_thread(check_store_integrity, redis_url)
        report = summarise(run, stored, integrity, args)
        report["images"] = (
            args.images if args.images != "auto" else ("cifar" if _cifar_test().is_file() else "random")
        )
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                report["checks"][f"replica{i}_alive"] = False
                report["passed"] = False
    finally:
        for proc in procs:
            stop_process(proc)
    _log_report(report, args, log)
    return 0 if report["passed"] else 1


def _log_report(report: dict[str, Any], args: argparse.Namespace, log: Any) -> None:
    lat = report["latency_s"]
    log(
        f"done: {report['requests']} requests in {report['duration_s']} s "
        f"({report['throughput_rps']}/s), statuses {report['status_counts']}, "
        f"p50 {lat['p50'] or 0:.2f}s p99 {lat['p99'] or 0:.2f}s, adapted {report['adapted_responses']}, "
        f"conflicts {report['conflict_responses']}, states {report['stored_states']}, "
        f"rss growth {report['rss_growth']}"
    )
    log("checks: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in report["checks"].items()))
    if report["accounting_mismatches"]:
        log(f"accounting mismatches: {report['accounting_mismatches']}")
    if report["integrity_problems"]:
        log(f"integrity problems: {report['integrity_problems']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    redis_srv: PrivateRedis | None = None
    if args.redis_url:
        redis_url = args.redis_url
        log(f"Redis {redis_url} (given with --redis-url; flushed first)")
    else:
        redis_srv = PrivateRedis(appendonly=True)
        try:
            redis_srv.start()
        except (FileNotFoundError, RuntimeError) as exc:
            redis_srv.close()
            print(f"tta-bench soak: error: {exc} (or pass --redis-url)", file=sys.stderr)
            return 2
        redis_url = redis_srv.url
        log(f"own redis-server on 127.0.0.1:{redis_srv.port} (append-only file)")
    try:
        return asyncio.run(_soak(args, redis_url, redis_srv, log))
    finally:
        if redis_srv is not None:
            redis_srv.close()


if __name__ == "__main__":
    sys.exit(main())
