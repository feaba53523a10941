"""redis-server processes of our own, on free loopback ports: the only Redis that tests and benches write to.

Nothing in the test suite or the benches flushes or writes a Redis it did not start here, unless a user
passed that Redis' URL explicitly (``--redis-url``). The test suite starts one :class:`PrivateRedis` per
session (tests/conftest.py) and flushes databases of that server only; tests that kill or stop the server
get one of their own, as does ``tta-bench soak``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PrivateRedis", "free_port", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable (Debian package ``redis-server``), or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own on 127.0.0.1 and a free port, in a temporary folder; :meth:`close` removes it.

    With ``appendonly`` (the default) the server keeps an append-only file: Redis write()s it before it
    replies, so a SIGKILL (:meth:`kill`) loses no acknowledged write and :meth:`start` recovers the data
    on the same port (fsync would only matter for a power cut). Without it, nothing touches the disk.
    """

    def __init__(self, port: int | None = None, *, appendonly: bool = True) -> None:
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="tta-redis-"))
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
            "--logfile", str(self.dir / "redis.log"),
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
            self.port = free_port()  # another process took the port between free_port() and the bind
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
