#!/usr/bin/env python
"""Drift demo: the "Drift" row of the Grafana dashboard, fed by a live server and a live Prometheus.

What it does, bounded in time (about 4 minutes with the defaults), cleaning up after itself:

1. starts ``python -m tta_server`` on a free loopback port, with its state in Redis: a redis-server of
   its own on a free loopback port, or ``--redis-url`` (where it writes, and deletes, its four streams);
2. starts ``prometheus`` with a temporary config that scrapes that server every ``--scrape-interval``
   seconds and evaluates ``deploy/prometheus/rules/tta.rules.yml``, and a temporary storage folder;
3. replays CIFAR-10 test images at four streams with different strategies (``tta_client.replay``),
   in three phases of ``--phase-seconds`` each: clean images, gaussian noise (severity 5), then
   ``POST /v1/streams/{id}/reset`` on every stream and clean images again;
4. queries Prometheus' ``/api/v1/query_range`` for every query of the dashboard's "Drift" panels (read
   from ``deploy/grafana/dashboards/tta-drift.json``, template variables substituted) and draws them
   with matplotlib, laid out as in the dashboard, phases shaded, into ``--out``;
5. prints the per-phase means of BN distance, entropy and confidence per strategy, taken from the
   server's ``/metrics`` at the phase boundaries (``delta(_sum) / delta(_count)``), with each stream's
   drift figures from ``GET /v1/streams/{id}``.

Grafana itself is not needed: the panels are the dashboard's own PromQL over a real Prometheus.

    .venv/bin/python scripts/drift_demo.py                      # writes docs/img/drift-dashboard.png
    .venv/bin/python scripts/drift_demo.py --phase-seconds 30 --out /tmp/drift.png --json /tmp/drift.json

Needs: the ``redis-server`` binary (Debian package ``redis-server``) or ``--redis-url``, the
``prometheus`` binary (Debian package ``prometheus``), matplotlib, and the shared CIFAR-10 model and data
(as for ``scripts/serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tta_bench.paths import MODELS_CONFIG as MODELS
from tta_bench.paths import REPO_ROOT as REPO
from tta_bench.redis_server import PrivateRedis, redis_server_binary

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tta-drift.json"
RULES = REPO / "deploy" / "prometheus" / "rules" / "tta.rules.yml"

PREFIX = "drift-demo"
STRATEGIES = ("source", "norm", "tent", "unmix_tns")  # stream drift-demo-{i} uses STRATEGIES[i]
COLORS = {"source": "#d62728", "norm": "#1f77b4", "tent": "#2ca02c", "unmix_tns": "#9467bd"}
LINESTYLES = {"A": "-", "B": "--", "C": ":", "D": "-."}
HISTOGRAMS = {
    "bn_distance": "tta_bn_distance",
    "entropy": "tta_prediction_entropy_nats",
    "confidence": "tta_prediction_confidence_ratio",
}


@dataclass(frozen=True)
class Phase:
    name: str
    corruption: str
    seed: int  # stream i replays with seed + i; the last phase uses other clean images than the first
    reset_first: bool


PHASES = (
    Phase("clean", "none", 0, False),
    Phase("gaussian_noise", "gaussian_noise", 0, False),
    Phase("reset + clean", "none", 100, True),
)
PHASE_COLORS = ("#2ca02c", "#d62728", "#1f77b4")


@dataclass
class PhaseRun:
    name: str
    corruption: str
    start: float  # unix seconds
    end: float
    requests: int = 0
    errors: int = 0
    stopped_by: str | None = None
    means: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy -> figures
    stream_drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # strategy -> GET drift


def say(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Subprocesses.


class Child:
    """A subprocess with its output in a log file; stopped (TERM, then KILL) by ``stop``."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


def wait_until(child: Child, url: str, timeout: float, ok: Any = None) -> Any:
    """Poll ``url`` until it answers 200 (and ``ok(json)`` is truthy when given); fail if ``child`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                if ok is None:
                    return response
                result = ok(response.json())
                if result:
                    return result
        time.sleep(0.5)
    raise TimeoutError(f"{child.name}: {url} not ready after {timeout:.0f}s:\n{child.tail()}")


def start_server(port: int, redis_url: str, workdir: Path, timeout: float) -> Child:
    # No TTA_* setting of the caller leaks in (an API key would lock the demo client out).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env |= {"TTA_REDIS_URL": redis_url, "TTA_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tta_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--config", str(MODELS)]
    child = Child("tta_server", cmd, workdir / "server.log", env)
    wait_until(child, f"http://127.0.0.1:{port}/readyz", timeout)
    return child


def start_prometheus(
    binary: str, server_port: int, port: int, scrape_interval: int, workdir: Path, timeout: float
) -> Child:
    config = {
        "global": {
            "scrape_interval": f"{scrape_interval}s",
            "scrape_timeout": f"{scrape_interval}s",
            "evaluation_interval": f"{scrape_interval}s",
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "tta-server", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]}
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    child = Child("prometheus", cmd, workdir / "prometheus.log")
    base = f"http://127.0.0.1:{port}"
    wait_until(child, f"{base}/-/ready", timeout)

    def target_up(body: dict[str, Any]) -> bool:
        targets = body["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    wait_until(child, f"{base}/api/v1/targets", timeout, target_up)
    return child


# Live metrics of the server.

Scrape = dict[tuple[str, str], float]  # (sample name, strategy) -> value, summed over models


async def scrape(http: httpx.AsyncClient) -> Scrape:
    response = await http.get("/metrics")
    response.raise_for_status()
    wanted = {f"{h}_{s}" for h in HISTOGRAMS.values() for s in ("sum", "count")} | {"tta_samples_total"}
    out: Scrape = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            strategy = sample.labels.get("strategy")
            if sample.name in wanted and strategy in STRATEGIES:
                out[(sample.name, strategy)] = out.get((sample.name, strategy), 0.0) + sample.value
    return out


def phase_means(before: Scrape, after: Scrape) -> dict[str, dict[str, float]]:
    def delta(name: str, strategy: str) -> float:
        return after.get((name, strategy), 0.0) - before.get((name, strategy), 0.0)

    out: dict[str, dict[str, float]] = {}
    for strategy in STRATEGIES:
        batches = delta("tta_bn_distance_count", strategy)
        row = {"batches": batches, "images": delta("tta_samples_total", strategy)}
        for key, metric in HISTOGRAMS.items():
            count = delta(f"{metric}_count", strategy)
            row[key] = delta(f"{metric}_sum", strategy) / count if count else math.nan
        out[strategy] = row
    return out


async def ticker(http: httpx.AsyncClient, phase: str, start: Scrape, every: float) -> None:
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(every)
        now = await scrape(http)
        done = {
            s: int(now.get(("tta_samples_total", s), 0) - start.get(("tta_samples_total", s), 0))
            for s in STRATEGIES
        }
        parts = ", ".join(f"{s} {n}" for s, n in done.items())
        say(f"  {phase}: {time.monotonic() - t0:4.0f}s, images {sum(done.values())} ({parts})")


async def run_scenario(url: str, args: argparse.Namespace) -> list[PhaseRun]:
    from tta_bench.paths import cifar10_archive
    from tta_bench.replay_data import cifar_streams
    from tta_client import AsyncClient, StreamNotFoundError
    from tta_client.replay import ReplayConfig, run_replay
    from tta_data import load_jpeg_npz

    dataset = load_jpeg_npz(cifar10_archive("test"))

    streams = [f"{PREFIX}-{i}" for i in range(len(STRATEGIES))]
    runs: list[PhaseRun] = []
    async with AsyncClient(url, timeout=300) as client, httpx.AsyncClient(base_url=url, timeout=60) as http:
        for stream, strategy in zip(streams, STRATEGIES, strict=True):
            with contextlib.suppress(StreamNotFoundError):
                await client.delete_stream(stream)  # leftovers of an earlier run
            await client.set_policy(stream, strategy)
        say(f"streams: {', '.join(f'{s}={t}' for s, t in zip(streams, STRATEGIES, strict=True))}")
        await asyncio.sleep(2 * args.scrape_interval)  # a flat lead-in on the graphs
        for phase in PHASES:
            if phase.reset_first:
                for stream in streams:
                    await client.reset_stream(stream)
                say(f"POST /v1/streams/{{id}}/reset on {len(streams)} streams")
            cfg = ReplayConfig(
                streams=len(streams),
                stream_prefix=PREFIX,
                keep_policy=True,
                payload="raw",
                max_seconds=args.phase_seconds,
            )
            source = cifar_streams(
                dataset, [phase.corruption], severity=5, n=args.n, batch_size=args.batch_size, seed=phase.seed
            )
            say(f"phase {phase.name!r}: corruption {phase.corruption}, up to {args.phase_seconds:.0f}s")
            before = await scrape(http)
            start = time.time()
            tick = asyncio.create_task(ticker(http, phase.name, before, args.progress_every))
            try:
                result = await asyncio.wait_for(
                    run_replay(client, cfg, source, progress=False), timeout=args.phase_seconds + 300
                )
            finally:
                tick.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tick
            end = time.time()
            after = await scrape(http)
            run = PhaseRun(
                phase.name,
                phase.corruption,
                start,
                end,
                requests=len(result.records),
                errors=len(result.errors),
                stopped_by=result.stopped_by,
                means=phase_means(before, after),
            )
            for stream, strategy in zip(streams, STRATEGIES, strict=True):
                public = await client.get_stream(stream)
                run.stream_drift[strategy] = public.drift.model_dump(exclude={"class_distribution"})
            say(
                f"phase {phase.name!r} done in {end - start:.0f}s: {run.requests} batches, "
                f"{run.errors} errors, stopped by {run.stopped_by or 'end of data'}"
            )
            if result.errors:
                say(f"  first error: {result.errors[0]}")
            runs.append(run)
        for stream in streams:
            with contextlib.suppress(StreamNotFoundError):
                await client.delete_stream(stream)
    return runs


# Prometheus queries of the dashboard.


@dataclass
class Target:
    ref: str
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    grid: dict[str, int]
    unit: str
    limits: tuple[float | None, float | None]
    targets: list[Target]


def drift_panels(dashboard: dict[str, Any]) -> list[Panel]:
    """The panels of the dashboard's "Drift" row, in order."""
    panels, inside = [], False
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            inside = p.get("title") == "Drift"
            continue
        if inside:
            defaults = p.get("fieldConfig", {}).get("defaults", {})
            targets = [Target(t["refId"], t["expr"], t.get("legendFormat", "")) for t in p.get("targets", [])]
            limits = (defaults.get("min"), defaults.get("max"))
            panels.append(Panel(p["title"], p["gridPos"], defaults.get("unit", "none"), limits, targets))
    if not panels:
        raise ValueError(f"no 'Drift' row in {DASHBOARD}")
    return panels


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{prom}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=60,
    )
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def prometheus_health(prom: str) -> str:
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    bad = [r["name"] for r in rules if r.get("health") != "ok"]
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    states = ", ".join(f"{a['labels']['alertname']} {a['state']}" for a in alerts) or "none pending or firing"
    n_alerts = sum(r["type"] == "alerting" for r in rules)
    return (
        f"{len(groups)} rule groups, {len(rules) - n_alerts} recording rules and {n_alerts} alerts loaded"
        f" ({'all healthy' if not bad else 'unhealthy: ' + ', '.join(bad)}); alerts: {states}"
    )


# Rendering.


def legend_text(target: Target, rate_interval: str) -> str:
    text = re.sub(r"\{\{\s*\w+\s*\}\}", "", target.legend).strip()
    return text or f"mean over {rate_interval}"


def render(
    panels: list[Panel],
    series: dict[tuple[str, str], list[dict[str, Any]]],
    runs: list[PhaseRun],
    t0: float,
    t_end: float,
    step: float,
    out: Path,
    title: str,
    rate_interval: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    y0 = min(p.grid["y"] for p in panels)
    height = max(p.grid["y"] + p.grid["h"] for p in panels) - y0
    fig = plt.figure(figsize=(16, 4.3 * height / 8 + 1.2), dpi=100)
    gs = GridSpec(height, 24, figure=fig, hspace=1.4 * 8, wspace=12)
    grid = [round(t0 + k * step, 3) for k in range(int((t_end - t0) / step) + 1)]
    bottom = max(p.grid["y"] for p in panels)
    for panel in panels:
        g = panel.grid
        ax = fig.add_subplot(gs[g["y"] - y0 : g["y"] - y0 + g["h"], g["x"] : g["x"] + g["w"]])
        for k, run in enumerate(runs):
            ax.axvspan(run.start - t0, run.end - t0, color=PHASE_COLORS[k], alpha=0.08, lw=0)
            ax.text(
                (run.start + run.end) / 2 - t0, 0.98, run.name, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=8, color=PHASE_COLORS[k],
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1},
            )  # fmt: skip
            if PHASES[k].reset_first:
                ax.axvline(run.start - t0, color="0.3", lw=1, ls=(0, (4, 3)))
        for target in panel.targets:
            for s in series[(panel.title, target.ref)]:
                strategy = s["metric"].get("strategy", "")
                values = {round(float(t), 3): float(v) for t, v in s["values"]}
                ys = [values.get(t, math.nan) for t in grid]  # a missing point is a gap, as in Grafana
                ax.plot(
                    [t - t0 for t in grid], ys, color=COLORS.get(strategy, "0.5"),
                    ls=LINESTYLES.get(target.ref, "-"), lw=1.3,
                )  # fmt: skip
        ax.set_title(panel.title, fontsize=11, loc="left", fontweight="bold")
        ax.set_xlim(0, t_end - t0)
        # Dashboard limits (and axisSoftMin 0), padded a little so a line at 0 or 100% stays visible.
        lo, hi = panel.limits
        lo = 0.0 if lo is None else lo
        hi = ax.get_ylim()[1] if hi is None else hi
        pad = 0.03 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        if panel.unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if panel.grid["y"] == bottom:
            ax.set_xlabel("seconds since start", fontsize=9)
        if len(panel.targets) > 1:
            handles = [
                Line2D(
                    [], [], color="0.25", ls=LINESTYLES.get(t.ref, "-"), label=legend_text(t, rate_interval)
                )
                for t in panel.targets
            ]
            ax.legend(handles=handles, fontsize=7.5, loc="center right", framealpha=0.85)
    handles = [Line2D([], [], color=COLORS[s], lw=2.5, label=s) for s in STRATEGIES]
    fig.legend(handles=handles, loc="lower center", ncol=len(STRATEGIES), fontsize=10, frameon=False)
    fig.suptitle(title, fontsize=10.5, x=0.01, ha="left")
    fig.subplots_adjust(left=0.04, right=0.99, top=0.88, bottom=0.11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def summary_table(runs: list[PhaseRun]) -> str:
    clean = runs[0].means
    head = (
        f"{'phase':<15} {'strategy':<10} {'batches':>7} {'images':>6} {'BN distance':>11} {'x clean':>7} "
        f"{'entropy':>7} {'- clean':>7} {'confidence':>10} | {'stream BN':>9} {'stream H':>8}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        for s in STRATEGIES:
            m, d = run.means[s], run.stream_drift.get(s, {})
            ratio = m["bn_distance"] / clean[s]["bn_distance"] if clean[s]["bn_distance"] else math.nan
            lines.append(
                f"{run.name:<15} {s:<10} {m['batches']:>7.0f} {m['images']:>6.0f} {m['bn_distance']:>11.5f} "
                f"{ratio:>7.2f} {m['entropy']:>7.4f} {m['entropy'] - clean[s]['entropy']:>+7.4f} "
                f"{m['confidence']:>10.4f} | {_fmt(d.get('bn_distance'), 5):>9} {_fmt(d.get('entropy'), 4):>8}"
            )
    return "\n".join(lines)


def alert_thresholds() -> dict[str, tuple[float, float]]:
    """(factor, floor-or-margin) of the BN distance and entropy alerts, read from the rules file."""
    rules = {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    out = {}
    for name in ("TTABNDistanceJump", "TTAPredictionEntropyRising"):
        factor = re.search(r">\s*([\d.]+)\s*\*", rules[name])
        last = re.findall(r">\s*([\d.]+)\s*$", rules[name], flags=re.M)
        if factor is None or not last:
            raise ValueError(f"unexpected expression of {name}: {rules[name]!r}")
        out[name] = (float(factor.group(1)), float(last[-1]))
    return out


def alert_check(runs: list[PhaseRun]) -> str:
    """Whether the noisy phase's means against the clean phase's meet the drift alerts' conditions."""
    try:
        (bn_factor, bn_floor), (h_factor, h_margin) = alert_thresholds().values()
    except (KeyError, ValueError, OSError) as exc:
        return f"(alert thresholds not read: {exc})"
    lines = []
    for s in STRATEGIES:
        c, n = runs[0].means[s], runs[1].means[s]
        bn = n["bn_distance"] > bn_factor * c["bn_distance"] and n["bn_distance"] > bn_floor
        h = n["entropy"] > h_factor * c["entropy"] and n["entropy"] - c["entropy"] > h_margin
        lines.append(
            f"{s:<10} TTABNDistanceJump {'met' if bn else 'not met':<7} "
            f"({n['bn_distance']:.4f} > {bn_factor:g} x {c['bn_distance']:.4f} and > {bn_floor:g}); "
            f"TTAPredictionEntropyRising {'met' if h else 'not met':<7} "
            f"({n['entropy']:.3f} > {h_factor:g} x {c['entropy']:.3f} and +{h_margin:g} nats)"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# Main.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "drift-dashboard.png")
    parser.add_argument("--json", type=Path, help="also write the per-phase figures and the series here")
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="length of each phase (default 60)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n", type=int, default=2000, help="images per stream and phase at most")
    parser.add_argument("--scrape-interval", type=int, default=2, help="Prometheus scrape interval, seconds")
    parser.add_argument(
        "--rate-interval",
        default="30s",
        help="value of $__rate_interval (default 30s: each strategy observes a batch every few seconds)",
    )
    parser.add_argument(
        "--redis-url", default=None, help="state store (default: a redis-server of the demo's own)"
    )
    parser.add_argument("--prometheus", default="prometheus", help="prometheus binary")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if args.phase_seconds <= 0 or args.scrape_interval < 1 or args.batch_size < 1:
        parser.error("--phase-seconds, --scrape-interval and --batch-size must be positive")
    return args


def preflight(args: argparse.Namespace) -> str:
    binary = shutil.which(args.prometheus)
    if binary is None:
        sys.exit(f"no {args.prometheus!r} binary: apt-get install -y --no-install-recommends prometheus")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("matplotlib is not installed: pip install matplotlib==3.10.9")
    if args.redis_url is None:
        if redis_server_binary() is None:
            sys.exit("no redis-server binary: apt-get install -y redis-server, or pass --redis-url")
        return binary
    import redis

    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        sys.exit(f"Redis at {args.redis_url} is not reachable: {exc}")
    return binary


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            say(f"stopping {child.name} (pid {child.proc.pid})")
            child.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = preflight(args)
    panels = drift_panels(json.loads(DASHBOARD.read_text()))
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="tta-drift-demo-") as tmp,
        contextlib.ExitStack() as own,
        children() as started,
    ):
        if args.redis_url is None:
            args.redis_url = own.enter_context(PrivateRedis(appendonly=False)).url
        workdir = Path(tmp)
        server_port, prom_port = free_port(), free_port()
        url, prom = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{prom_port}"
        say(f"starting tta_server on {url} (state in {args.redis_url})")
        try:
            started.append(start_server(server_port, args.redis_url, workdir, args.startup_timeout))
            say(f"starting prometheus on {prom}, scraping every {args.scrape_interval}s, rules {RULES.name}")
            started.append(
                start_prometheus(
                    binary, server_port, prom_port, args.scrape_interval, workdir, args.startup_timeout
                )
            )
            say("both up; replaying")
            t0 = time.time()
            runs = asyncio.run(run_scenario(url, args))
            time.sleep(2 * args.scrape_interval + 1)  # the last samples reach Prometheus
            t_end = time.time()
            models = sorted(
                {
                    s["metric"]["model"]
                    for s in query_range(prom, "tta_samples_total", t_end - 5, t_end, args.scrape_interval)
                }
            )
            variables = {
                "model": "|".join(re.escape(m) for m in models) or ".*",
                "strategy": "|".join(STRATEGIES),
                "__rate_interval": args.rate_interval,
            }
            say(f"querying Prometheus for {sum(len(p.targets) for p in panels)} dashboard queries")
            series: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for panel in panels:
                for target in panel.targets:
                    expr = substitute(target.expr, variables)
                    series[(panel.title, target.ref)] = query_range(
                        prom, expr, t0, t_end, args.scrape_interval
                    )
            health = prometheus_health(prom)
        except BaseException:
            for child in started:
                say(f"{child.name} log tail:\n{child.tail()}")
            raise
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = (
        f'TTA drift dashboard, "Drift" row, from a live Prometheus ({stamp})\nmodel={variables["model"]}, '
        f"strategy={variables['strategy']}, $__rate_interval={args.rate_interval}, "
        f"scrape {args.scrape_interval}s, batches of {args.batch_size}, gaussian_noise severity 5"
    )
    render(panels, series, runs, t0, t_end, args.scrape_interval, args.out, title, args.rate_interval)
    size_kb = args.out.stat().st_size / 1024
    say(f"wrote {args.out} ({size_kb:.0f} KB)")
    say(f"Prometheus: {health}")
    print()
    print("Per-phase means from the server's /metrics (delta of _sum / delta of _count over the phase);")
    print("stream BN / stream H: GET /v1/streams/{id} drift (moving averages) at the end of the phase.")
    print(summary_table(runs))
    print("\nDrift alert conditions on the phase means (gaussian_noise phase as the 15m mean, clean phase as")
    print("the 6h baseline; the real alerts compare rolling windows and need 15m sustained):")
    print(alert_check(runs))
    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"total {time.monotonic() - began:.0f}s"
    )
    if args.json:
        payload = {
            "date": stamp,
            "args": {k: str(v) for k, v in vars(args).items()},
            "variables": variables,
            "phases": [asdict(r) for r in runs],
            "series": {f"{title} {ref}": data for (title, ref), data in series.items()},
        }
        args.json.write_text(json.dumps(payload, indent=1))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
