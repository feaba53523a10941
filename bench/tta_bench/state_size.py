"""`tta-bench state`: per-strategy stream-state size and encode/decode round-trip time on one model.

For each strategy: a fresh state, `--steps` adapting steps on random batches of `--batch-size` images, then
the state's stored form (`adapters.serialization.state_to_bytes`, safetensors + JSON meta): its bytes, the
number of tensors, and the median time of `--repeats` encodes and decodes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tta_bench.paths import MODELS_CONFIG as DEFAULT_MODELS_CONFIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-bench state", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="all", help="comma list, or 'all'")
    p.add_argument("--model", default=None)
    p.add_argument("--models-config", type=Path, default=DEFAULT_MODELS_CONFIG)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    import adapters
    from adapters.serialization import state_from_bytes, state_to_bytes
    from tta_bench.accuracy import load_handle

    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load_handle(args.models_config, args.model, "cpu")
    names = adapters.list_strategies() if args.strategies == "all" else args.strategies.split(",")
    gen = torch.Generator().manual_seed(0)
    h, w = handle.input_size
    print(f"model {handle.model_id}, batch {args.batch_size}, {args.steps} steps, median of {args.repeats}")
    print("| strategy | state bytes | tensors | encode (ms) | decode (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        strategy = adapters.get_strategy(name)
        cfg = strategy.parse_config({})
        try:
            state = strategy.init_state(handle, cfg, 0)
        except adapters.AdaptError as exc:
            print(f"| {name} | refused: {exc} | | | |")
            continue
        for _ in range(args.steps):
            x = torch.rand(args.batch_size, 3, h, w, generator=gen)
            state = strategy.step(handle, x, state, cfg).state
        enc, dec = [], []
        blob = b""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            blob = state_to_bytes(state)
            t1 = time.perf_counter()
            state_from_bytes(blob)
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        print(
            f"| {name} | {len(blob):,} | {len(state.tensors)} | {1e3 * statistics.median(enc):.2f} | "
            f"{1e3 * statistics.median(dec):.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
