"""`tta-bench state`: per-strategy stream-state size and encode/decode round-trip time on one model.

For each strategy: a fresh state, `--steps` adapting steps on random batches of `--batch-size` images, then
the state's stored form (`adapters.serialization.state_to_bytes`, safetensors + JSON meta): its bytes, the
number of tensors, and the median time of `--repeats` encodes and decodes. Prints a markdown table.

`--compress` adds what two lossless representations would store (a design study; the server stores the plain
form): the blob through zlib (level 1), and "XOR vs source + zlib": every state tensor that is a copy of a
network weight (same name suffix, shape and dtype) replaced by the bitwise XOR of its float32 bits with the
source weight's before zlib, so the sign, exponent and leading mantissa bits that a small update leaves alone
become zero bytes. `--corruption NAME` steps on corrupted CIFAR-10 test images instead of uniform noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
    p.add_argument("--compress", action="store_true", help="add zlib and XOR-vs-source + zlib sizes")
    p.add_argument(
        "--corruption",
        default=None,
        help="step on CIFAR-10 test images with this corruption at severity 5 (default: uniform noise)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="folder of test_jpeg.npz (with --corruption)")
    return p


def xor_against_source(tensors: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """Each float32 tensor named like a source weight (one name ends with the other, same shape) as the XOR of
    its bits with that weight's; the others unchanged. XOR again with the source restores it bit for bit."""
    import torch

    by_suffix = sorted(source, key=len, reverse=True)
    out = {}
    for key, t in tensors.items():
        # A state key may carry a prefix (`cotta.student.`) or lack the model wrapper's (`net.`).
        match = next(
            (
                n
                for n in by_suffix
                if (key.endswith(n) or n.endswith("." + key)) and source[n].shape == t.shape
            ),
            None,
        )
        if match is None or t.dtype != torch.float32:
            out[key] = t
            continue
        ref = source[match].detach().to(t.device, torch.float32).contiguous()
        out[key] = (t.contiguous().view(torch.int32) ^ ref.view(torch.int32)).view(torch.float32)
    return out


def compressed_sizes(state: Any, source: dict[str, Any]) -> tuple[int, int]:
    """(zlib-1 bytes of the stored blob, zlib-1 bytes of the blob with the XOR-vs-source tensors)."""
    import zlib

    from adapters import AdaptationState
    from adapters.serialization import state_to_bytes

    plain = zlib.compress(state_to_bytes(state), 1)
    xored = AdaptationState(xor_against_source(dict(state.tensors), source), dict(state.meta))
    return len(plain), len(zlib.compress(state_to_bytes(xored), 1))


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
    batches = _batches(args, handle) if args.corruption else None
    source = dict(handle.model.named_parameters())
    print(f"model {handle.model_id}, batch {args.batch_size}, {args.steps} steps, median of {args.repeats}")
    extra = (" zlib bytes | XOR vs source + zlib |", "---:|---:|") if args.compress else ("", "")
    print("| strategy | state bytes | tensors | encode (ms) | decode (ms) |" + extra[0])
    print("|---|---:|---:|---:|---:|" + extra[1])
    for name in names:
        strategy = adapters.get_strategy(name)
        cfg = strategy.parse_config({})
        try:
            state = strategy.init_state(handle, cfg, 0)
        except adapters.AdaptError as exc:
            print(f"| {name} | refused: {exc} | | | |")
            continue
        for i in range(args.steps):
            x = batches[i] if batches is not None else torch.rand(args.batch_size, 3, h, w, generator=gen)
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
        row = (
            f"| {name} | {len(blob):,} | {len(state.tensors)} | {1e3 * statistics.median(enc):.2f} | "
            f"{1e3 * statistics.median(dec):.2f} |"
        )
        if args.compress:
            plain, xored = compressed_sizes(state, source)
            row += f" {plain:,} ({plain / len(blob):.2f}) | {xored:,} ({xored / len(blob):.2f}) |"
        print(row, flush=True)
    return 0


def _batches(args: argparse.Namespace, handle: Any) -> list[Any]:
    """`--steps` batches of the corrupted test split, shuffled with seed 0."""
    import torch

    from tta_bench.accuracy import StreamCache
    from tta_bench.paths import cifar10_archive
    from tta_data.cifar import load_jpeg_npz

    dataset = load_jpeg_npz(cifar10_archive("test", args.data_dir))
    n = args.steps * args.batch_size
    cache = StreamCache(dataset, 5, n, "iid", 0.1, 0, args.batch_size)
    return [b.images.to(torch.float32).div(255) for b in cache.batches(args.corruption)]


if __name__ == "__main__":
    sys.exit(main())
