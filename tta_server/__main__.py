"""`python -m tta_server [--host H] [--port P] [--config models.yaml]`: start the server.

uvicorn runs with the connection bounds of the settings: `max_connections` (limit_concurrency: past
it, new requests are answered 503), `backlog`, `keep_alive_seconds`, and a protocol that closes a
connection which has not completed its request headers `header_timeout_seconds` after it opened (or
after its previous answer plus the keep-alive time), or whose headers outgrow `max_header_bytes`
(uvicorn has neither for httptools, the parser it picks when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import uvicorn

from tta_server.settings import Settings

log = logging.getLogger("tta_server")


class HeaderGuard:
    """Mixin for uvicorn's httptools or h11 protocol: a deadline and a size bound on request headers.

    A request's headers are complete when uvicorn has made its request-response cycle; until then the
    connection is in its header phase, which must end within `header_timeout` seconds (from the
    connection, or `idle_timeout` from the previous answer) and `max_header_bytes`.
    """

    header_timeout: float
    idle_timeout: float
    max_header_bytes: int
    transport: Any
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._headers_in():
            self._disarm()
        elif self._header_timer is not None:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._close(f"request headers over {self.max_header_bytes} bytes")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm(self.idle_timeout)  # uvicorn's keep-alive timer closes it sooner if nothing comes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _headers_in(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._header_timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if not self._headers_in():
            self._close(f"no complete request headers within {self.header_timeout:g} s")

    def _close(self, why: str) -> None:
        self._disarm()
        client = getattr(self, "client", None)
        log.info("closing connection from %s: %s", f"{client[0]}:{client[1]}" if client else "?", why)
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(base: type[asyncio.Protocol], settings: Settings) -> type[asyncio.Protocol]:
    """`base` with the `HeaderGuard` of `settings`."""
    limits = {
        "header_timeout": settings.header_timeout_seconds,
        "idle_timeout": settings.keep_alive_seconds + settings.header_timeout_seconds,
        "max_header_bytes": settings.max_header_bytes,
    }
    return type(f"Guarded{base.__name__}", (HeaderGuard, base), limits)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` under `settings` (tests pass `port`, `log_level`, ...)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    kwargs: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "http": guarded_protocol(AutoHTTPProtocol, settings),
        "timeout_keep_alive": settings.keep_alive_seconds,
        "limit_concurrency": settings.max_connections,
        "backlog": settings.backlog,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        **overrides,
    }
    return uvicorn.Config(app, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tta_server", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", help="bind address (TTA_HOST)")
    parser.add_argument("--port", type=int, help="port (TTA_PORT)")
    parser.add_argument("--config", type=Path, help="models YAML (TTA_MODELS_CONFIG)")
    args = parser.parse_args(argv)
    overrides = {
        k: v for k, v in {"host": args.host, "port": args.port, "models_config": args.config}.items() if v
    }
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tta_server.app import create_app

    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()


if __name__ == "__main__":
    main()
