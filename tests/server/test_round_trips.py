"""What one steady-state predict costs the service around the step: Redis round trips and thread hops.

A stream that keeps returning to the same replica (its state cached on the device) takes one round trip
to read its records (policy, state version, TTL refresh: one script) and one to commit (the
compare-and-set script and the drift-board update in one pipeline; under Cluster, when the stream's slot
and its drift-board shard live on two nodes, the pipeline's two parts go out to both at once), and two
thread hops: the decode, and
the step with its state's host copy, finiteness check and encoding.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection

from tests.conftest import npy_bytes
from tta_server.state_store import drift_key, drift_shard, state_key

pytestmark = pytest.mark.redis
NPY = {"content-type": "application/x-npy"}


@pytest.mark.parametrize("adapt", [True, False])
def test_a_cached_stream_costs_two_round_trips_and_two_hops(
    make_client, redis_url, redis_kind, cifar_array, monkeypatch, adapt, request
) -> None:
    client = make_client(redis_url=redis_url)
    client.put("/v1/streams/cam", json={"strategy": "tent"})
    body = npy_bytes(cifar_array[:16])
    for _ in range(2):  # warm: scripts loaded, state cached on the device
        assert client.post("/v1/streams/cam/predict", content=body, headers=NPY).status_code == 200

    sends: list[int] = []
    real_send = Connection.send_packed_command

    async def counting_send(self: Connection, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        await real_send(self, command, check_health)

    engine = client.app.state.engine
    hops: list[str] = []
    for name, pool in (("step", engine.executor), ("decode", engine.decoder)):
        real_submit = pool.submit

        def submit(fn: Any, *args: Any, _real: Any = real_submit, _name: str = name, **kw: Any) -> Any:
            hops.append(_name)
            return _real(fn, *args, **kw)

        monkeypatch.setattr(pool, "submit", submit)
    monkeypatch.setattr(Connection, "send_packed_command", counting_send)
    n = 5
    for _ in range(n):
        r = client.post(f"/v1/streams/cam/predict?adapt={str(adapt).lower()}", content=body, headers=NPY)
        assert r.status_code == 200 and r.json()["adapted"] is adapt
    monkeypatch.undo()
    trips, per_predict_hops = len(sends) / n, len(hops) / n
    print(f"\nadapt={adapt}: {trips:g} store round trips, {per_predict_hops:g} thread hops per predict")
    commit = 1
    if redis_kind == "cluster" and adapt:  # the commit's two slots may live on two nodes: sent at once
        cluster = request.getfixturevalue("redis_cluster")
        nodes = {
            cluster.primary_for(k).port
            for k in (state_key("default", "cam"), drift_key("default", drift_shard("cam")))
        }
        commit = len(nodes)
    assert trips == (1 + commit if adapt else 1)
    assert sorted(hops[:2]) == ["decode", "step"] and per_predict_hops == 2
