"""Benchmarks: `tta-bench accuracy | throughput | soak`."""
