"""Kernel launches and host synchronisations of a piece of code, counted on any device with the profiler.

On a GPU a step is launch-bound when it issues many small kernels, and stalls whenever the host reads
device data before the result. Both can be counted on the CPU, so they are checked without a GPU:

* `kernels`: leaf aten ops, i.e. ops that do the work themselves. Views and other metadata-only ops,
  allocations, and copies or fills of 0-dim tensors (how the CPU wraps Python scalars; a GPU kernel takes
  them as arguments) are not kernels. Reductions, matrix products, softmax and cat count once (`ATOMIC`),
  as does a multi-tensor `_foreach_*` op, which launches one kernel per chunk of tensors on a GPU while
  the CPU loops over the tensors.
* `host_syncs`: scalar reads (`.item()`, `int()`, `bool()`), boolean-mask indexing (`nonzero`), and
  `.tolist()`, which the profiler does not show on the CPU and is therefore counted by wrapping it.

The counts are a proxy for launches, not a GPU measurement: some composite ops launch more than one
kernel on a GPU and fused CPU kernels can differ from GPU ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero"})
NO_KERNEL = frozenset(
    {
        "aten::alias",
        "aten::as_strided",
        "aten::as_strided_",
        "aten::chunk",
        "aten::contiguous",
        "aten::detach",
        "aten::detach_",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::expand",
        "aten::expand_as",
        "aten::flatten",
        "aten::lift_fresh",
        "aten::narrow",
        "aten::numpy_T",
        "aten::permute",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::resize_",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::result_type",
        "aten::select",
        "aten::set_",
        "aten::slice",
        "aten::split",
        "aten::split_with_sizes",
        "aten::squeeze",
        "aten::t",
        "aten::to",
        "aten::_to_copy",
        "aten::transpose",
        "aten::unbind",
        "aten::unsqueeze",
        "aten::_unsafe_view",
        "aten::view",
        "aten::view_as",
        "detach",
    }
)
_SCALAR_WRAPS = frozenset({"aten::copy_", "aten::fill_"})
# One kernel each on a GPU, where the CPU implementation calls further ops (a fill of the output, a
# division after a sum, ...).
ATOMIC = frozenset(
    {
        "aten::_log_softmax",
        "aten::_softmax",
        "aten::addmm",
        "aten::bmm",
        "aten::cat",
        "aten::linalg_vector_norm",
        "aten::mean",
        "aten::mm",
        "aten::sum",
        "aten::var_mean",
    }
)


@dataclass
class OpCount:
    kernels: int = 0
    host_syncs: int = 0
    by_op: Counter[str] = field(default_factory=Counter)


def _is_kernel(event: Any) -> bool:
    name = event.name
    if not name.startswith("aten::") or name in NO_KERNEL:
        return False
    # A copy or fill of a 0-dim tensor is the CPU wrapping a Python scalar.
    return not (name in _SCALAR_WRAPS and all(not shape for shape in event.input_shapes[:1]))


def _count(events: Any, out: OpCount) -> None:
    for e in events:
        if e.name.startswith("aten::_foreach_") or e.name in ATOMIC:
            out.by_op[e.name] += 1  # a multi-tensor op: one launch per chunk of tensors on a GPU
            continue
        if e.name in SYNC_OPS:
            out.host_syncs += 1
        inner = [c for c in e.cpu_children if c.name.startswith("aten::")]
        if _is_kernel(e) and not any(_is_kernel(c) or c.name in ATOMIC for c in inner):
            out.by_op[e.name] += 1
        else:
            _count(e.cpu_children, out)


@contextmanager
def counting_ops() -> Iterator[OpCount]:
    """Count the kernels and host synchronisations of the code in the block (filled in on exit).

    Patches `torch.Tensor.tolist` while active: for benchmarks and tests, not for a serving process.
    """
    out = OpCount()
    tolist = torch.Tensor.tolist
    reads = [0]

    def counted(t: torch.Tensor) -> Any:
        reads[0] += 1
        return tolist(t)

    # A counting stand-in for the method (restored below); it takes a Tensor where the stub says TensorBase.
    torch.Tensor.tolist = counted  # type: ignore[method-assign,assignment]
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield out
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    _count([e for e in prof.events() if e.cpu_parent is None], out)
    out.kernels = sum(out.by_op.values())
    out.host_syncs += reads[0]


def count_call(fn: Callable[[], object]) -> OpCount:
    """The kernels and host synchronisations of one call of `fn`."""
    with counting_ops() as ops:
        fn()
    return ops


def main(argv: list[str] | None = None) -> int:
    """`tta-bench ops`: kernels and host synchronisations of one bare forward, one bare forward+backward
    and one step of each strategy, at the throughput bench's model, batch and input layout."""
    import argparse
    import json
    from pathlib import Path

    import adapters
    from adapters.models import build_handle
    from tta_bench import throughput as tp
    from tta_bench.paths import MODELS_CONFIG
    from tta_server.model_pool import resolve_device

    parser = argparse.ArgumentParser(prog="tta-bench ops", description=main.__doc__)
    parser.add_argument(
        "--model", choices=("wrn", "resnet50"), default="wrn", help="wrn = models.yaml default"
    )
    parser.add_argument("--models-config", type=Path, default=MODELS_CONFIG)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--strategies", default="source,norm,alpha_bn,unmix_tns,tent,eata,sar")
    parser.add_argument("--strategy-config", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    spec = tp.resolve_spec(args)
    if args.precision:
        spec = spec.model_copy(update={"precision": args.precision})
    handle = build_handle(spec, device)
    batch = tp.to_input(tp.input_images(spec, args.batch_size), device, "nhwc")
    fwd, train, affine = tp.bare_workloads(*tp.bare_nets(spec, device, handle.channels_last), [batch], handle)
    calls: dict[str, Any] = {
        "bare forward": fwd.fn,
        "bare fwd+bwd": train.fn,
        "bare fwd+bwd affine": affine.fn,
    }
    configs = tp.strategy_configs(args.strategy_config)
    for name in [n.strip() for n in args.strategies.split(",") if n.strip()]:
        strategy = adapters.get_strategy(name)
        try:
            cfg = strategy.parse_config(configs.get(name, {}))
            calls[name] = tp.StrategyRun(strategy, handle, cfg, [batch])
        except adapters.AdaptError as exc:
            print(f"  skipping {name}: {exc}")
    rows: dict[str, dict[str, int]] = {}
    print(f"ops per call: model {spec.id} batch {args.batch_size} on {tp.describe_device(device)}")
    print(f"{'call':<16}{'kernels':>9}{'syncs':>7}")
    for label, fn in calls.items():
        fn()  # warm up: first steps create state (EATA's prediction average), caches and lazy buffers
        ops = count_call(fn)
        rows[label] = {"kernels": ops.kernels, "host_syncs": ops.host_syncs}
        print(f"{label:<16}{ops.kernels:>9}{ops.host_syncs:>7}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"model": spec.id, "batch_size": args.batch_size, "ops": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
