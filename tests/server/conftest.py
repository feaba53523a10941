"""Fixtures for server tests: the real model loaded once, app factories, a real Redis database."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import app_clients, flushed_redis
from tta_server.app import create_app
from tta_server.model_pool import ModelPool
from tta_server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODELS_YAML = REPO / "models.yaml"
TEST_NPZ = REPO.parent / "shared" / "data" / "cifar10" / "test_jpeg.npz"
REDIS_URL = os.environ.get("TTA_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture(scope="session")
def pool() -> ModelPool:
    return ModelPool.load(MODELS_YAML, torch.device("cpu"))


@pytest.fixture(scope="session")
def cifar_jpegs() -> tuple[list[bytes], np.ndarray]:
    """200 CIFAR-10 test JPEGs spread over all classes (the file is ordered by class)."""
    d = np.load(TEST_NPZ)
    idx = np.random.default_rng(0).permutation(len(d["labels"]))[:200]
    jpegs = [d["jpeg"][d["offsets"][i] : d["offsets"][i + 1]].tobytes() for i in idx]
    return jpegs, d["labels"][idx].astype(np.int64)


@pytest.fixture(scope="session")
def cifar_array(cifar_jpegs: tuple[list[bytes], np.ndarray]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in cifar_jpegs[0]])


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed, real Redis database. Never skipped under CI=true."""
    with flushed_redis(REDIS_URL) as url:
        yield url


@pytest.fixture
def make_client(pool: ModelPool) -> Iterator[Callable[..., TestClient]]:
    """TestClients over the shared model with settings overrides (lifespan entered); closed at teardown."""
    with app_clients(pool, MODELS_YAML) as factory:
        yield factory


@pytest.fixture
def live_server(pool: ModelPool) -> Iterator[Callable[..., str]]:
    """Start real uvicorn servers on free loopback ports (threads); returns their base URL."""
    import socket
    import threading
    import time

    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: object) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = Settings(models_config=MODELS_YAML, **overrides)  # type: ignore[arg-type]
        config = uvicorn.Config(
            create_app(settings, pool=pool), host="127.0.0.1", port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
