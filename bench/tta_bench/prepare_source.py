"""`tta-bench prepare-source --model ID`: make a model's source artefact (EATA's Fisher; with `--strategies
rmt`, RMT's warmed-up start and prototypes) from its source data.

Writes the safetensors file that the model's `source_artifact` in the models file names (or `--out`), with
the model's fingerprint in its metadata; the server loads it at start instead of computing the Fisher on
the first EATA stream (2000 forward and backward passes). Without the file the server still computes it at
first use; a file made for other weights is refused at start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tta_bench.paths import MODELS_CONFIG as DEFAULT_MODELS_CONFIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-bench prepare-source", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model id (default: the models file's default model)")
    p.add_argument("--models-config", type=Path, default=DEFAULT_MODELS_CONFIG)
    p.add_argument(
        "--out", type=Path, default=None, help="artefact path (default: the model's source_artifact)"
    )
    p.add_argument("--seeds", default="0", help="comma list of stream seeds to prepare the Fisher for")
    p.add_argument(
        "--strategies",
        default="eata,unmix_tns+eata",
        help="comma list of the strategies to prepare for (also: rmt, its warm-up and prototypes; petal, its source posterior; ecotta, its warmed-up meta networks)",
    )
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from safetensors.torch import save_file

    from adapters import AdaptError
    from adapters.models import build_handle
    from adapters.prepare import prepare_source
    from tta_server.model_pool import read_models_file, resolve_device

    models = read_models_file(args.models_config)
    specs = {m.id: m for m in models.models}
    chosen = args.model or models.default_model or models.models[0].id
    if chosen not in specs:
        print(f"tta-bench prepare-source: error: unknown model {chosen!r}", file=sys.stderr)
        return 2
    spec = specs[chosen]
    out = args.out or spec.source_artifact
    if out is None:
        print(
            f"tta-bench prepare-source: error: model {chosen!r} declares no source_artifact; give --out",
            file=sys.stderr,
        )
        return 2
    if spec.source_data is None:
        print(f"tta-bench prepare-source: error: model {chosen!r} declares no source_data", file=sys.stderr)
        return 2
    # The artefact being remade must not be read while it is made.
    handle = build_handle(spec.model_copy(update={"source_artifact": None}), resolve_device(args.device))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    start = time.perf_counter()
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        tensors = prepare_source(handle, strategies=names, seeds=seeds)
    except (ValueError, AdaptError) as exc:
        print(f"tta-bench prepare-source: error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"fingerprint": handle.fingerprint, "model": chosen})
    print(f"{out}: {len(tensors)} tensors for {chosen} (seeds {seeds}), {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
