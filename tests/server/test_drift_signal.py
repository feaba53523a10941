"""The drift signals react to a covariate shift and recover after a reset, end to end over HTTP.

A live server gets two streams, one per strategy (``source``: no adaptation, ``norm``: test-batch BN
statistics). Each phase is one ``run_replay`` of real CIFAR-10 test images, and ``/metrics`` is scraped
between phases, so a phase's mean of a histogram is ``delta(_sum) / delta(_count)`` over exactly its
batches (the same ratio the dashboard and the recording rules take over a time window):

1. clean images;
2. the same kind of stream under gaussian noise (severity 5): the mean BN distance at least doubles
   and the mean prediction entropy rises by 25% and by the margin of ``ENTROPY_RISE`` (for ``source``
   the 0.1 nats of the ``TTAPredictionEntropyRising`` alert; test-batch statistics absorb part of the
   shift, so ``norm`` rises less);
3. ``POST /v1/streams/{id}/reset``, then other clean images: both means fall back near phase 1.

The per-stream moving averages of ``GET /v1/streams/{id}`` must follow the same course. The server runs
with ``drift_momentum=0.5`` so that two batches move them decisively (the default 0.9 needs ~20).
Phases are short (4 batches of 32 per stream) to keep the test well under a minute on two CPU cores.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tta_bench.paths import cifar10_archive
from tta_bench.replay_data import cifar_streams
from tta_client import AsyncClient
from tta_client.replay import ReplayConfig, ReplayResult, run_replay
from tta_data import JpegDataset, load_jpeg_npz

STRATEGIES = ("source", "norm")  # stream drift-{i} uses STRATEGIES[i]
ENTROPY_RISE = {"source": 0.1, "norm": 0.05}  # nats, noisy phase over clean phase (at least)
PREFIX = "drift"
N_PER_PHASE = 128
BATCH = 32
HISTOGRAMS = ("tta_bn_distance", "tta_prediction_entropy_nats")
COUNTERS = ("tta_samples_total", "tta_state_resets_total")

Scrape = dict[tuple[str, str], float]  # (sample name, strategy) -> value


def scrape(url: str) -> Scrape:
    """The drift histograms' _sum/_count, the image counter and the api resets, per strategy."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    wanted = {f"{h}_{s}" for h in HISTOGRAMS for s in ("sum", "count")} | set(COUNTERS)
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted or sample.labels.get("strategy") not in STRATEGIES:
                continue
            if sample.name == "tta_state_resets_total" and sample.labels.get("reason") != "api":
                continue
            key = (sample.name, sample.labels["strategy"])
            out[key] = out.get(key, 0.0) + sample.value
    return out


@dataclass(frozen=True)
class PhaseMeans:
    batches: int
    images: int
    bn_distance: float
    entropy: float


def phase_means(before: Scrape, after: Scrape, strategy: str) -> PhaseMeans:
    def delta(name: str) -> float:
        return after.get((name, strategy), 0.0) - before.get((name, strategy), 0.0)

    batches = delta("tta_bn_distance_count")
    assert batches > 0, f"no BN distance observed for {strategy}"
    assert delta("tta_prediction_entropy_nats_count") == batches
    return PhaseMeans(
        batches=int(batches),
        images=int(delta("tta_samples_total")),
        bn_distance=delta("tta_bn_distance_sum") / batches,
        entropy=delta("tta_prediction_entropy_nats_sum") / batches,
    )


@functools.cache
def cifar_test() -> JpegDataset:
    return load_jpeg_npz(cifar10_archive("test"))


async def replay(client: AsyncClient, corruption: str, seed: int) -> ReplayResult:
    cfg = ReplayConfig(
        streams=len(STRATEGIES),
        stream_prefix=PREFIX,
        keep_policy=True,  # the policies were set per stream beforehand
        payload="raw",
    )
    source = cifar_streams(cifar_test(), [corruption], severity=5, n=N_PER_PHASE, batch_size=BATCH, seed=seed)
    result = await run_replay(client, cfg, source, progress=False)
    assert not result.errors, result.errors
    assert sum(r.images for r in result.records) == len(STRATEGIES) * N_PER_PHASE
    return result


def check_against_records(result: ReplayResult, means: dict[str, PhaseMeans]) -> None:
    """The metrics saw exactly the batches the client was answered, with the same per-batch figures."""
    for i, strategy in enumerate(STRATEGIES):
        records = [r for r in result.records if r.stream_id == f"{PREFIX}-{i}"]
        m = means[strategy]
        assert (m.batches, m.images) == (len(records), sum(r.images for r in records)), strategy
        bn = [r.bn_distance for r in records if r.bn_distance is not None]
        assert len(bn) == len(records), strategy
        assert math.isclose(m.bn_distance, sum(bn) / len(bn), rel_tol=1e-6), strategy
        entropies = [r.mean_entropy for r in records if r.mean_entropy is not None]
        assert len(entropies) == len(records), strategy
        entropy = sum(entropies) / len(records)
        assert math.isclose(m.entropy, entropy, rel_tol=1e-6), strategy


def test_drift_signals_rise_under_noise_and_recover_after_reset(live_server) -> None:
    url = live_server(drift_momentum=0.5)
    streams = [f"{PREFIX}-{i}" for i in range(len(STRATEGIES))]

    async def scenario() -> tuple[
        list[dict[str, PhaseMeans]], list[dict[str, dict[str, Any]]], tuple[Scrape, Scrape]
    ]:
        resets: tuple[Scrape, Scrape] = ({}, {})
        phases: list[dict[str, PhaseMeans]] = []
        drift: list[dict[str, dict[str, Any]]] = []  # per phase: strategy -> GET /v1/streams/{id} drift
        async with AsyncClient(url, timeout=120) as client:
            for stream, strategy in zip(streams, STRATEGIES, strict=True):
                await client.set_policy(stream, strategy)
            before = scrape(url)
            for corruption, seed, reset in (
                ("none", 0, False),
                ("gaussian_noise", 0, False),
                ("none", 7, True),
            ):
                if reset:
                    for stream in streams:
                        fresh = await client.reset_stream(stream)
                        assert fresh.steps == 0 and fresh.drift.bn_distance is None, fresh
                    after_reset = scrape(url)
                    resets, before = (before, after_reset), after_reset
                result = await replay(client, corruption, seed)
                after = scrape(url)
                means = {s: phase_means(before, after, s) for s in STRATEGIES}
                check_against_records(result, means)
                phases.append(means)
                drift.append(
                    {
                        s: (await client.get_stream(stream)).drift.model_dump()
                        for stream, s in zip(streams, STRATEGIES, strict=True)
                    }
                )
                if corruption == "gaussian_noise":
                    top = await client.drift_top(10)
                    # A stream without a score is left out, and the length check below fails on it.
                    scores = [
                        t.drift.bn_distance
                        for t in top
                        if t.stream_id in streams and t.drift.bn_distance is not None
                    ]
                    assert len(scores) == len(streams) and scores == sorted(scores, reverse=True), top
                before = after
        return phases, drift, resets

    (clean, noisy, recovered), drift, (r0, r1) = asyncio.run(scenario())
    report = "\n".join(
        f"{s:>7} {name:>15}: bn_distance {p[s].bn_distance:.5f} entropy {p[s].entropy:.4f} "
        f"| stream drift bn {d[s]['bn_distance']:.5f} entropy {d[s]['entropy']:.4f}"
        for s in STRATEGIES
        for name, p, d in zip(
            ("clean", "gaussian_noise", "reset+clean"), (clean, noisy, recovered), drift, strict=True
        )
    )
    print(report)
    for s in STRATEGIES:
        assert r1[("tta_state_resets_total", s)] - r0.get(("tta_state_resets_total", s), 0.0) == 1, s
        c, n, r = clean[s], noisy[s], recovered[s]
        # Noise: BN statistics move away from the source's, predictions get less certain.
        assert n.bn_distance >= 2 * c.bn_distance, report
        assert n.entropy >= 1.25 * c.entropy and n.entropy - c.entropy >= ENTROPY_RISE[s], report
        # Reset + clean images: back near the clean phase, far from the noisy one.
        assert r.bn_distance < 1.5 * c.bn_distance, report
        assert abs(r.entropy - c.entropy) < 0.5 * (n.entropy - c.entropy), report
        # Per-stream moving averages follow the same course.
        dc, dn, dr = (d[s] for d in drift)
        assert dn["bn_distance"] >= 2 * dc["bn_distance"], report
        assert dn["entropy"] > dc["entropy"] + 0.05, report
        assert dr["bn_distance"] < 1.5 * dc["bn_distance"], report
        assert dr["entropy"] < dn["entropy"], report
