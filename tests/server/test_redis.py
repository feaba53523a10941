"""Redis-backed state: replicas sharing one real Redis (the suite's own redis-server), accounting, restarts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from redis.crc import key_slot

from tests.conftest import REDIS_KINDS, fresh_store_url, npy_bytes, store_client, stored_field, stored_keys
from tta_bench.redis_server import free_port
from tta_server.state_store import CasOutcome, InMemoryStateStore, RedisStateStore

NPY = {"content-type": "application/x-npy"}


def test_each_stream_has_its_own_state_in_redis(make_client, redis_url, cifar_array) -> None:
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam-a", json={"strategy": "alpha_bn"})
    client.put("/v1/streams/cam-b", json={"strategy": "tent"})
    for stream in ("cam-a", "cam-b"):
        r = client.post(f"/v1/streams/{stream}/predict", content=npy_bytes(cifar_array[:32]), headers=NPY)
        assert r.status_code == 200 and r.json()["adapted"]
    r = store_client(redis_url)
    keys = stored_keys(r, "tta:v2:*")
    streams = ("{default/cam-a}", "{default/cam-b}")
    assert {f"tta:v2:{s}:policy" for s in streams} | {f"tta:v2:{s}:state" for s in streams} <= keys
    from adapters.serialization import state_from_bytes

    a = state_from_bytes(stored_field(r, "tta:v2:{default/cam-a}:state", "blob"))
    b = state_from_bytes(stored_field(r, "tta:v2:{default/cam-b}:state", "blob"))
    assert a.meta["strategy"] == "alpha_bn" and not any(k.startswith("opt.") for k in a.tensors)
    assert b.meta["strategy"] == "tent" and any(k.startswith("opt.exp_avg.") for k in b.tensors)
    # Both keys of a stream carry the TTL, and they share one Redis Cluster hash slot.
    assert r.ttl("tta:v2:{default/cam-b}:state") > 0 and r.ttl("tta:v2:{default/cam-b}:policy") > 0
    assert len({key_slot(k.encode()) for k in keys if "cam-b" in k}) == 1


def test_state_survives_a_server_restart(make_client, redis_url, cifar_array) -> None:
    first = make_client(redis_url=redis_url)
    first.put("/v1/streams/r", json={"strategy": "unmix_tns"})
    for i in range(2):
        first.post(
            "/v1/streams/r/predict", content=npy_bytes(cifar_array[i * 16 : (i + 1) * 16]), headers=NPY
        )
    before = first.post(
        "/v1/streams/r/predict?adapt=false", content=npy_bytes(cifar_array[:16]), headers=NPY
    ).json()
    first.__exit__(None, None, None)  # shut the first replica down
    second = make_client(redis_url=redis_url)
    after = second.post(
        "/v1/streams/r/predict?adapt=false", content=npy_bytes(cifar_array[:16]), headers=NPY
    ).json()
    assert after["version"] == before["version"] == 2
    assert [p["top_k"][0]["probability"] for p in after["predictions"]] == pytest.approx(
        [p["top_k"][0]["probability"] for p in before["predictions"]], abs=1e-6
    )
    assert second.get("/v1/streams/r").json()["steps"] == 2


def test_two_replicas_concurrent_predicts_lose_no_update(make_client, redis_url, cifar_array) -> None:
    """Every request answered adapted=true is exactly one committed step; the rest are counted conflicts."""
    replicas = [
        make_client(redis_url=redis_url, conflict_retries=0),
        make_client(redis_url=redis_url, conflict_retries=0),
    ]
    replicas[0].put("/v1/streams/shared", json={"strategy": "tent"})
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = replicas[i % 2]
        for j in range(4):
            batch = cifar_array[(i * 4 + j) % 10 * 16 : (i * 4 + j) % 10 * 16 + 16]
            r = client.post("/v1/streams/shared/predict", content=npy_bytes(batch), headers=NPY)
            assert r.status_code == 200, r.text
            with lock:
                results.append(r.json())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["adapted"] + r["conflict"] for r in results) == len(results) == 16
    # Requests merged into one step (same replica, queued together) all report that step: count steps.
    adapted = round(sum(1 / r["stats"]["requests"] for r in results if r["adapted"]))
    conflicts = round(sum(1 / r["stats"]["requests"] for r in results if r["conflict"]))
    assert len({r["version"] for r in results if r["adapted"]}) == adapted
    stream = replicas[1].get("/v1/streams/shared").json()
    assert stream["steps"] == stream["version"] == adapted
    reported = 0.0
    for c in replicas:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith('tta_state_conflicts_total{model="cifar10_wrn40_2",strategy="tent"}'):
                reported += float(line.split()[-1])
    assert reported == conflicts


def test_retries_turn_conflicts_into_applied_updates(make_client, redis_url, cifar_array) -> None:
    replicas = [make_client(redis_url=redis_url, conflict_retries=5) for _ in range(2)]
    replicas[0].put("/v1/streams/retry", json={"strategy": "norm"})
    out: list[dict[str, Any]] = []

    def worker(i: int) -> None:
        for _ in range(3):
            r = replicas[i % 2].post(
                "/v1/streams/retry/predict", content=npy_bytes(cifar_array[:8]), headers=NPY
            )
            out.append(r.json())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every committed step has its own version; requests merged into one step share it.
    committed = {r["version"] for r in out if r["adapted"]}
    assert replicas[0].get("/v1/streams/retry").json()["steps"] == len(committed)
    assert sum(r["stats"]["requests"] for r in out if r["adapted"]) >= len(committed)


@pytest.mark.parametrize("kind", ["memory", *(pytest.param(k, marks=pytest.mark.redis) for k in REDIS_KINDS)])
def test_store_compare_and_set_refuses_stale_versions(kind, request) -> None:
    urls = fresh_store_url(request, kind) if kind != "memory" else None
    url = next(urls) if urls else ""
    if urls is not None:
        request.addfinalizer(urls.close)
    store = InMemoryStateStore(60) if kind == "memory" else RedisStateStore(url, 60, 1.0)

    async def scenario() -> None:
        assert await store.create("ns", "s", "inc-a", b"{}")
        assert not await store.create("ns", "s", "inc-b", b"{}")  # only where no policy exists
        assert await store.cas("ns", "s", "inc-a", 0, b"one", b'{"steps": 1}', b"{}", 0.1) == 1
        assert await store.cas("ns", "s", "inc-a", 0, b"stale", b"{}", b"{}", 0.1) == CasOutcome.CONFLICT
        assert await store.cas("ns", "s", "inc-a", 1, b"two", b'{"steps": 2}', b"{}", 0.2) == 2
        assert await store.top_drift("ns", 5) == [("s", 0.2)]
        # Another incarnation can never commit on this one's state, whatever version it names.
        assert await store.cas("ns", "s", "inc-b", 2, b"x", b"{}", b"{}", 0.3) == CasOutcome.GONE
        got = await store.load("ns", "s", None)
        assert got.state is not None and (got.state["v"], got.state["blob"]) == (b"2", b"two")
        assert got.policy is not None and got.policy["v"] == b"2"
        # A cached copy of this incarnation and version: the blob is not sent again.
        cached = await store.load("ns", "s", ("inc-a", 2))
        assert cached.state is not None and "blob" not in cached.state
        # A write-back of steps held on a replica moves the version by their number, from the stored one only.
        assert await store.cas("ns", "s", "inc-a", 1, b"x", b"{}", b"{}", 0.2, steps=3) == CasOutcome.CONFLICT
        assert await store.cas("ns", "s", "inc-a", 2, b"five", b"{}", b"{}", 0.2, steps=3) == 5
        got = await store.load("ns", "s", None)
        assert got.state is not None and (got.state["v"], got.state["blob"]) == (b"5", b"five")
        assert got.policy is not None and got.policy["v"] == b"5"
        # A conditional replace only replaces the incarnation it names, and drops the old state.
        assert not await store.replace("ns", "s", "inc-c", b"{}", expected="inc-b")
        assert await store.replace("ns", "s", "inc-c", b"{}", expected="inc-a")
        after = await store.load("ns", "s", None)
        assert after.state is None and after.policy is not None and after.policy["inc"] == b"inc-c"
        assert await store.top_drift("ns", 5) == []
        assert await store.delete("ns", "s") and not await store.delete("ns", "s")
        await store.close()

    asyncio.run(scenario())


@pytest.mark.redis
@pytest.mark.parametrize("kind", REDIS_KINDS)
def test_a_re_sent_commit_is_applied_once(kind, request, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py re-sends a command whose connection dropped; a commit that the first send had applied
    answers its version again (same token), never a conflict that would have the batch applied twice."""
    urls = fresh_store_url(request, kind)
    url = next(urls)
    request.addfinalizer(urls.close)
    store = RedisStateStore(url, 60, 1.0)
    monkeypatch.setattr("tta_server.state_store.secrets.token_hex", lambda n: "same-token")

    async def scenario() -> None:
        assert await store.create("ns", "s", "inc-a", b"{}")
        assert await store.cas("ns", "s", "inc-a", 0, b"one", b"{}", b"{}", 0.1) == 1
        assert await store.cas("ns", "s", "inc-a", 0, b"one", b"{}", b"{}", 0.1) == 1  # the re-send
        got = await store.load("ns", "s", None)
        assert got.state is not None and (got.state["v"], got.state["blob"]) == (b"1", b"one")
        monkeypatch.setattr("tta_server.state_store.secrets.token_hex", lambda n: "another-commit")
        assert await store.cas("ns", "s", "inc-a", 0, b"stale", b"{}", b"{}", 0.1) == CasOutcome.CONFLICT
        assert await store.cas("ns", "s", "inc-a", 1, b"two", b"{}", b"{}", 0.1) == 2
        monkeypatch.setattr("tta_server.state_store.secrets.token_hex", lambda n: "write-back")
        assert await store.cas("ns", "s", "inc-a", 2, b"five", b"{}", b"{}", 0.1, steps=3) == 5
        assert await store.cas("ns", "s", "inc-a", 2, b"five", b"{}", b"{}", 0.1, steps=3) == 5  # re-send
        await store.close()

    asyncio.run(scenario())


def test_unreachable_redis_fails_fast_with_503(make_client, cifar_array) -> None:
    client = make_client(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", store_timeout_seconds=0.5, store_grace_seconds=0
    )  # nothing there
    r = client.post("/v1/streams/x/predict", content=npy_bytes(cifar_array[:8]), headers=NPY)
    assert r.status_code == 503 and r.json()["error_type"] == "state_store_unavailable"
    assert client.get("/readyz").status_code == 503
