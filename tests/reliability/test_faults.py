"""Faults of the state store and of replicas: unreachable or crashed Redis, corrupted, mismatched or
non-finite stored states, stale compare-and-set writes, a replica SIGKILLed mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from adapters.serialization import state_from_bytes, state_to_bytes
from tests.conftest import npy_bytes, store_client, stored_field
from tests.reliability.conftest import NPY, batch, metric_value, predict
from tta_bench.redis_server import free_port
from tta_bench.soak import check_store_integrity, start_replica, stop_process, wait_ready
from tta_server.state_store import CasOutcome, InMemoryStateStore, RedisStateStore, policy_key, state_key

STORE_TIMEOUT = 0.5
# Generous for a loaded 2-core machine; a fail-fast answer takes milliseconds, a hang would take seconds.
FAST = STORE_TIMEOUT + 1.5


# ------------------------------------------------------------------ Redis unreachable / crashed
def test_closed_port_answers_503_fast_and_readyz_503(make_client) -> None:
    client = make_client(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        store_timeout_seconds=STORE_TIMEOUT,
        store_grace_seconds=0,
    )
    for _ in range(3):
        t0 = time.monotonic()
        r = predict(client, "cam")
        assert time.monotonic() - t0 < FAST
        assert r.status_code == 503, r.text
        assert r.json()["error_type"] == "state_store_unavailable" and r.json()["error"]
        assert r.headers["Retry-After"] == "1"
    for method, path in (("get", "/v1/streams/cam"), ("post", "/v1/streams/cam/reset")):
        r = getattr(client, method)(path)
        assert r.status_code == 503 and r.json()["error_type"] == "state_store_unavailable"
    r = client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert r.status_code == 503
    t0 = time.monotonic()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["store"] == "down"
    assert time.monotonic() - t0 < FAST
    assert client.get("/healthz").status_code == 200  # liveness does not depend on the store
    assert metric_value(client, "tta_state_store_up") == 0


def test_redis_crash_and_restart_recovers_without_app_restart(make_client, private_redis) -> None:
    client = make_client(
        redis_url=private_redis.url, store_timeout_seconds=STORE_TIMEOUT, store_grace_seconds=0
    )
    assert client.put("/v1/streams/cam", json={"strategy": "tent"}).status_code == 200
    for i in range(3):
        r = predict(client, "cam", seed=i)
        assert r.status_code == 200 and r.json()["adapted"] and r.json()["version"] == i + 1

    private_redis.stop()  # SIGKILL
    for i in range(3):
        t0 = time.monotonic()
        r = predict(client, "cam", seed=10 + i)
        assert time.monotonic() - t0 < FAST
        assert r.status_code == 503 and r.json()["error_type"] == "state_store_unavailable"
    assert client.get("/readyz").status_code == 503
    assert client.get("/v1/streams/cam").status_code == 503

    private_redis.start()  # same port, append-only file replayed
    assert client.get("/readyz").status_code == 200
    stream = client.get("/v1/streams/cam").json()
    # Nothing of the failed requests was written, nothing committed before the crash was lost.
    assert stream["version"] == stream["steps"] == 3
    r = predict(client, "cam", seed=20)
    assert r.status_code == 200 and r.json()["adapted"] and r.json()["version"] == 4
    stream = client.get("/v1/streams/cam").json()
    assert stream["version"] == stream["steps"] == 4
    assert check_store_integrity(private_redis.url) == (1, [])
    assert metric_value(client, "tta_state_store_up") == 1


def test_hung_redis_times_out_as_503(make_client, private_redis) -> None:
    """A Redis that accepts connections but does not answer (SIGSTOP) costs one store timeout, no more."""
    client = make_client(redis_url=private_redis.url, store_timeout_seconds=STORE_TIMEOUT)
    assert predict(client, "cam").status_code == 200
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = predict(client, "cam", seed=1)
        assert r.status_code == 503 and r.json()["error_type"] == "state_store_unavailable"
        assert time.monotonic() - t0 < FAST
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    r = predict(client, "cam", seed=2)
    assert r.status_code == 200, r.text
    stream = client.get("/v1/streams/cam").json()
    assert stream["version"] == stream["steps"] == r.json()["version"]


def test_store_reconnects_every_pooled_connection_after_redis_restart(private_redis) -> None:
    """After a restart every pooled connection is dead; none of them may turn into a 503."""
    from tta_server.errors import StoreUnavailableError

    store = RedisStateStore(private_redis.url, 3600, STORE_TIMEOUT)

    async def burst(expected: int) -> list[str]:
        async def one(i: int) -> str | None:
            try:
                await store.load("ns", f"s{i}", None)
                if expected == 0:
                    await store.create("ns", f"s{i}", "inc", b"{}")
                got = await store.cas("ns", f"s{i}", "inc", expected, b"x", b"{}", b"{}", 0.0)
                return None if got == expected + 1 else f"s{i}: cas answered {got}"
            except StoreUnavailableError as exc:
                return f"s{i}: {exc}"

        return [e for e in await asyncio.gather(*(one(i) for i in range(16))) if e]

    async def scenario() -> None:
        assert await burst(0) == []  # 16 pooled connections
        private_redis.stop()
        private_redis.start()
        assert await burst(1) == []
        await store.close()

    asyncio.run(scenario())


def _pooled_connections(client: Any) -> list[Any]:
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return [c for node in client.get_nodes() for c in node._connections]
    pool = client.connection_pool
    return [*pool._available_connections, *pool._in_use_connections]


def test_a_closed_transport_under_uvloop_is_a_store_outage_with_retry_after(redis_url) -> None:
    """uvicorn runs on uvloop, whose closed transports raise RuntimeError (not OSError) on write, and
    redis-py lets it through: seen as a 500 when a Cluster primary was killed. It must be a 503."""
    import uvloop

    from tta_server.errors import StoreUnavailableError

    async def scenario() -> None:
        store = RedisStateStore(redis_url, 3600, STORE_TIMEOUT)
        await store.create("ns", "s", "inc", b"{}")
        broken = [c for c in _pooled_connections(store.client) if c.is_connected]
        for conn in broken:
            conn._writer.transport.abort()  # what a peer's death does to a pooled connection
        with pytest.raises(StoreUnavailableError) as caught:
            await store.load("ns", "s", None)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert "the handler is closed" in str(caught.value.__cause__)
        assert caught.value.status_code == 503 and dict(caught.value.headers or {}) == {"Retry-After": "1"}
        # Each broken connection is dropped after its failure (a 503 too): then the store works again.
        for _ in broken:
            with contextlib.suppress(StoreUnavailableError):
                got = await store.load("ns", "s", None)
                break
        assert got.policy is not None and got.policy["inc"] == b"inc"
        await store.close()

    uvloop.run(scenario())


CLOSED = (
    "unable to perform operation on <TCPTransport closed=True reading=False 0x7f00>; the handler is closed"
)


@pytest.mark.parametrize(
    ("message", "status"), [(CLOSED, 503), ("cannot schedule new futures after shutdown", 500)]
)
def test_only_the_closed_transport_runtime_error_of_redis_py_answers_503(
    make_client, redis_url, monkeypatch, message, status
) -> None:
    """Through the API: the closed-transport RuntimeError inside redis-py's send is a 503 with
    Retry-After; any other RuntimeError there stays a bug (500 internal)."""
    from redis.asyncio.connection import AbstractConnection

    client = make_client(redis_url=redis_url)
    assert predict(client, "cam").status_code == 200

    async def broken(self: Any, command: Any) -> None:
        raise RuntimeError(message)

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", broken)
    r = predict(client, "cam", seed=1)
    assert r.status_code == status, r.text
    if status == 503:
        assert r.json()["error_type"] == "state_store_unavailable" and r.headers["Retry-After"] == "1"
    else:
        assert r.json()["error_type"] == "internal" and "retry-after" not in r.headers
    monkeypatch.undo()
    assert predict(client, "cam", seed=2).status_code == 200


def test_the_closed_transport_message_outside_redis_py_is_not_a_store_outage() -> None:
    """The match needs redis-py in the traceback, not the words alone."""
    store = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", 3600, STORE_TIMEOUT)

    async def raises() -> None:
        raise RuntimeError(CLOSED)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="the handler is closed"):
            await store._call(raises())
        await store.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ corrupted / mismatched state
def _state_field(stream: str) -> str:
    return state_key("default", stream)


def _policy_field(stream: str) -> str:
    return policy_key("default", stream)


def test_corrupted_blob_is_409_state_corrupt_and_reset_fixes_it(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(client, "cam").status_code == 200
    r = store_client(redis_url)
    for garbage in (
        b"\x00" * 40,
        b"not safetensors at all",
        stored_field(r, _state_field("cam"), "blob")[:-100],
    ):
        r.hset(_state_field("cam"), "blob", garbage)
        resp = predict(client, "cam", seed=1)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error_type"] == "state_corrupt"
        assert stored_field(r, _state_field("cam"), "v") == b"1"  # refused, not overwritten
    # A pickle in the store is refused like any other garbage and never executed.
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    r.hset(_state_field("cam"), "blob", pickle.dumps(Boom()))
    assert predict(client, "cam", seed=1).json()["error_type"] == "state_corrupt"

    reset = client.post("/v1/streams/cam/reset")
    assert reset.status_code == 200 and reset.json()["version"] == 0 and reset.json()["steps"] == 0
    resp = predict(client, "cam", seed=2)
    assert resp.status_code == 200 and resp.json()["adapted"] and resp.json()["version"] == 1
    assert metric_value(client, "tta_state_resets_total", reason="api") == 1


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda s: s.with_updates(strategy="alpha_bn"), id="other-strategy"),
        pytest.param(lambda s: s.with_updates(schema_version=99), id="other-schema"),
        pytest.param(lambda s: s.with_updates(model="0" * 16), id="other-model"),
    ],
)
def test_blob_of_another_strategy_or_schema_is_409_state_mismatch(make_client, redis_url, tamper) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(client, "cam").status_code == 200
    r = store_client(redis_url)
    state = state_from_bytes(stored_field(r, _state_field("cam"), "blob"))
    r.hset(_state_field("cam"), "blob", state_to_bytes(tamper(state)))
    resp = predict(client, "cam", seed=1)
    assert resp.status_code == 409 and resp.json()["error_type"] == "state_mismatch", resp.text
    assert client.post("/v1/streams/cam/reset").status_code == 200
    assert predict(client, "cam", seed=2).status_code == 200


def test_hash_meta_of_another_policy_is_409_state_mismatch(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "alpha_bn"})
    assert predict(client, "cam").status_code == 200
    r = store_client(redis_url)
    meta = json.loads(stored_field(r, _state_field("cam"), "meta"))
    meta["policy"] = "f" * 16
    r.hset(_state_field("cam"), "meta", json.dumps(meta))
    resp = predict(client, "cam", seed=1)
    assert resp.status_code == 409 and resp.json()["error_type"] == "state_mismatch"


def test_nan_in_stored_state_is_detected_and_reset_to_source(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, state_cache_size=0)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(client, "cam").status_code == 200
    r = store_client(redis_url)
    state = state_from_bytes(stored_field(r, _state_field("cam"), "blob"))
    name = next(k for k in state.tensors if k.endswith(".weight") and not k.startswith("opt."))
    poisoned = state.tensors[name].clone()
    poisoned[0] = float("nan")
    r.hset(_state_field("cam"), "blob", state_to_bytes(state.with_updates({name: poisoned})))
    before = metric_value(client, "tta_state_resets_total", reason="non_finite")

    resp = predict(client, "cam", seed=1)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["adapted"] and body["version"] == 2
    probs = [p["probability"] for pred in body["predictions"] for p in pred["top_k"]]
    assert all(0.0 <= p <= 1.0 for p in probs) and all(pred["entropy"] >= 0 for pred in body["predictions"])
    assert metric_value(client, "tta_state_resets_total", reason="non_finite") == before + 1
    stored = state_from_bytes(stored_field(r, _state_field("cam"), "blob"))
    assert all(bool(torch.isfinite(t).all()) for t in stored.tensors.values())
    assert stored.meta["steps"] == 2  # counters carried over the reset
    assert check_store_integrity(redis_url) == (1, [])


def test_non_finite_update_is_discarded_and_not_reported_as_adapted(make_client, redis_url) -> None:
    """An update that would store inf/NaN is rolled back: the answer says adapted=false."""
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam", json={"strategy": "tent", "config": {"weight_decay": 1e300}})
    resp = predict(client, "cam")
    assert resp.status_code == 200
    assert resp.json()["adapted"] is False and resp.json()["version"] == 0
    assert metric_value(client, "tta_state_resets_total", reason="non_finite_rollback") == 1
    stream = client.get("/v1/streams/cam").json()
    assert stream["steps"] == stream["version"] == 0


@pytest.mark.parametrize(
    "record",
    [
        b"{not json",
        b'{"model": "cifar10_wrn40_2"}',
        b'"a string"',
        b"[1, 2]",
        b'{"model": "m", "strategy": "s", "config": {}, "extra": 1}',
    ],
)
def test_corrupt_policy_record_is_409_and_reset_put_or_delete_repair_it(
    make_client, redis_url, record
) -> None:
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert predict(client, "cam").status_code == 200
    r = store_client(redis_url)
    r.hset(_policy_field("cam"), "rec", record)
    for method, path in (("get", "/v1/streams/cam"), ("post", "/v1/streams/cam/predict")):
        resp = getattr(client, method)(
            path, **({"content": npy_bytes(batch(8)), "headers": NPY} if "pre" in path else {})
        )
        assert resp.status_code == 409 and resp.json()["error_type"] == "state_corrupt", resp.text
    # Reset repairs it from the copy of the policy the state keeps: same policy, source state.
    reset = client.post("/v1/streams/cam/reset")
    assert reset.status_code == 200 and (reset.json()["strategy"], reset.json()["version"]) == ("tent", 0)
    assert predict(client, "cam", seed=2).json()["version"] == 1
    # Without a state to recover from, reset cannot know the policy: 409, and PUT repairs.
    r.delete(_state_field("cam"))
    r.hset(_policy_field("cam"), "rec", record)
    resp = client.post("/v1/streams/cam/reset")
    assert resp.status_code == 409 and resp.json()["error_type"] == "state_corrupt"
    fixed = client.put("/v1/streams/cam", json={"strategy": "tent"})
    assert fixed.status_code == 200 and fixed.json()["version"] == 0
    resp = predict(client, "cam", seed=2)
    assert resp.status_code == 200 and resp.json()["version"] == 1
    # DELETE drops a corrupt record too.
    r.hset(_policy_field("cam"), "rec", record)
    assert client.delete("/v1/streams/cam").status_code == 204
    assert client.get("/v1/streams/cam").status_code == 404


def test_stored_config_that_no_longer_validates_is_409_state_mismatch(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    r = store_client(redis_url)
    rec = json.loads(stored_field(r, _policy_field("cam"), "rec"))
    rec["config"]["lr"] = -5.0  # as if a release tightened the strategy's config schema
    r.hset(_policy_field("cam"), "rec", json.dumps(rec))
    resp = predict(client, "cam")
    assert resp.status_code == 409 and resp.json()["error_type"] == "state_mismatch", resp.text
    assert client.put("/v1/streams/cam", json={"strategy": "tent"}).status_code == 200
    assert predict(client, "cam").status_code == 200


def test_stored_flat_config_of_a_composite_is_409_state_mismatch(make_client, redis_url) -> None:
    """A composite's config nests per part; a policy stored in the older flat form is refused clearly."""
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam", json={"strategy": "unmix_tns+tent"})
    r = store_client(redis_url)
    rec = json.loads(stored_field(r, _policy_field("cam"), "rec"))
    rec["config"] = {**rec["config"]["unmix_tns"], **rec["config"]["tent"]}  # the flat form
    r.hset(_policy_field("cam"), "rec", json.dumps(rec))
    resp = predict(client, "cam")
    assert resp.status_code == 409 and resp.json()["error_type"] == "state_mismatch", resp.text
    assert "PUT a new policy" in resp.json()["error"]
    assert client.put("/v1/streams/cam", json={"strategy": "unmix_tns+tent"}).status_code == 200
    assert predict(client, "cam").status_code == 200


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_deleted_stream_does_not_resurrect_an_old_state(make_client, store, request) -> None:
    overrides = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    client = make_client(**overrides)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    for i in range(2):
        assert predict(client, "cam", seed=i).json()["version"] == i + 1
    client.post("/v1/streams/cam/reset")  # a new incarnation; the old state is dropped
    assert predict(client, "cam", seed=5).json()["version"] == 1
    assert client.delete("/v1/streams/cam").status_code == 204
    client.put("/v1/streams/cam", json={"strategy": "tent"})  # yet another incarnation
    stream = client.get("/v1/streams/cam").json()
    assert (stream["version"], stream["steps"]) == (0, 0)
    assert predict(client, "cam", seed=6).json()["version"] == 1


# ------------------------------------------------------------------ compare-and-set atomicity
@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_cas_with_stale_version_is_refused(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    store = InMemoryStateStore(60) if kind == "memory" else RedisStateStore(url, 60, 1.0)

    async def scenario() -> None:
        for name in ("s", "race"):
            assert await store.create("ns", name, "inc", b"{}")
        assert await store.cas("ns", "s", "inc", 0, b"v1", b"{}", b"{}", 0.0) == 1
        assert await store.cas("ns", "s", "inc", 0, b"stale", b"{}", b"{}", 0.0) == CasOutcome.CONFLICT
        assert await store.cas("ns", "s", "inc", 5, b"future", b"{}", b"{}", 0.0) == CasOutcome.CONFLICT
        assert await store.cas("ns", "s", "inc", 1, b"v2", b"{}", b"{}", 0.0) == 2
        got = await store.load("ns", "s", None)
        assert got.state is not None and (got.state["v"], got.state["blob"]) == (b"2", b"v2")
        # An old incarnation's writer cannot touch the state, whatever version it names.
        assert await store.cas("ns", "s", "old", 2, b"old", b"{}", b"{}", 0.0) == CasOutcome.GONE
        # Racing writers with the same expected version: exactly one wins.
        results = await asyncio.gather(
            *(store.cas("ns", "race", "inc", 0, f"w{i}".encode(), b"{}", b"{}", 0.0) for i in range(8))
        )
        assert sorted(results) == [CasOutcome.CONFLICT] * 7 + [1]
        await store.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ replica killed mid-request
def test_replica_sigkilled_mid_request_leaves_only_whole_states(redis_url, tmp_path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_replica(port, redis_url, log_file=tmp_path / "replica.log")
    try:
        wait_ready(base, proc)
        strategies = ["tent", "norm", "unmix_tns", "eta"]
        for i, s in enumerate(strategies):
            httpx.put(f"{base}/v1/streams/k{i}", json={"strategy": s}, timeout=30).raise_for_status()
        answered: list[tuple[str, dict[str, Any]]] = []
        started = threading.Event()

        def worker(i: int) -> None:
            with httpx.Client(timeout=60) as c:
                for j in range(50):
                    try:
                        r = c.post(
                            f"{base}/v1/streams/k{i % 4}/predict",
                            content=npy_bytes(batch(8, seed=i * 100 + j)),
                            headers=NPY,
                        )
                    except httpx.HTTPError:
                        return
                    started.set()
                    answered.append((f"k{i % 4}", r.json()))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert started.wait(120)
        time.sleep(1.5)  # requests are in flight on every stream now
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for t in threads:
            t.join(60)
    finally:
        stop_process(proc)
    assert answered, "no request completed before the kill"
    count, problems = check_store_integrity(redis_url)
    assert count >= 1 and problems == []
    # Every answered adapted=true is in the store: committed steps >= acknowledged steps per stream.
    r = store_client(redis_url)
    for stream in {s for s, _ in answered}:
        acked = max((b["version"] for s, b in answered if s == stream and b.get("adapted")), default=0)
        assert int(r.hget(_state_field(stream), "v") or 0) >= acked

    # A new replica carries on from the committed states.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_replica(port, redis_url, log_file=tmp_path / "replica2.log")
    try:
        wait_ready(base, proc)
        for i in range(4):
            before = httpx.get(f"{base}/v1/streams/k{i}", timeout=30).json()
            resp = httpx.post(
                f"{base}/v1/streams/k{i}/predict", content=npy_bytes(batch(8)), headers=NPY, timeout=60
            )
            assert resp.status_code == 200 and resp.json()["version"] == before["version"] + 1
    finally:
        stop_process(proc)
    assert check_store_integrity(redis_url)[1] == []
