"""Throughput of one sequential client: `/v1` predict (npy body, httpx) against the Open Inference Protocol
with tritonclient over HTTP (binary tensors) and gRPC, on the same server, model, strategy and batches.

Starts `python -m tta_server` (HTTP and gRPC on free loopback ports, in-process state store), gives each
protocol its own stream under `--strategy`, warms up, then sends `--requests` batches of `--batch` random
32x32 images per protocol, the protocols taking turns on each batch (a change of load falls on all
alike), and prints images/s (over the time spent in its calls) and median / p95 latency. Figures: docs/BENCHMARKS.md.

usage: .venv/bin/python scripts/bench_oip.py [--requests 100] [--batch 16] [--strategy norm]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "cifar10_wrn40_2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def measure(
    sends: list[Callable[[np.ndarray], None]], batches: list[np.ndarray], warmup: int
) -> list[tuple[float, float, float]]:
    """(images/s, p50 ms, p95 ms) of each sender; they take turns on every batch, so a change of the
    machine's load during the run falls on all of them alike."""
    for x in batches[:warmup]:
        for send in sends:
            send(x)
    lat: list[list[float]] = [[] for _ in sends]
    for x in batches:
        for i, send in enumerate(sends):
            t = time.perf_counter()
            send(x)
            lat[i].append(time.perf_counter() - t)
    images = sum(len(x) for x in batches)
    return [(images / sum(ls), statistics.median(ls) * 1e3, float(np.percentile(ls, 95)) * 1e3) for ls in lat]


def main() -> None:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--strategy", default="norm")
    p.add_argument("--threads", type=int, default=2, help="TTA_TORCH_THREADS of the server")
    args = p.parse_args()

    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env |= {"TTA_GRPC_PORT": str(grpc_port), "TTA_LOG_LEVEL": "WARNING", "TTA_DEVICE": "cpu"}
    env["TTA_TORCH_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "tta_server", "--host", "127.0.0.1", "--port", str(http_port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rng = np.random.default_rng(0)
        batches = [
            rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8) for _ in range(args.requests)
        ]
        http = httpx.Client(base_url=url, timeout=60)
        for stream in ("bench-v1", "bench-http", "bench-grpc"):
            http.put(f"/v1/streams/{stream}", json={"strategy": args.strategy}).raise_for_status()
        th = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        tg = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def v1(x: np.ndarray) -> None:
            r = http.post(
                "/v1/streams/bench-v1/predict", content=npy(x), headers={"content-type": "application/x-npy"}
            )
            r.raise_for_status()

        def triton(client: object, mod: object, stream: str) -> Callable[[np.ndarray], None]:
            def send(x: np.ndarray) -> None:
                inp = mod.InferInput("images", list(x.shape), "UINT8")  # type: ignore[attr-defined]
                inp.set_data_from_numpy(x)
                client.infer(MODEL, [inp], sequence_id=stream).as_numpy("probabilities")  # type: ignore[attr-defined]

            return send

        rows = [
            ("/v1 predict (npy, httpx)", v1),
            ("/v2 infer (tritonclient HTTP, binary)", triton(th, thttp, "bench-http")),
            ("gRPC ModelInfer (tritonclient gRPC)", triton(tg, tgrpc, "bench-grpc")),
        ]
        print(f"{args.requests} requests x {args.batch} images, strategy {args.strategy}, one client")
        print(f"{'protocol':40s} {'images/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s}")
        figures = measure([send for _, send in rows], batches, args.warmup)
        for (name, _), (ips, p50, p95) in zip(rows, figures, strict=True):
            print(f"{name:40s} {ips:9.1f} {p50:8.1f} {p95:8.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
