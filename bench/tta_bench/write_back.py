"""`tta-bench writeback`: what storing a large state every N-th step (TTA_WRITE_BACK_STEPS) saves per step.

For each strategy and each N of `--steps-per-write`: a fresh engine (the server's own `tta_server.engine.Engine`,
no HTTP) on a store of its own (`--store redis`: a private redis-server on a free loopback port, started and
removed by the bench; `memory`: the in-process store), one stream, `--warmup` adapting steps not timed, then
`--steps` adapting steps of `--batch-size` CIFAR-10 test images, timed one by one. Rounds of the N values are
interleaved (`--rounds`), so a slow phase of a shared machine hits every N alike. Prints a markdown table:
the median step time, its ratio to N=1, the bytes written to the store per step, and how many steps a crash
at the end would have lost (`tta_state_unwritten_steps`). The held steps are written by `shutdown`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tta_bench.paths import MODELS_CONFIG as DEFAULT_MODELS_CONFIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-bench writeback", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="cotta", help="comma list of strategies with large states")
    p.add_argument(
        "--config", action="append", default=[], metavar="STRATEGY=JSON", help="config overrides, repeatable"
    )
    p.add_argument("--steps-per-write", default="1,4,16", help="comma list of N (1 = every step stored)")
    p.add_argument("--store", choices=["redis", "memory"], default="redis")
    p.add_argument("--model", default=None)
    p.add_argument("--models-config", type=Path, default=DEFAULT_MODELS_CONFIG)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="timed adapting steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=None, help="folder of test_jpeg.npz")
    return p


def _images(data_dir: Path | None, n: int) -> Any:
    """n CIFAR-10 test images, uint8 NCHW, in a seeded shuffled order (the archive is sorted by class)."""
    import numpy as np
    import torch

    from tta_bench.paths import cifar10_archive
    from tta_data import decode_images, load_jpeg_npz

    ds = load_jpeg_npz(cifar10_archive("test", data_dir))
    gen = np.random.default_rng(0)
    idx = gen.choice(len(ds), size=n, replace=False)
    images = decode_images(ds, np.sort(idx))[gen.permutation(n)]  # decoded in file order, then mixed
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


async def _round(
    settings: Any,
    pool: Any,
    redis_url: str | None,
    strategy: str,
    config: dict[str, Any],
    batches: list[Any],
    warmup: int,
) -> dict[str, float]:
    from tta_server.engine import Engine
    from tta_server.metrics import Metrics
    from tta_server.state_store import InMemoryStateStore, RedisStateStore

    store = RedisStateStore(redis_url, 3600, 30.0) if redis_url else InMemoryStateStore(3600)
    engine = Engine(settings, pool, store, Metrics())
    stream = f"wb-{time.monotonic_ns()}"
    try:
        await engine.put_policy("bench", stream, None, strategy, config, 0)
        for b in batches[:warmup]:
            await engine.predict("bench", stream, b, True)
        times = []
        stored = engine.metrics.state_bytes.labels(engine.default_policy.model, strategy)  # bytes per commit
        before = stored._sum.get()
        for b in batches[warmup:]:
            t0 = time.perf_counter()
            out = await engine.predict("bench", stream, b, True)
            times.append(time.perf_counter() - t0)
            assert out.adapted, out.not_adapted
        written = stored._sum.get() - before
        unwritten = engine.metrics.unwritten_steps._value.get()
        state_bytes = engine.repository.cached_bytes
        await engine.shutdown()
        await engine.delete("bench", stream)
    finally:
        engine.close()
        await store.close()
    steps = len(batches) - warmup
    return {
        "median_ms": 1000 * statistics.median(times),
        "written_per_step": written / steps,
        "unwritten": unwritten,
        "state_bytes": state_bytes,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import json

    import torch

    from tta_bench.redis_server import PrivateRedis
    from tta_server.model_pool import ModelPool
    from tta_server.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.steps_per_write.split(",")]
    overrides = dict(item.split("=", 1) for item in args.config)
    pool = ModelPool.load(args.models_config, torch.device("cpu"))
    total = args.warmup + args.steps
    images = _images(args.data_dir, total * args.batch_size)
    batches = [images[i * args.batch_size : (i + 1) * args.batch_size] for i in range(total)]
    rows: list[dict[str, Any]] = []
    redis = PrivateRedis(appendonly=False).start() if args.store == "redis" else None
    try:
        for strategy in args.strategies.split(","):
            config = json.loads(overrides.get(strategy, "{}"))
            figures: dict[int, list[dict[str, float]]] = {n: [] for n in ns}
            for r in range(args.rounds):
                for n in ns:
                    settings = Settings(models_config=args.models_config, write_back_steps=n)
                    url = redis.url if redis is not None else None
                    got = asyncio.run(_round(settings, pool, url, strategy, config, batches, args.warmup))
                    figures[n].append(got)
                    print(
                        f"{strategy} N={n} round {r + 1}/{args.rounds}: {got['median_ms']:.1f} ms/step",
                        file=sys.stderr,
                        flush=True,
                    )
            base = statistics.median(f["median_ms"] for f in figures[ns[0]])
            for n in ns:
                median = statistics.median(f["median_ms"] for f in figures[n])
                rows.append(
                    {
                        "strategy": strategy,
                        "n": n,
                        "state_bytes": figures[n][0]["state_bytes"],
                        "median_ms": median,
                        "ratio": median / base,
                        "written_per_step": statistics.mean(f["written_per_step"] for f in figures[n]),
                        "unwritten": figures[n][-1]["unwritten"],
                    }
                )
    finally:
        if redis is not None:
            redis.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = run(args)
    first = rows[0]["n"] if rows else 1
    print(
        f"| strategy | N | state bytes | ms/step (median) | vs N={first} | bytes stored per step | steps a crash loses |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['n']} | {r['state_bytes']:,} | {r['median_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['written_per_step']:,.0f} | {r['unwritten']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
