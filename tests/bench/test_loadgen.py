"""`tta_bench.loadgen`: the lean HTTP/1.1 client of the HTTP benches."""

from __future__ import annotations

import asyncio

import pytest

from tta_bench.loadgen import Connection, LoadError


async def _serve_one_answer_per_connection(answer: bytes) -> tuple[asyncio.Server, int, list[int]]:
    """A server that answers one request per connection and then closes it, as a keep-alive timeout does."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        served.append(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served


def test_a_request_on_a_connection_the_server_closed_is_sent_again_once() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        server, port, served = await _serve_one_answer_per_connection(ok)
        conn = Connection("127.0.0.1", port)
        try:
            assert await conn.request("POST", "/a", b"123") == (200, b"ok")
            await asyncio.sleep(0.05)  # the server has closed the connection by now
            assert await conn.request("POST", "/b", b"4567") == (200, b"ok")
        finally:
            await conn.close()
            server.close()
        assert served == [3, 4]  # each request served exactly once

    asyncio.run(main())


def test_a_bodiless_204_is_read_and_a_missing_length_is_refused() -> None:
    async def main() -> None:
        for answer, want in (
            (b"HTTP/1.1 204 No Content\r\n\r\n", (204, b"")),
            (b"HTTP/1.1 200 OK\r\n\r\n", None),
        ):
            server, port, _ = await _serve_one_answer_per_connection(answer)
            conn = Connection("127.0.0.1", port)
            try:
                if want is None:
                    with pytest.raises(LoadError, match="Content-Length"):
                        await conn.request("DELETE", "/x")
                else:
                    assert await conn.request("DELETE", "/x") == want
            finally:
                await conn.close()
                server.close()

    asyncio.run(main())
