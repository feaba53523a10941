"""A real server for the Open Inference Protocol tests: `python -m tta_server` in a subprocess, HTTP and
gRPC on free loopback ports, shared by the suite's modules (one model load).

A subprocess, not a thread: the clients under test (tritonclient) register their own copy of the
protocol's `inference.*` protobuf messages in this process, where the server's would collide with them.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import MODELS_YAML, REPO

MODEL = "cifar10_wrn40_2"


@dataclass(frozen=True)
class OipServer:
    http_url: str  # http://127.0.0.1:port
    http_host: str  # 127.0.0.1:port (tritonclient's form)
    grpc_host: str  # 127.0.0.1:port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _coverage_run() -> list[str]:
    """When this run measures coverage (scripts/test), the server measures itself too: a parallel data
    file beside this process's, which pytest-cov combines at the end (the gRPC service runs only there)."""
    import coverage

    cov = coverage.Coverage.current()
    if cov is None:
        return []
    data_file = str(Path(cov.config.data_file).resolve())
    return ["-m", "coverage", "run", "--parallel-mode", f"--data-file={data_file}", "--source=tta_server"]


@contextlib.contextmanager
def spawn_server(log: Path, **env_overrides: str) -> Iterator[OipServer]:
    """`python -m tta_server` with HTTP and gRPC on free loopback ports, until ready; stopped on exit."""
    http_port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    env |= {"TTA_GRPC_PORT": str(grpc_port), "TTA_LOG_LEVEL": "WARNING", "TTA_TORCH_THREADS": "1"}
    env |= {"TTA_DEVICE": "cpu", **env_overrides}
    cmd = [
        sys.executable,
        *_coverage_run(),
        "-m",
        "tta_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
    ]
    cmd += ["--config", str(MODELS_YAML)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 180 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield OipServer(url, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        # SIGINT, not SIGTERM: uvicorn re-raises the signal after its shutdown, and a KeyboardInterrupt
        # still runs the exit handlers (the coverage data of _coverage_run is saved).
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def oip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OipServer]:
    """The suite's server: no API keys, in-process state store."""
    with spawn_server(tmp_path_factory.mktemp("oip_server") / "server.log") as server:
        yield server


def images(n: int = 8, seed: int = 0) -> np.ndarray:
    """n random 32x32 RGB uint8 images (NHWC)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def jpegs(arr: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def put_policy(server: OipServer, stream: str, strategy: str, **config: object) -> dict[str, object]:
    r = httpx.put(f"{server.http_url}/v1/streams/{stream}", json={"strategy": strategy, "config": config})
    assert r.status_code == 200, r.text
    return dict(r.json())


def read_stream(server: OipServer, stream: str) -> dict[str, object]:
    r = httpx.get(f"{server.http_url}/v1/streams/{stream}")
    assert r.status_code == 200, r.text
    return dict(r.json())
