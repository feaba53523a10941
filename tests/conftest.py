"""Shared fixtures and helpers: a tiny seeded BatchNorm CNN, the real CIFAR-10 WRN-40-2 model, Redis checks."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapters.base import ModelHandle
from adapters.models import ModelSpec, build_handle
from adapters.models.wide_resnet import WideResNet
from tta_bench.paths import CIFAR10_DIR, MODELS_CONFIG, REPO_ROOT, SHARED_DIR

REPO = REPO_ROOT
MODELS_YAML = MODELS_CONFIG
CIFAR_WEIGHTS = SHARED_DIR / "models" / "cifar10_wrn40_2.pt"
CIFAR_TRAIN = CIFAR10_DIR / "train_jpeg.npz"
CIFAR_TEST = CIFAR10_DIR / "test_jpeg.npz"

TINY_SIZE = 16


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def redis_reachable(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return True
    except redis.RedisError:
        return False


@contextlib.contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    """A real Redis database, flushed before and after; never skipped under CI=true."""
    import redis

    require_redis(url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextlib.contextmanager
def app_clients(pool: Any, models_yaml: Path, **defaults: Any) -> Iterator[Callable[..., Any]]:
    """A factory of TestClients (lifespan entered) over one loaded model pool; all closed on exit."""
    from fastapi.testclient import TestClient

    from tta_server.app import create_app
    from tta_server.settings import Settings

    opened: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        settings = Settings(models_config=models_yaml, **(defaults | overrides))
        client = TestClient(create_app(settings, pool=pool), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    try:
        yield factory
    finally:
        for c in opened:
            c.__exit__(None, None, None)


def require_redis(url: str) -> None:
    """Skip without Redis on a developer machine; under CI=true a missing Redis is a failure."""
    if redis_reachable(url):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Redis is required when CI=true but {url} is unreachable")
    pytest.skip(f"no Redis at {url}")


def _tiny_network() -> WideResNet:
    """WRN-10-1 with random BN affine parameters, non-trivial running statistics and varied predictions."""
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: one thread is fastest and avoids oversubscription
    try:
        return _fill_tiny_network(gen)
    finally:
        torch.set_num_threads(threads)


def _fill_tiny_network(gen: torch.Generator) -> WideResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = WideResNet(depth=10, widen_factor=1, num_classes=10)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
            bn.momentum = 0.3
        # Running statistics from a "source" distribution unlike the test batches.
        net.train()
        for _ in range(8):
            net(0.5 * torch.rand(32, 3, TINY_SIZE, TINY_SIZE, generator=gen) + 0.1)
        net.eval()
        # Centre and scale the classifier on source features so predictions vary between samples.
        features: list[torch.Tensor] = []
        hook = net.fc.register_forward_pre_hook(lambda _, args: features.append(args[0]))
        net(0.5 * torch.rand(64, 3, TINY_SIZE, TINY_SIZE, generator=gen) + 0.1)
        hook.remove()
        net.fc.weight.div_(features[0].std(0).mean())
        net.fc.bias.copy_(-net.fc.weight @ features[0].mean(0))
    return net


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """A saved tiny model (WRN-10-1, 16x16 inputs) with 64 uint8 'source' images next to it."""
    folder = tmp_path_factory.mktemp("tiny_model")
    weights = folder / "tiny.pt"
    torch.save(_tiny_network().state_dict(), weights)
    rng = np.random.default_rng(0)
    source = folder / "tiny_source.npy"
    np.save(source, rng.integers(25, 153, size=(64, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    return ModelSpec(
        id="tiny",
        arch="wide_resnet",
        depth=10,
        widen_factor=1,
        num_classes=10,
        weights=weights,
        input_size=(TINY_SIZE, TINY_SIZE),
        source_data=source,
    )


@pytest.fixture
def tiny_handle(tiny_spec: ModelSpec) -> ModelHandle:
    """A fresh handle of the tiny model (7 BN layers, 10 classes), with source images for EATA's Fisher."""
    return build_handle(tiny_spec)


@pytest.fixture(scope="session")
def cifar_handle() -> ModelHandle:
    """The shared CIFAR-10 WRN-40-2 checkpoint as a served model."""
    if not CIFAR_WEIGHTS.is_file():
        pytest.skip(f"shared checkpoint not found at {CIFAR_WEIGHTS}")
    spec = ModelSpec(
        id="cifar10_wrn40_2",
        arch="wide_resnet",
        depth=40,
        widen_factor=2,
        num_classes=10,
        weights=CIFAR_WEIGHTS,
        source_data=CIFAR_TRAIN,
    )
    return build_handle(spec)


# ------------------------------------------------------------ served-model fixtures (server suites)
@pytest.fixture(scope="session")
def pool() -> Any:
    """The shipped models.yaml loaded once, on the CPU, shared by every app a test builds."""
    from tta_server.model_pool import ModelPool

    return ModelPool.load(MODELS_YAML, torch.device("cpu"))


@pytest.fixture
def suite_redis_url() -> str:
    """The Redis database of a test suite; suites that share the server override it with their own."""
    return os.environ.get("TTA_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture
def redis_url(suite_redis_url: str) -> Iterator[str]:
    """The suite's real Redis database, flushed before and after the test. Never skipped under CI=true."""
    with flushed_redis(suite_redis_url) as url:
        yield url


@pytest.fixture
def client_settings() -> dict[str, Any]:
    """Settings every `make_client` app of a suite starts from (tests add their own overrides)."""
    return {}


@pytest.fixture
def make_client(pool: Any, client_settings: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """TestClients over the shared model with settings overrides (lifespan entered); closed at teardown."""
    with app_clients(pool, MODELS_YAML, **client_settings) as factory:
        yield factory
