"""Stream identity and loss visibility with two app instances on one real Redis: caches after a delete on
the other replica, deletes/resets/policy changes racing in-flight predicts, eviction, expiry, a full store,
corrupt records of every kind, and policies that could never run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import torch

from tests.conftest import MODELS_YAML, REDIS_KINDS, app_clients, fresh_store_url, store_client, stored_field
from tests.reliability.conftest import metric_value, predict
from tta_server.state_store import policy_key, state_key

pytestmark = pytest.mark.redis


def _probs(resp: Any) -> list[float]:
    return [p["top_k"][0]["probability"] for p in resp.json()["predictions"]]


@contextmanager
def _held_step(client: Any) -> Iterator[tuple[threading.Event, threading.Event]]:
    """While inside, the replica's next step waits (after its compute) until the yielded event is set, so
    another replica can act while that predict is in flight. Yields (started, release)."""
    engine = client.app.state.engine
    real = engine._compute
    started, release = threading.Event(), threading.Event()

    async def held(*args: Any) -> Any:
        out = await real(*args)
        started.set()
        await asyncio.to_thread(release.wait, 30)
        return out

    engine._compute = held
    try:
        yield started, release
    finally:
        release.set()
        engine._compute = real


def _in_flight(client: Any, stream: str, results: list[Any], **params: Any) -> threading.Thread:
    t = threading.Thread(target=lambda: results.append(predict(client, stream, seed=7, **params)))
    t.start()
    return t


# ------------------------------------------------------------------ stale caches (observation 1)
@pytest.mark.parametrize("second_strategy", ["tent", "norm"])
def test_a_replica_never_answers_from_an_old_incarnations_cache(
    make_client, redis_url, second_strategy
) -> None:
    a, b = make_client(redis_url=redis_url), make_client(redis_url=redis_url)
    a.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(5):
        assert predict(a, "cam", seed=i).json()["version"] == i + 1  # A caches version 5
    assert b.delete("/v1/streams/cam").status_code == 204
    b.put("/v1/streams/cam", json={"strategy": second_strategy})
    for i in range(5):
        assert predict(b, "cam", seed=10 + i).json()["version"] == i + 1  # version 5 again, new incarnation
    ra, rb = predict(a, "cam", seed=99, adapt="false"), predict(b, "cam", seed=99, adapt="false")
    assert ra.status_code == rb.status_code == 200, ra.text
    assert (
        (ra.json()["version"], ra.json()["strategy"])
        == (rb.json()["version"], second_strategy)
        == (5, second_strategy)
    )
    assert ra.json()["incarnation"] == rb.json()["incarnation"]
    assert _probs(ra) == pytest.approx(_probs(rb), abs=1e-6)
    # A's next adapting step builds on B's state, not on its cached one.
    r = predict(a, "cam", seed=100)
    assert r.status_code == 200 and r.json()["adapted"] and r.json()["version"] == 6
    assert b.get("/v1/streams/cam").json()["steps"] == 6


def test_a_restarted_version_sequence_is_never_mistaken_for_the_cached_one(make_client, redis_url) -> None:
    """A Redis that lost everything (restart without persistence): the same version numbers come back,
    under another incarnation, and A's cache is not used."""
    a = make_client(redis_url=redis_url)
    a.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(3):
        predict(a, "cam", seed=i)
    store_client(redis_url).flushdb()  # our own servers (the test database; a whole cluster of ours)
    b = make_client(redis_url=redis_url)
    b.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(3):
        predict(b, "cam", seed=20 + i)
    ra, rb = predict(a, "cam", seed=5, adapt="false"), predict(b, "cam", seed=5, adapt="false")
    assert ra.json()["version"] == rb.json()["version"] == 3
    assert _probs(ra) == pytest.approx(_probs(rb), abs=1e-6)


# ------------------------------------------------------------------ races with in-flight predicts (2)
@pytest.mark.parametrize("action", ["delete", "put", "reset"])
def test_a_commit_racing_delete_put_or_reset_is_discarded_and_says_so(make_client, redis_url, action) -> None:
    a, b = make_client(redis_url=redis_url), make_client(redis_url=redis_url)
    a.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(a, "cam").json()["version"] == 1
    results: list[Any] = []
    with _held_step(a) as (started, release):
        t = _in_flight(a, "cam", results)
        assert started.wait(60)
        if action == "delete":
            assert b.delete("/v1/streams/cam").status_code == 204
        elif action == "put":
            assert b.put("/v1/streams/cam", json={"strategy": "norm"}).status_code == 200
        else:
            assert b.post("/v1/streams/cam/reset").status_code == 200
        release.set()
        t.join(60)
    body = results[0].json()
    assert results[0].status_code == 200, body
    assert body["adapted"] is False and body["not_adapted"] == "stream_replaced"
    assert metric_value(a, "tta_updates_discarded_total", reason="stream_replaced") == 1
    if action == "delete":
        assert b.get("/v1/streams/cam").status_code == 404  # no orphan state came back
        r = predict(b, "cam").json()
        assert (r["created"], r["version"], r["adapted"]) == (True, 1, True)
    else:
        view = b.get("/v1/streams/cam").json()
        assert (view["version"], view["steps"]) == (0, 0)
        assert view["strategy"] == ("norm" if action == "put" else "tent")
        assert predict(a, "cam").json()["version"] == 1


def test_requests_queued_behind_a_put_never_answer_adapted(make_client, redis_url) -> None:
    a, b = make_client(redis_url=redis_url), make_client(redis_url=redis_url)
    a.put("/v1/streams/cam", json={"strategy": "alpha_bn"})
    results: list[Any] = []
    with _held_step(a) as (started, release):
        threads = [_in_flight(a, "cam", results)]
        assert started.wait(60)
        threads += [_in_flight(a, "cam", results) for _ in range(4)]  # queued behind the held step
        time.sleep(0.5)
        b.put("/v1/streams/cam", json={"strategy": "norm"})
        release.set()
        for t in threads:
            t.join(60)
    stream = b.get("/v1/streams/cam").json()
    answered_adapted = [r.json() for r in results if r.json()["adapted"]]
    # Whatever adapted was acknowledged is in the store under the new policy; nothing else is.
    assert all(r["strategy"] == "norm" for r in answered_adapted)
    assert stream["steps"] == stream["version"] == len({r["version"] for r in answered_adapted})


def test_put_then_delete_then_recreate_never_brings_an_old_state_back(make_client, redis_url) -> None:
    a, b = make_client(redis_url=redis_url), make_client(redis_url=redis_url)
    a.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(3):
        predict(a, "cam", seed=i)
    b.put("/v1/streams/cam", json={"strategy": "norm"})
    b.delete("/v1/streams/cam")
    a.put("/v1/streams/cam", json={"strategy": "tent"})
    for client in (a, b):
        view = client.get("/v1/streams/cam").json()
        assert (view["version"], view["steps"], view["strategy"]) == (0, 0, "tent")
    assert predict(b, "cam").json()["version"] == 1


# ------------------------------------------------------------------ loss is visible (3)
def test_a_vanished_state_is_reported_and_keeps_the_policy(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(3):
        predict(client, "cam", seed=i)
    store_client(redis_url).delete(state_key("default", "cam"))  # as an eviction would
    r = predict(client, "cam", seed=9).json()
    assert (r["lost"], r["created"], r["strategy"], r["version"]) == ("state", False, "tent", 1)
    assert metric_value(client, "tta_stream_events_total", event="lost_state") == 1
    r = predict(client, "cam", seed=10).json()
    assert (r["lost"], r["version"]) == (None, 2)  # reported once


def test_a_vanished_policy_is_restored_from_its_state(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent", "config": {"lr": 0.002}})
    for i in range(3):
        predict(client, "cam", seed=i)
    store_client(redis_url).delete(policy_key("default", "cam"))
    r = predict(client, "cam", seed=9).json()
    assert (r["lost"], r["created"], r["strategy"], r["version"], r["adapted"]) == (
        "policy",
        False,
        "tent",
        4,
        True,
    )
    view = client.get("/v1/streams/cam").json()
    assert view["config"]["lr"] == 0.002 and view["steps"] == 4
    assert metric_value(client, "tta_stream_events_total", event="lost_policy") == 1


def test_unconfigured_streams_are_told_apart_and_can_be_refused(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url)
    r = predict(client, "new").json()
    assert r["created"] is True and r["strategy"] == "alpha_bn"
    assert predict(client, "new").json()["created"] is False
    assert client.get("/v1/streams/new").json()["origin"] == "implicit"
    assert metric_value(client, "tta_stream_events_total", event="created_implicit") == 1
    strict = make_client(redis_url=redis_url, require_configured_streams=True)
    r = predict(strict, "other")
    assert r.status_code == 404 and r.json()["error_type"] == "unknown_stream"
    assert predict(strict, "new").status_code == 200  # configured (implicitly, earlier) streams still serve


def test_eviction_under_allkeys_lru_is_never_silent(make_client, private_redis) -> None:
    """A Redis far too small for its streams, evicting: every answer that lost something says so."""
    r = redis.Redis.from_url(private_redis.url)
    r.config_set("maxmemory", "3mb")
    r.config_set("maxmemory-policy", "allkeys-lru")
    client = make_client(redis_url=private_redis.url, state_cache_size=0)
    streams = [f"cam{i}" for i in range(20)]
    for s in streams:
        assert client.put(f"/v1/streams/{s}", json={"strategy": "tent"}).status_code == 200
    answers = []
    for rnd in range(3):
        for s in streams:
            resp = predict(client, s, seed=rnd)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
    flagged = [a for a in answers if a["created"] or a["lost"]]
    assert r.info("stats")["evicted_keys"] > 0  # the store really evicted
    assert flagged, "evictions happened but no answer reported a loss"
    # A stream never silently changes policy: the first answer under another policy is always flagged.
    for s in streams:
        mine = [a for a in answers if a["stream_id"] == s]
        first_changed = next((a for a in mine if a["strategy"] != "tent"), None)
        assert first_changed is None or first_changed["created"] or first_changed["lost"], mine
    events = sum(
        metric_value(client, "tta_stream_events_total", event=e)
        for e in ("lost_state", "lost_policy", "created_implicit")
    )
    assert events >= len(flagged)


@pytest.mark.parametrize(
    "store", ["memory", *(pytest.param(k, marks=pytest.mark.redis) for k in REDIS_KINDS)]
)
def test_reads_and_frozen_predicts_keep_a_stream_alive(make_client, store, request) -> None:
    urls = fresh_store_url(request, store, 2) if store != "memory" else None
    extra = {"redis_url": next(urls)} if urls else {}
    if urls is not None:
        request.addfinalizer(urls.close)
    client = make_client(state_ttl_seconds=2, **extra)
    client.put("/v1/streams/used", json={"strategy": "tent"})
    client.put("/v1/streams/idle", json={"strategy": "tent"})
    predict(client, "used")
    predict(client, "idle")
    for i in range(8):  # 4 s: twice the TTL
        time.sleep(0.5)
        if i % 2:
            assert predict(client, "used", adapt="false").json()["created"] is False
        else:
            assert client.get("/v1/streams/used").status_code == 200
    view = client.get("/v1/streams/used").json()
    assert (view["strategy"], view["origin"], view["version"]) == ("tent", "put", 1)
    assert client.get("/v1/streams/idle").status_code == 404  # expired: nobody used it


def test_a_full_store_answers_not_adapted_and_readiness_says_full(make_client, private_redis) -> None:
    r = redis.Redis.from_url(private_redis.url)
    client = make_client(redis_url=private_redis.url)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(client, "cam").json()["adapted"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(r.info("memory")["used_memory"] + 1024))  # no room for a new state
    resp = predict(client, "cam", seed=1)
    assert resp.status_code == 200, resp.text
    assert resp.json()["adapted"] is False and resp.json()["not_adapted"] == "store_unwritable"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "full"
    assert metric_value(client, "tta_state_store_writable") == 0
    assert predict(client, "cam", seed=2, adapt="false").status_code == 200  # reads still work
    r.config_set("maxmemory", "0")
    assert predict(client, "cam", seed=3).json()["version"] == 2  # nothing half-written in between
    assert client.get("/readyz").json()["store"] == "ok"


# ------------------------------------------------------------------ corrupt records (7)
CORRUPTIONS = {
    "meta-not-json": ("state", "meta", b"{nope"),
    "meta-a-list": ("state", "meta", b"[1, 2]"),
    "meta-missing": ("state", "meta", None),
    "version-not-a-number": ("state", "v", b"seven"),
    "version-negative": ("state", "v", b"-3"),
    "policy-version-not-a-number": ("policy", "v", b"x"),
    "policy-incarnation-mismatch": ("policy", "inc", b"0123"),
    "policy-seed-a-string": ("policy", "rec", None),
}


def _corrupt(r: redis.Redis, kind: str) -> None:
    which, field, value = CORRUPTIONS[kind]
    key = state_key("default", "cam") if which == "state" else policy_key("default", "cam")
    if kind == "policy-seed-a-string":
        import json

        rec = json.loads(stored_field(r, key, "rec"))
        rec["seed"] = "0"
        value = json.dumps(rec).encode()
    if value is None:
        r.hdel(key, field)
    else:
        r.hset(key, field, value)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_every_corrupt_record_is_409_and_reset_or_delete_repairs_it(make_client, redis_url, kind) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    client.put("/v1/streams/ok", json={"strategy": "tent"})
    predict(client, "cam")
    predict(client, "ok")
    r = store_client(redis_url)
    _corrupt(r, kind)
    for resp in (client.get("/v1/streams/cam"), predict(client, "cam", seed=1)):
        assert resp.status_code == 409 and resp.json()["error_type"] == "state_corrupt", resp.text
    board = client.get("/v1/drift/top")  # one corrupt stream does not break its namespace's board
    assert board.status_code == 200 and [s["stream_id"] for s in board.json()["streams"]] == ["ok"]
    reset = client.post("/v1/streams/cam/reset")
    assert reset.status_code == 200, reset.text
    assert (reset.json()["strategy"], reset.json()["version"]) == ("tent", 0)
    assert predict(client, "cam", seed=2).json()["version"] == 1
    _corrupt(r, kind)
    assert client.delete("/v1/streams/cam").status_code == 204
    assert client.get("/v1/streams/cam").status_code == 404


@pytest.mark.parametrize("which", ["state", "policy"])
def test_keys_of_the_wrong_type_are_409_and_delete_repairs_them(make_client, redis_url, which) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    predict(client, "cam")
    r = store_client(redis_url)
    key = state_key("default", "cam") if which == "state" else policy_key("default", "cam")
    r.delete(key)
    r.rpush(key, "x")
    for resp in (client.get("/v1/streams/cam"), predict(client, "cam", seed=1)):
        assert resp.status_code == 409 and resp.json()["error_type"] == "state_corrupt", resp.text
    if which == "state":  # the policy is readable: reset repairs
        assert client.post("/v1/streams/cam/reset").status_code == 200
        assert predict(client, "cam").json()["version"] == 1
        r.delete(key)
        r.rpush(key, "x")
    assert client.delete("/v1/streams/cam").status_code == 204
    assert predict(client, "cam").json()["created"] is True


def test_drift_board_drops_a_reset_stream(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url)
    for s in ("a", "b"):
        client.put(f"/v1/streams/{s}", json={"strategy": "norm"})
        predict(client, s, seed=ord(s))
    assert {s["stream_id"] for s in client.get("/v1/drift/top").json()["streams"]} == {"a", "b"}
    client.post("/v1/streams/a/reset")
    rows = client.get("/v1/drift/top").json()["streams"]
    assert [s["stream_id"] for s in rows] == ["b"] and rows[0]["drift"]["bn_distance"] is not None


# ------------------------------------------------------------------ policies that could never run
@pytest.mark.parametrize("strategy", ["eata", "unmix_tns+eata"])
def test_a_policy_that_needs_source_data_is_refused_at_put(tiny_spec, strategy) -> None:
    from adapters.models import build_handle
    from tta_server.model_pool import ModelPool

    spec = tiny_spec.model_copy(update={"source_data": None})
    pool = ModelPool({"tiny": build_handle(spec)}, {"tiny": spec}, "tiny")
    with app_clients(pool, MODELS_YAML) as factory:
        client = factory()
        r = client.put("/v1/streams/cam", json={"strategy": strategy})
        assert r.status_code == 422 and r.json()["error_type"] == "incompatible_model"
        assert "source_data" in r.json()["error"] and "eta" in r.json()["error"]
        ok = strategy.replace("eata", "eta")
        assert client.put("/v1/streams/cam", json={"strategy": ok}).status_code == 200
        assert client.get("/v1/streams/cam").json()["strategy"] == ok


# ------------------------------------------------------------------ deadlines and per-stream queues
class _Expired:
    def expired(self) -> bool:
        return True


def _engine(pool: Any, **overrides: Any) -> Any:
    from tta_server.engine import Engine
    from tta_server.metrics import Metrics
    from tta_server.settings import Settings
    from tta_server.state_store import InMemoryStateStore

    return Engine(Settings(models_config=MODELS_YAML, **overrides), pool, InMemoryStateStore(60), Metrics())


def test_expired_work_is_neither_computed_nor_committed(pool) -> None:
    from tta_server.errors import DeadlineExceededError

    engine = _engine(pool)
    calls = []
    real = engine._compute

    async def counting(*args: Any) -> Any:
        calls.append(1)
        return await real(*args)

    engine._compute = counting
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)

    async def scenario() -> int:
        await engine.put_policy("ns", "s", None, "tent", {}, 0)
        with pytest.raises(DeadlineExceededError):
            await engine.predict("ns", "s", x, True, deadline=_Expired())
        return (await engine.describe("ns", "s")).version

    try:
        assert asyncio.run(scenario()) == 0 and calls == []
    finally:
        engine.close()


def test_a_stream_with_a_full_queue_answers_overloaded(pool) -> None:
    from tta_server.errors import OverloadedError

    engine = _engine(pool, max_stream_queue=2)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)

    async def scenario() -> list[Any]:
        await engine.put_policy("ns", "s", None, "norm", {}, 0)
        async with engine.scheduler.locks.hold("ns/s"):  # the stream is busy
            tasks = [asyncio.create_task(engine.predict("ns", "s", x, True)) for _ in range(4)]
            for _ in range(20):
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outs = asyncio.run(scenario())
    finally:
        engine.close()
    refused = [o for o in outs if isinstance(o, OverloadedError)]
    assert len(refused) == 2 and refused[0].headers == {"Retry-After": "1"}
    assert all(not isinstance(o, BaseException) for o in outs if o not in refused)


def test_a_request_that_read_the_stream_before_a_reset_is_served_by_the_new_incarnation(pool) -> None:
    """Its state blob was skipped (the cache had it), and by its turn the cache holds the new incarnation:
    the request is served as one that arrived after the reset, never refused."""
    engine = _engine(pool)
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)

    async def scenario() -> tuple[Any, str]:
        await engine.put_policy("ns", "s", None, "tent", {}, 0)
        await engine.predict("ns", "s", x, True)
        before = await engine.resolve("ns", "s")
        assert before.state is not None and before.state.blob is None  # the device cache is current
        fresh = await engine.reset("ns", "s")
        await engine.predict("ns", "s", x, True)  # the cache now holds the new incarnation
        return await engine.predict("ns", "s", x, True, before), fresh.incarnation

    try:
        out, incarnation = asyncio.run(scenario())
    finally:
        engine.close()
    assert (out.policy.incarnation, out.version, out.adapted) == (incarnation, 2, True)
