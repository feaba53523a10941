"""Shared fixtures and helpers: a tiny seeded BatchNorm CNN, the real CIFAR-10 WRN-40-2 model, and the suite's
own redis-server.

Redis: the session starts, once each and only when a test needs it, a redis-server (`redis_server`), a
Redis Cluster of 3 primaries and 3 replicas (`redis_cluster`) and a Sentinel setup (`redis_sentinel`: a
primary, a replica, 3 sentinels), all on free loopback ports. Every test that takes `redis_url` runs once
against each kind (`redis_kind`: standalone, cluster, sentinel) and gets that store empty: its suite's
database of the standalone server or the Sentinel primary, flushed before and after; under Cluster (one
database only) the cluster's primaries, flushed before and after. Tests run one at a time, and every
server flushed is one the session started. Tests that kill or stop a server get one of their own
(`private_redis`). No test connects to a Redis it did not start. Without the `redis-server` binary those
tests are skipped on a developer machine and fail under CI=true; every test that needs it is marked `redis`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from adapters.base import ModelHandle
from adapters.models import ModelSpec, build_handle
from adapters.models.wide_resnet import WideResNet
from tta_bench.paths import MODELS_CONFIG, REPO_DATA_DIR, REPO_ROOT
from tta_bench.redis_server import (
    PrivateCluster,
    PrivateRedis,
    PrivateSentinel,
    redis_cli_binary,
    redis_server_binary,
    sync_client,
)

if TYPE_CHECKING:
    import redis

REPO = REPO_ROOT
MODELS_YAML = MODELS_CONFIG
# The suite runs on what the checkout ships (models/, data/cifar10/), never on ../shared: a clone tests alone
# and every run sees the same images. Benches the tests start read $TTA_DATA_DIR, so it names the subsets.
CIFAR_WEIGHTS = REPO_ROOT / "models" / "cifar10_wrn40_2.safetensors"
CIFAR_TRAIN = REPO_DATA_DIR / "train_jpeg.npz"
CIFAR_TEST = REPO_DATA_DIR / "test_jpeg.npz"
os.environ["TTA_DATA_DIR"] = str(REPO_DATA_DIR)

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


def store_client(url: str) -> Any:
    """A synchronous client of the store behind `url` (any of the three kinds) to inspect or damage it."""
    return sync_client(url)


def stored_keys(r: Any, pattern: str) -> set[str]:
    """The names of the keys that match `pattern` (on every primary of a cluster)."""
    from redis.cluster import RedisCluster

    keys = (
        r.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        if isinstance(r, RedisCluster)
        else r.keys(pattern)
    )
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


def require_redis_server(*, cli: bool = False) -> None:
    """Skip without the redis-server binary (and, with `cli`, redis-cli) on a developer machine; under
    CI=true their absence is a failure."""
    if redis_server_binary() is not None and (not cli or redis_cli_binary() is not None):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server is required when CI=true (Debian: apt-get install redis-server)")
    pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")


def require_timm() -> None:
    """Skip without timm (the server's optional `timm` extra) on a developer machine; `scripts/install`
    installs it, so under CI=true its absence is a failure."""
    if importlib.util.find_spec("timm") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("timm is required when CI=true: pip install -e '.[timm]' (scripts/install does)")
    pytest.skip("timm not installed (pip install -e '.[timm]')")


#: Fixtures that start (or use) a redis-server: a test that requests one is marked `redis`.
REDIS_FIXTURES = frozenset(
    {"redis_server", "redis_url", "private_redis", "redis_cluster", "redis_sentinel", "redis_kind"}
)
#: The kinds of store every `redis_url` test runs against.
REDIS_KINDS = ("standalone", "cluster", "sentinel")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" in metafunc.fixturenames and not any(
        "redis_kind" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize("redis_kind", REDIS_KINDS)


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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateCluster]:
    """The suite's Redis Cluster (3 primaries, 3 replicas): started once, removed at the end."""
    require_redis_server(cli=True)
    with PrivateCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[PrivateSentinel]:
    """The suite's Sentinel setup (a primary, a replica, 3 sentinels): started once, removed at the end."""
    require_redis_server()
    with PrivateSentinel(replicas=1) as setup:
        yield setup


@pytest.fixture
def redis_kind() -> str:
    """The kind of store of `redis_url` (tests taking `redis_url` are parametrised over REDIS_KINDS)."""
    return "standalone"


@pytest.fixture
def suite_redis_db() -> int:
    """The database of `redis_server` a test suite uses; suites override it with their own."""
    return 1


def fresh_store_url(request: pytest.FixtureRequest, kind: str, db: int = 1) -> Generator[str, None, None]:
    """The URL of an empty store of `kind` (our own servers), emptied again when the generator closes."""
    if kind == "cluster":
        cluster: PrivateCluster = request.getfixturevalue("redis_cluster")
        url, flush = cluster.url, cluster.flush
    elif kind == "sentinel":
        setup: PrivateSentinel = request.getfixturevalue("redis_sentinel")
        url = setup.url_for(db)
    else:
        server: PrivateRedis = request.getfixturevalue("redis_server")
        url = server.url_for(db)
    if kind != "cluster":

        def flush() -> None:
            client = sync_client(url)
            try:
                client.flushdb()
            finally:
                client.close()

    flush()
    try:
        yield url
    finally:
        flush()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_kind: str, suite_redis_db: int) -> Iterator[str]:
    """An empty store of kind `redis_kind` (see the module docstring), emptied again after the test."""
    yield from fresh_store_url(request, redis_kind, suite_redis_db)


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
    """The shipped CIFAR-10 WRN-40-2 checkpoint as a served model."""
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
