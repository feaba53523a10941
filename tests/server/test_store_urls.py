"""`TTA_REDIS_URL` for the three kinds of store, and the commit WAIT knob."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from tta_server.settings import Settings
from tta_server.state_store import RedisStateStore, parse_store_url


def test_the_three_url_forms_parse() -> None:
    assert parse_store_url("redis://127.0.0.1:6390/3").kind == "standalone"
    c = parse_store_url("redis+cluster://u:p%40ss@10.0.0.1:7000, 10.0.0.2:7001")
    assert (c.kind, c.nodes, c.username, c.password) == (
        "cluster",
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        "u",
        "p@ss",
    )
    s = parse_store_url("redis+sentinel://secret@s1:26379,s2:26379/mymaster/4")
    assert (s.kind, s.nodes, s.service, s.db, s.password) == (
        "sentinel",
        (("s1", 26379), ("s2", 26379)),
        "mymaster",
        4,
        "secret",
    )
    assert parse_store_url("redis+sentinel://s1:26379/tta").db == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:6379", "no scheme"),
        ("http://h:1/0", "not one of"),
        ("redis+cluster://h:1/2", "database 0 only"),
        ("redis+cluster://h", "not host:port"),
        ("redis+cluster://h:1,:2", "not host:port"),
        ("redis+sentinel://h:26379", "service name"),
        ("redis+sentinel://h:26379/tta/x", "not a number"),
        ("redis+cluster://h:99999", "not host:port"),
        ("redis://h:1/x", "not a number"),
        ("redis://h:notaport/0", "Port could not be cast"),
    ],
)
def test_a_bad_url_is_a_settings_error_at_start(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(redis_url=url)


@pytest.mark.redis
def test_wait_holds_a_commit_until_its_replicas_have_it_and_counts_shortfalls(redis_sentinel) -> None:
    async def scenario(replicas: int) -> tuple[int, int]:
        store = RedisStateStore(
            redis_sentinel.url_for(5), 60, 2.0, wait_replicas=replicas, wait_timeout_ms=200
        )
        try:
            assert await store.replace("ns", f"s{replicas}", "inc", b"{}")
            version = await store.cas("ns", f"s{replicas}", "inc", 0, b"blob", b"{}", b"{}", 0.1)
            return version, store.wait_shortfalls
        finally:
            await store.close()

    try:
        assert asyncio.run(scenario(1)) == (1, 0)  # the setup's one replica acknowledges
        # More replicas than there are: the commit stands on the primary and both writes are counted short.
        assert asyncio.run(scenario(3)) == (1, 2)
    finally:
        import redis

        primary = redis_sentinel.current_primary()
        client = redis.Redis(host="127.0.0.1", port=primary.port, db=5)
        client.flushdb()
        client.close()
