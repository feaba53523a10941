"""Fixtures for server tests: CIFAR-10 test images and live uvicorn servers (the model pool, app
factories and the Redis database come from tests/conftest.py)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tests.conftest import CIFAR_TEST, MODELS_YAML
from tta_server.app import create_app
from tta_server.model_pool import ModelPool
from tta_server.settings import Settings


@pytest.fixture(scope="session")
def cifar_jpegs() -> tuple[list[bytes], np.ndarray]:
    """200 CIFAR-10 test JPEGs spread over all classes (the file is ordered by class)."""
    d = np.load(CIFAR_TEST)
    idx = np.random.default_rng(0).permutation(len(d["labels"]))[:200]
    jpegs = [d["jpeg"][d["offsets"][i] : d["offsets"][i + 1]].tobytes() for i in idx]
    return jpegs, d["labels"][idx].astype(np.int64)


@pytest.fixture(scope="session")
def cifar_array(cifar_jpegs: tuple[list[bytes], np.ndarray]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in cifar_jpegs[0]])


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
