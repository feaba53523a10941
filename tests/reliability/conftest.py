"""Fixtures for the reliability suite: its own database of the suite's redis-server and app log level (the
model pool, app factories and redis-servers come from tests/conftest.py), and payload helpers."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

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
def suite_redis_db() -> int:
    return 2  # other suites use other databases of the same (private) server


@pytest.fixture
def client_settings() -> dict[str, Any]:
    return {"log_level": "WARNING"}


def predict(client: Any, stream: str, n: int = 8, seed: int = 0, **params: Any) -> Any:
    """An npy predict of n random images on `stream` through a TestClient (or httpx client)."""
    from tests.conftest import npy_bytes

    return client.post(
        f"/v1/streams/{stream}/predict", params=params, content=npy_bytes(batch(n, seed)), headers=NPY
    )


def metric_value(client: Any, name: str, **labels: str) -> float:
    """Sum of a metric's samples (matching `labels`) on the client's /metrics page."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
