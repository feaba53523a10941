"""Fixtures for the reliability suite: one loaded model shared by every app, a flushed Redis database,
private redis-server processes that tests may stop and restart, and payload helpers."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from tta_server.app import create_app
from tta_server.model_pool import ModelPool
from tta_server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODELS_YAML = REPO / "models.yaml"
# A database of its own: other suites use other numbers on the same server.
REDIS_URL = os.environ.get("TTA_RELIABILITY_REDIS_URL", "redis://127.0.0.1:6379/13")
NPY = {"content-type": "application/x-npy"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def batch(n: int = 8, seed: int = 0) -> np.ndarray:
    """n random 32x32 RGB uint8 images (NHWC)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def redis_reachable(url: str = REDIS_URL) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return True
    except redis.RedisError:
        return False


def require_redis(url: str = REDIS_URL) -> None:
    """Skip without Redis on a developer machine; under CI=true a missing Redis is a failure."""
    if redis_reachable(url):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Redis is required when CI=true but {url} is unreachable")
    pytest.skip(f"no Redis at {url}")


@pytest.fixture(scope="session")
def pool() -> ModelPool:
    return ModelPool.load(MODELS_YAML, torch.device("cpu"))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared server's reliability database, flushed before and after the test."""
    require_redis()
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def make_client(pool: ModelPool) -> Iterator[Callable[..., TestClient]]:
    """TestClients over the shared model with settings overrides (lifespan entered); closed at teardown."""
    opened: list[TestClient] = []

    def factory(**overrides: object) -> TestClient:
        overrides.setdefault("log_level", "WARNING")
        settings = Settings(models_config=MODELS_YAML, **overrides)  # type: ignore[arg-type]
        client = TestClient(create_app(settings, pool=pool), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield factory
    for c in opened:
        c.__exit__(None, None, None)


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port; stop() (SIGKILL) and start() keep its
    data: the append-only file is written before each reply, so a restart is a crash-and-recover."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tta-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if redis_reachable(self.url):
                return
            time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGKILL: the server dies mid-whatever, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required when CI=true")
        pytest.skip("redis-server not installed")
    server = PrivateRedis()
    server.start()
    yield server
    server.close()
