"""Shared fixtures and helpers: a tiny seeded BatchNorm CNN, the real CIFAR-10 WRN-40-2 model, and the suite's
own redis-server.

Redis: the session starts one redis-server on a free loopback port (`redis_server`); tests flush databases
of that server only (`redis_url`). Tests that kill or stop a server get one of their own (`private_redis`).
No test connects to a Redis it did not start. Without the `redis-server` binary those tests are skipped on a
developer machine and fail under CI=true; every test that needs it is marked `redis`.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from adapters.base import ModelHandle
from adapters.models import ModelSpec, build_handle
from adapters.models.wide_resnet import WideResNet
from tta_bench.paths import CIFAR10_DIR, MODELS_CONFIG, REPO_ROOT, SHARED_DIR
from tta_bench.redis_server import PrivateRedis, redis_server_binary

if TYPE_CHECKING:
    import redis

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


def stored_field(r: redis.Redis, key: str, field: str) -> bytes:
    """A hash field as the server stored it (a client without decode_responses answers bytes)."""
    value = r.hget(key, field)
    assert isinstance(value, bytes), (key, field, value)
    return value


def stored_keys(r: redis.Redis, pattern: str) -> set[str]:
    """The names of the keys that match `pattern`."""
    keys = r.keys(pattern)
    assert isinstance(keys, list)
    names = set()
    for k in keys:
        assert isinstance(k, bytes), k
        names.add(k.decode())
    return names


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


def require_redis_server() -> None:
    """Skip without the redis-server binary on a developer machine; under CI=true its absence is a failure."""
    if redis_server_binary() is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server is required when CI=true (Debian: apt-get install redis-server)")
    pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")


#: Fixtures that start (or use) a redis-server: a test that requests one is marked `redis`.
REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "private_redis"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    """The suite's redis-server: started once, on 127.0.0.1 and a free port, removed at the end."""
    require_redis_server()
    with PrivateRedis(appendonly=False) as server:
        yield server


@pytest.fixture
def suite_redis_db() -> int:
    """The database of `redis_server` a test suite uses; suites override it with their own."""
    return 1


@pytest.fixture
def redis_url(redis_server: PrivateRedis, suite_redis_db: int) -> Iterator[str]:
    """A database of the suite's own redis-server, flushed before and after the test."""
    import redis

    url = redis_server.url_for(suite_redis_db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own that it may SIGKILL (`stop`), SIGSTOP and restart (`start`, same port,
    append-only file replayed)."""
    require_redis_server()
    with PrivateRedis(appendonly=True) as server:
        yield server


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
def client_settings() -> dict[str, Any]:
    """Settings every `make_client` app of a suite starts from (tests add their own overrides)."""
    return {}


@pytest.fixture
def make_client(pool: Any, client_settings: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """TestClients over the shared model with settings overrides (lifespan entered); closed at teardown."""
    with app_clients(pool, MODELS_YAML, **client_settings) as factory:
        yield factory
