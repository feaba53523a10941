"""`tta-bench <command> [options]`: dispatches to the benchmark modules."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "accuracy": "tta_bench.accuracy",
    "throughput": "tta_bench.throughput",
    "soak": "tta_bench.soak",
    "multinode": "tta_bench.multinode",
    "ops": "tta_bench.opcount",
    "stream": "tta_bench.replay_data",
    "prepare-source": "tta_bench.prepare_source",
    "state": "tta_bench.state_size",
    "merge": "tta_bench.merge_runs",
    "sidebyside": "tta_bench.sidebyside",
    "writeback": "tta_bench.write_back",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: tta-bench {{{','.join(COMMANDS)}}} [options]  (tta-bench <command> --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
