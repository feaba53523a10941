"""The private redis-server helper every test and bench uses."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import require_redis_server
from tta_bench.redis_server import PrivateRedis


@pytest.mark.redis
def test_a_private_server_listens_on_loopback_only_and_leaves_nothing_behind() -> None:
    require_redis_server()
    with PrivateRedis(appendonly=False) as server:
        assert server.url.startswith("redis://127.0.0.1:") and server.url.endswith("/0")
        assert server.port != 6379
        client = redis.Redis.from_url(server.url_for(3))
        client.set("k", "v")
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
        folder = server.dir
    assert server.proc is None and not folder.exists()


@pytest.mark.redis
def test_a_killed_server_restarts_on_its_port_with_its_data() -> None:
    require_redis_server()
    with PrivateRedis() as server:
        redis.Redis.from_url(server.url).set("kept", "1")
        port = server.port
        server.kill()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
        server.start()
        assert server.port == port
        assert redis.Redis.from_url(server.url).get("kept") == b"1"


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tta_bench.redis_server.redis_server_binary", lambda: None)
    server = PrivateRedis()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
            server.start()
    finally:
        server.close()
