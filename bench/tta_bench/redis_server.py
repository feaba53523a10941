"""redis-server processes of our own, on free loopback ports: the only Redis that tests and benches write to.

Nothing in the test suite or the benches flushes or writes a Redis it did not start here, unless a user
passed that Redis' URL explicitly (``--redis-url``). The test suite starts one :class:`PrivateRedis` per
session (tests/conftest.py) and flushes databases of that server only; tests that kill or stop the server
get one of their own, as does ``tta-bench soak``.

:class:`PrivateCluster` (3 primaries + 3 replicas, ``redis-cli --cluster create``) and
:class:`PrivateSentinel` (a primary, replicas and 3 sentinels) are whole topologies of our own, built the
same way: loopback ports, temporary folders, everything killed and removed by ``close()``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "PrivateCluster",
    "PrivateRedis",
    "PrivateSentinel",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
    "sync_client",
]


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable (Debian package ``redis-server``), or None."""
    return shutil.which("redis-server")


def redis_cli_binary() -> str | None:
    """Path of ``redis-cli`` (Debian package ``redis-tools``, a dependency of ``redis-server``), or None."""
    return shutil.which("redis-cli")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free loopback port P <= 55535 whose cluster bus port P + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port pair for a cluster node")


class PrivateRedis:
    """A redis-server of our own on 127.0.0.1 and a free port, in a temporary folder; :meth:`close` removes it.

    With ``appendonly`` (the default) the server keeps an append-only file: Redis write()s it before it
    replies, so a SIGKILL (:meth:`kill`) loses no acknowledged write and :meth:`start` recovers the data
    on the same port (fsync would only matter for a power cut). Without it, nothing touches the disk.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = True,
        extra_args: Sequence[str] = (),
        parent: Path | None = None,
        new_port: Callable[[], int] = free_port,
    ) -> None:
        self._fixed_port = port is not None
        self._new_port = new_port
        self.port = port or new_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="tta-redis-", dir=parent))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The URL of database ``db`` of this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "no"] if self.appendonly else ["--appendonly", "no"]
        )
        return [
            binary,
            "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.dir), "--save", "", *persistence,
            "--logfile", str(self.dir / "redis.log"), "--repl-diskless-sync-delay", "0", *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> PrivateRedis:
        """Start the server (again) and wait until it answers PING; returns self."""
        for attempt in range(3):
            self.proc = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(timeout):
                return self
            self.kill()
            if self._fixed_port or attempt == 2:
                break
            self.port = self._new_port()  # another process took the port between free_port() and the bind
        log = self.dir / "redis.log"
        tail = log.read_text(errors="replace")[-1000:] if log.is_file() else ""
        raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not start:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
                try:
                    if client.ping():
                        return True
                finally:
                    client.close()
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as in a crash; :meth:`start` recovers from the AOF."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # SIGKILL ends a SIGSTOPped server too
            self.proc.wait(10)
            self.proc = None

    stop = kill

    def close(self) -> None:
        """Kill the server and remove its folder."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _info(port: int, section: str) -> dict[str, str]:
    """`INFO section` (or `CLUSTER INFO` for section "cluster-info") of a loopback server as a dict; {} if down."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        if section == "cluster-info":
            raw = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
            if isinstance(raw, dict):
                return {str(k): str(v) for k, v in raw.items()}
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            return dict(line.split(":", 1) for line in text.split() if ":" in line)
        return {k: str(v) for k, v in client.info(section).items()}
    except redis.RedisError:
        return {}
    finally:
        client.close()


def _online_replicas(port: int) -> int:
    """Replicas of the server on ``port`` that finished their initial sync (state=online)."""
    info = _info(port, "replication")
    if info.get("role") != "master":
        return 0
    return sum(1 for k, v in info.items() if k.startswith("slave") and "online" in v)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


class PrivateCluster:
    """A Redis Cluster of our own: ``primaries`` primaries with ``replicas`` replicas each, on loopback ports.

    ``node_timeout_ms`` is the cluster's failure detection time: a killed primary's replica takes its
    slots over about that long (plus an election) after the kill. :meth:`flush` empties every primary
    (our own servers only)."""

    def __init__(self, primaries: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tta-cluster-"))
        self.n_primaries, self.n_replicas = primaries, replicas
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        self.nodes = [
            PrivateRedis(appendonly=False, extra_args=args, parent=self.root, new_port=free_cluster_port)
            for _ in range(primaries * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> PrivateCluster:
        cli = redis_cli_binary()
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (Debian: apt-get install redis-tools)")
        for node in self.nodes:
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.n_replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )  # fmt: skip
        self.wait_healthy(timeout)
        return self

    def alive(self) -> list[PrivateRedis]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> list[PrivateRedis]:
        """The running nodes that are primaries now (a failover changes which)."""
        return [n for n in self.alive() if _info(n.port, "replication").get("role") == "master"]

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every running node says cluster_state:ok and as many primaries as slots' owners run."""

        def ok() -> bool:
            alive = self.alive()
            if not all(_info(n.port, "cluster-info").get("cluster_state") == "ok" for n in alive):
                return False
            primaries = self.primaries()
            return len(primaries) >= self.n_primaries and (
                sum(_online_replicas(p.port) for p in primaries) >= len(alive) - len(primaries)
            )

        _wait("cluster_state:ok", ok, timeout)

    def primary_for(self, key: str) -> PrivateRedis:
        """The node that serves ``key``'s slot now."""
        import redis

        for node in self.primaries():
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1)
            try:
                client.exists(key)  # a node that does not serve the slot answers MOVED
                return node
            except redis.ResponseError:
                continue
            finally:
                client.close()
        raise RuntimeError(f"no primary serves {key!r}")

    def flush(self) -> None:
        """FLUSHALL on every primary of this cluster (ours)."""
        import redis

        for node in self.primaries():
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)
            try:
                client.flushall()
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PrivateSentinel:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2) of our own on loopback ports.

    The sentinels call the primary ``service``; ``down_after_ms`` is how long a primary may stay silent
    before the sentinels fail it over to a replica. :meth:`flush` empties the current primary."""

    def __init__(
        self, replicas: int = 2, sentinels: int = 3, *, service: str = "tta", down_after_ms: int = 1000
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tta-sentinel-"))
        self.service = service
        self.down_after_ms = down_after_ms
        self.primary = PrivateRedis(appendonly=False, parent=self.root)
        self.replicas = [
            PrivateRedis(
                appendonly=False,
                parent=self.root,
                extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)],
            )
            for _ in range(replicas)
        ]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes] | None] = [None] * sentinels

    @property
    def servers(self) -> list[PrivateRedis]:
        return [self.primary, *self.replicas]

    def url_for(self, db: int) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    @property
    def url(self) -> str:
        """``redis+sentinel://`` over every sentinel, database 0."""
        return self.url_for(0)

    def _sentinel_conf(self, i: int) -> Path:
        folder = self.root / f"sentinel-{i}"
        folder.mkdir(exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_ports[i]}\nbind 127.0.0.1\ndir {folder}\n"
            f"logfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {max(3000, 3 * self.down_after_ms)}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return conf

    def start(self, timeout: float = 60.0) -> PrivateSentinel:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        for server in self.servers:
            server.start()
        for i in range(len(self.sentinel_ports)):
            self.sentinel_procs[i] = subprocess.Popen(
                [binary, str(self._sentinel_conf(i)), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.wait_healthy(timeout)
        return self

    def current_primary(self) -> PrivateRedis | None:
        """The server the sentinels name as primary now (None while they cannot say)."""
        import redis

        for port in self.sentinel_ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                addr: Any = client.sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if addr:
                return next((s for s in self.servers if s.port == int(addr[1])), None)
        return None

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until the sentinels agree on a running primary that has its running replicas in sync and every
        sentinel sees the others."""

        def ok() -> bool:
            primary = self.current_primary()
            if primary is None or primary.proc is None or primary.proc.poll() is not None:
                return False
            running = [s for s in self.servers if s is not primary and s.proc is not None]
            if _online_replicas(primary.port) < len(running):
                return False
            import redis

            for port in self.sentinel_ports:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    master: Any = client.sentinel_master(self.service)
                except redis.RedisError:
                    return False
                finally:
                    client.close()
                if int(master.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                    return False
                if int(master.get("port", 0)) != primary.port:
                    return False
            return True

        _wait(f"sentinel service {self.service!r}", ok, timeout)

    def flush(self) -> None:
        """FLUSHALL on the current primary (ours); the replicas follow it."""
        import redis

        primary = self.current_primary() or self.primary
        client = redis.Redis(host="127.0.0.1", port=primary.port, socket_timeout=5)
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        for proc in self.sentinel_procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.sentinel_procs = [None] * len(self.sentinel_ports)
        for server in self.servers:
            server.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateSentinel:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def sync_client(url: str, timeout: float = 5.0) -> Any:
    """A synchronous redis-py client for any store URL the service takes (``redis://``,
    ``redis+cluster://``, ``redis+sentinel://``): a Redis, a RedisCluster or the Sentinel primary's Redis.
    For inspecting and preparing our own servers in tests and benches."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.sentinel import Sentinel

    from tta_server.state_store import parse_store_url

    target = parse_store_url(url)
    user, password = target.username, target.password
    if target.kind == "cluster":
        nodes = [ClusterNode(h, p) for h, p in target.nodes]
        return RedisCluster(startup_nodes=nodes, socket_timeout=timeout, username=user, password=password)
    if target.kind == "sentinel":
        assert target.service is not None
        sentinel = Sentinel(list(target.nodes), socket_timeout=timeout, username=user, password=password)
        return sentinel.master_for(target.service, db=target.db)
    return redis.Redis.from_url(url, socket_timeout=timeout)
