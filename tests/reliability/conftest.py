"""Fixtures for the reliability suite: its own Redis database and app log level (the model pool and app
factories come from tests/conftest.py), private redis-server processes that tests may stop and restart,
and payload helpers."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tta_bench.soak import PrivateRedis

# A database of its own: other suites use other numbers on the same server.
REDIS_URL = os.environ.get("TTA_RELIABILITY_REDIS_URL", "redis://127.0.0.1:6379/13")
NPY = {"content-type": "application/x-npy"}


def batch(n: int = 8, seed: int = 0) -> np.ndarray:
    """n random 32x32 RGB uint8 images (NHWC)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def suite_redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def client_settings() -> dict[str, Any]:
    return {"log_level": "WARNING"}


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required when CI=true")
        pytest.skip("redis-server not installed")
    # The soak bench's own server: stop() is a SIGKILL, start() restarts it on its append-only file.
    server = PrivateRedis()
    server.start()
    yield server
    server.close()
