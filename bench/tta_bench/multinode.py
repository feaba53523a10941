"""`tta-bench multinode`: server replicas on a Redis Cluster or Sentinel setup of its own, behind a proxy.

Starts a Redis Cluster (3 primaries + 3 replicas) or a Sentinel setup (a primary, 2 replicas, 3
sentinels) on loopback ports (`--store`), `--replicas` `python -m tta_server` processes on it, and the
proxy of `tta_bench.proxy` in front of them (`--mode hash`: consistent hashing on the stream id;
`round-robin`: no affinity). Drives `--streams` streams (one request loop each) through the proxy for
`--duration` seconds (`--per-stream` request loops per stream, so a stream has concurrent requests);
optionally SIGKILLs a Redis primary (`--kill-primary-at S`) and a server replica
(`--kill-replica-at S`) mid-run. Nothing is restarted.

Checks and figures (the exit status is 1 when a check fails):
  * accounting (`tta_bench.soak.account`): per stream, the `adapted: true` versions are 1..N without a
    gap or duplicate and the stored `steps` is N, up to the steps behind ambiguous 503s. With
    asynchronous replication a primary's death may lose its last acknowledged commits: those streams
    are counted as `lost_acknowledged` (allowed only with `--allow-loss`, the default when
    `--wait-replicas` is 0) and their steps reported;
  * no 5xx and no transport error outside the failover windows (from a kill until `--max-window`
    seconds after it); the measured window is the time from the primary's kill to the end of the last
    request that failed because of it;
  * every stored state decodes and its `steps` equals its version (`soak.check_store_integrity`).
Figures: requests/s, CAS conflicts (answers with `conflict: true`), the replicas' own counters
(`replica_metrics`: commits `tta_state_updates_total`, CAS conflicts `tta_state_conflicts_total`, state
cache hits and misses `tta_state_cache_lookups_total`, scraped from each replica's /metrics before and
after the run and summed), affinity (a request reaching the
replica that served its stream's previous request, whose state cache holds the stream), the proxy's
fallbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tta_bench.proxy import ProxyApp, serve_proxy
from tta_bench.redis_server import PrivateCluster, PrivateSentinel, free_port
from tta_bench.soak import (
    Run,
    account,
    check_store_integrity,
    drive_stream,
    load_images,
    start_replica,
    stop_process,
    wait_ready,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tta-bench multinode", description=__doc__.split("\n")[0])
    p.add_argument("--store", choices=["cluster", "sentinel"], default="cluster")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--per-stream", type=int, default=2, help="concurrent request loops per stream")
    p.add_argument(
        "--commit-latency",
        type=int,
        default=0,
        metavar="N",
        help="instead of the run: time N state commits straight to the store (no server), --wait-replicas applies",
    )
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--mode", choices=["hash", "round-robin"], default="hash")
    p.add_argument("--kill-primary-at", type=float, default=None, metavar="S")
    p.add_argument("--kill-replica-at", type=float, default=None, metavar="S")
    p.add_argument("--wait-replicas", type=int, default=0, help="TTA_REDIS_WAIT_REPLICAS of the replicas")
    p.add_argument("--wait-timeout-ms", type=int, default=100)
    p.add_argument("--allow-loss", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-window", type=float, default=15.0, help="seconds after a kill 5xx are allowed")
    p.add_argument("--strategy", default="tent")
    p.add_argument("--batch-min", type=int, default=4)
    p.add_argument("--batch-max", type=int, default=8)
    p.add_argument("--predict-only-fraction", type=float, default=0.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--log-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.allow_loss is None:
        args.allow_loss = args.wait_replicas == 0
    return args


def affinity(log: dict[str, list[int]]) -> float | None:
    """Share of requests (after each stream's first) that reached the replica of the stream's previous one."""
    same = total = 0
    for seq in log.values():
        for prev, cur in itertools.pairwise(seq):
            total += 1
            same += prev == cur
    return same / total if total else None


def failover_window(run: Run, kill_at: float | None, max_window: float) -> float | None:
    """Seconds from the primary's kill to the end of the last request that failed for want of the store
    (503 `state_store_*`) and overlapped [kill, kill + max_window]."""
    if kill_at is None:
        return None
    bad = [r for r in run.records if (r.error_type or "").startswith("state_store") and r.t_end >= kill_at]
    bad = [r for r in bad if r.t <= kill_at + max_window]
    return max((r.t_end for r in bad), default=kill_at) - kill_at


async def _kill_later(at: float, what: str, kill: Any, run: Run, kills: dict[str, float], log: Any) -> None:
    await asyncio.sleep(max(0.0, at - run.elapsed()))
    kills[what] = run.elapsed()
    detail = await asyncio.to_thread(kill)
    log(f"t={kills[what]:.1f} s: killed {what} {detail}")


async def _run(args: argparse.Namespace, topo: PrivateCluster | PrivateSentinel, log: Any) -> dict[str, Any]:
    url = topo.url
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tta-multinode-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "TTA_REDIS_WAIT_REPLICAS": str(args.wait_replicas),
        "TTA_REDIS_WAIT_TIMEOUT_MS": str(args.wait_timeout_ms),
        "TTA_MAX_PENDING_REQUESTS": str(args.streams * args.per_stream + 8),
        "TTA_MAX_STREAM_QUEUE": str(args.per_stream + 8),
        "TTA_REQUEST_TIMEOUT_SECONDS": str(args.request_timeout),
        "TTA_STORE_GRACE_SECONDS": "30",
    }
    ports = [free_port() for _ in range(args.replicas)]
    procs = [
        start_replica(
            port, url, torch_threads=args.torch_threads, log_file=log_dir / f"replica{i}.log", **env
        )
        for i, port in enumerate(ports)
    ]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    # The proxy waits as long as the clients do: a slower limit would cut requests the replicas still serve.
    proxy = ProxyApp(bases, args.mode, timeout=args.request_timeout)
    server = task = None
    try:
        t0 = time.monotonic()
        for base, proc in zip(bases, procs, strict=True):
            await asyncio.to_thread(wait_ready, base, proc)
        log(f"{args.replicas} replicas up in {time.monotonic() - t0:.1f} s on {topo.url} (logs {log_dir})")
        proxy_port = free_port()
        server, task = await serve_proxy(proxy, proxy_port)
        front = [f"http://127.0.0.1:{proxy_port}"]
        images = load_images("auto", seed=args.seed)
        streams = [f"mn-{i:03d}" for i in range(args.streams)]
        limits = httpx.Limits(max_connections=4 * args.streams * args.per_stream, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
            for s in streams:
                (
                    await client.put(f"{front[0]}/v1/streams/{s}", json={"strategy": args.strategy})
                ).raise_for_status()
            proxy.log.upstream.clear()
            before = await _scrape(client, bases, procs)
            run = Run()
            kills: dict[str, float] = {}
            side = []
            if args.kill_primary_at is not None:
                side.append(
                    _kill_later(args.kill_primary_at, "redis primary", _primary_killer(topo), run, kills, log)
                )
            if args.kill_replica_at is not None:
                # Kill the replica that owns the most streams on the ring: with few streams, a fixed pick
                # may own none, and then nothing shows the proxy falling back.
                owners = [proxy.ring.order(s)[0] for s in streams]
                victim_url = max(bases, key=owners.count)
                victim = procs[bases.index(victim_url)]

                def kill_replica() -> str:
                    victim.kill()
                    return victim_url

                side.append(
                    _kill_later(args.kill_replica_at, "server replica", kill_replica, run, kills, log)
                )
            budget = [10**9]
            loops = [
                drive_stream(client, front, s, images, args, run, budget, args.duration, args.seed * 7919 + k)
                for k, s in enumerate(streams * args.per_stream)
            ]
            await asyncio.gather(*loops, *side)
            elapsed = run.elapsed()
            if args.kill_primary_at is not None:
                await asyncio.to_thread(topo.wait_healthy, 60.0)
            stored: dict[str, tuple[str, int] | None] = {}
            for s in streams:
                resp = await client.get(f"{front[0]}/v1/streams/{s}")
                view = resp.json()
                stored[s] = (view["incarnation"], view["steps"]) if resp.status_code == 200 else None
            after = await _scrape(client, bases, procs)
        integrity = await asyncio.to_thread(check_store_integrity, url)
    finally:
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        for proc in procs:
            stop_process(proc)
    report = _report(args, run, stored, integrity, kills, proxy, elapsed)
    report["replica_metrics"] = _metric_deltas(before, after)
    return report


# The replicas' own counters, summed over replicas: (report key, sample name, label filter).
SCRAPED = (
    ("state_updates", "tta_state_updates_total", ""),
    ("cas_conflicts", "tta_state_conflicts_total", ""),
    ("state_cache_hits", "tta_state_cache_lookups_total", 'result="hit"'),
    ("state_cache_misses", "tta_state_cache_lookups_total", 'result="miss"'),
)


async def _scrape(
    client: httpx.AsyncClient, bases: list[str], procs: list[Any]
) -> dict[int, dict[str, float]]:
    """Per running replica (by index), the SCRAPED counters from its /metrics."""
    out: dict[int, dict[str, float]] = {}
    for i, (base, proc) in enumerate(zip(bases, procs, strict=True)):
        if proc.poll() is not None:
            continue
        with contextlib.suppress(httpx.HTTPError):
            text = (await client.get(f"{base}/metrics")).text
            sums = dict.fromkeys((key for key, _, _ in SCRAPED), 0.0)
            for line in text.splitlines():
                for key, name, label in SCRAPED:
                    if line.startswith((name + "{", name + " ")) and label in line:
                        sums[key] += float(line.rsplit(" ", 1)[1])
            out[i] = sums
    return out


def _metric_deltas(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]) -> dict[str, Any]:
    """after - before, summed over the replicas scraped both times (a killed replica's counts die with it:
    `replicas_counted` says how many were summed) and the cache hit rate hits / (hits + misses)."""
    both = sorted(set(before) & set(after))
    out: dict[str, Any] = {
        key: int(sum(after[i][key] - before[i][key] for i in both)) for key, _, _ in SCRAPED
    }
    looked = out["state_cache_hits"] + out["state_cache_misses"]
    out["state_cache_hit_rate"] = round(out["state_cache_hits"] / looked, 3) if looked else None
    out["replicas_counted"] = len(both)
    return out


def _primary_killer(topo: PrivateCluster | PrivateSentinel) -> Any:
    def kill() -> str:
        if isinstance(topo, PrivateCluster):
            node = topo.primaries()[0]
        else:
            node = topo.current_primary() or topo.primary
        node.kill()
        return f"127.0.0.1:{node.port}"

    return kill


def _report(
    args: argparse.Namespace,
    run: Run,
    stored: dict[str, tuple[str, int] | None],
    integrity: tuple[int, list[str]],
    kills: dict[str, float],
    proxy: ProxyApp,
    elapsed: float,
) -> dict[str, Any]:
    acc = account(run, stored)
    lost = {k: v for k, v in acc["mismatched"].items() if "steps" in v and v["steps"] < v["adapted_versions"]}
    # A version missing from a stream's acknowledged answers is a step committed behind an answer that
    # never said so (a 503 or a lost connection mid-commit): allowed up to that stream's such answers.
    ambiguous: dict[str, int] = {}
    for r in run.records:
        if r.status == 0 or r.status >= 500:
            ambiguous[r.stream] = ambiguous.get(r.stream, 0) + 1
    behind = 0
    for key, v in list(acc["mismatched"].items()):
        versions = v.get("gap_in_versions")
        if versions is None:
            continue
        missing = max(versions) - len(versions)
        if missing <= ambiguous.get(key.split("/")[0], 0):
            behind += missing
            acc["mismatched"].pop(key)
    other = {k: v for k, v in acc["mismatched"].items() if k not in lost}
    windows = [(at, at + args.max_window) for at in kills.values()]
    outside = [
        r
        for r in run.records
        if (r.status == 0 or r.status >= 500) and not any(r.t_end >= a and r.t <= b for a, b in windows)
    ]
    statuses: dict[str, int] = {}
    for r in run.records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    ok = [r for r in run.records if r.status == 200]
    checks = {
        "accounting": not other and not acc["duplicated"],
        "loss_allowed": args.allow_loss or not lost,
        "no_5xx_outside_failover": not outside,
        "integrity": not integrity[1],
        "all_streams_answer": all(v is not None for v in stored.values()),
    }
    return {
        "store": args.store,
        "mode": args.mode,
        "replicas": args.replicas,
        "streams": args.streams,
        "duration_s": round(elapsed, 1),
        "wait_replicas": args.wait_replicas,
        "requests": len(run.records),
        "status_counts": statuses,
        "throughput_rps": round(len(ok) / elapsed, 2) if elapsed else None,
        "cas_conflicts_answered": sum(r.conflict for r in ok),
        "adapted": sum(r.adapted for r in ok),
        "affinity": affinity(proxy.log.upstream),
        "proxy_fallbacks": proxy.log.fallbacks,
        "kills_at_s": kills,
        "primary_failover_window_s": failover_window(run, kills.get("redis primary"), args.max_window),
        "failed_outside_window": len(outside),
        "lost_acknowledged_streams": len(lost),
        "lost_acknowledged_steps": sum(v["adapted_versions"] - v["steps"] for v in lost.values()),
        "steps_committed_behind_a_503": acc["extra_behind_503"] + behind,
        "errors": _error_counts(run),
        "accounting_mismatches": other,
        "duplicated_steps": acc["duplicated"],
        "states_checked": integrity[0],
        "integrity_problems": integrity[1][:20],
        "checks": checks,
        "passed": all(checks.values()),
    }


async def commit_latency(url: str, n: int, wait_replicas: int, wait_timeout_ms: int) -> dict[str, Any]:
    """Time `n` sequential compare-and-set commits of a 64 KiB state (one stream) on the store at `url`."""
    from tta_server.state_store import RedisStateStore

    store = RedisStateStore(url, 600, 2.0, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
    blob = os.urandom(64 * 1024)
    try:
        await store.replace("bench", "lat", "inc", b"{}")
        times = []
        for version in range(n):
            t0 = time.perf_counter()
            assert await store.cas("bench", "lat", "inc", version, blob, b"{}", b"{}", 0.1) == version + 1
            times.append(time.perf_counter() - t0)
        await store.delete("bench", "lat")
    finally:
        await store.close()
    times.sort()
    return {
        "commits": n,
        "wait_replicas": wait_replicas,
        "p50_ms": round(1000 * times[len(times) // 2], 3),
        "p99_ms": round(1000 * times[int(len(times) * 0.99)], 3),
        "mean_ms": round(1000 * sum(times) / len(times), 3),
        "wait_shortfalls": store.wait_shortfalls,
    }


def _error_counts(run: Run) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in run.records:
        if r.status != 200:
            key = f"{r.status} {r.error_type or ''}".strip()
            out[key] = out.get(key, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    os.environ.setdefault("TTA_LOG_LEVEL", "WARNING")
    topo: PrivateCluster | PrivateSentinel = (
        PrivateCluster() if args.store == "cluster" else PrivateSentinel()
    )
    with topo:
        log(f"own {args.store} up: {topo.url}")
        if args.commit_latency:
            report = asyncio.run(
                commit_latency(topo.url, args.commit_latency, args.wait_replicas, args.wait_timeout_ms)
            )
            report["store"] = args.store
            report["passed"] = True
        else:
            report = asyncio.run(_run(args, topo, log))
    if "replica_metrics" in report:
        m = report["replica_metrics"]
        log(
            f"replica metrics ({m['replicas_counted']} replicas): {m['state_updates']} commits, "
            f"{m['cas_conflicts']} CAS conflicts, state cache {m['state_cache_hits']} hits / "
            f"{m['state_cache_misses']} misses (hit rate {m['state_cache_hit_rate']})"
        )
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        args.json.write_text(text)
    log(text)
    return 0 if report["passed"] else 1
