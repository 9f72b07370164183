"""close(), wait_closed(), serve_forever(): stop accepting at once, drain, leave nothing."""

from __future__ import annotations

import asyncio
import os

import pytest

import iocp_echo

from .conftest import assert_nothing_left
from .helpers import connect, connect_not_to_itself, echo, recv_until_eof, wait_until

pytestmark = pytest.mark.backend


async def test_close_stops_accepting_at_once() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    port = server.port
    server.close()
    assert not server.is_serving()
    with pytest.raises(ConnectionRefusedError):  # the listener is gone before any await
        await connect_not_to_itself(port)
    await server.wait_closed()
    assert_nothing_left(server)


async def test_wait_closed_lets_in_flight_echoes_finish() -> None:
    """Echoes the server has read but not yet sent are delivered before the connection closes."""
    server = await iocp_echo.serve_echo("127.0.0.1", 0, write_high_water=64 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    sock = await connect(server.port, rcvbuf=16 * 1024)
    payload = os.urandom(16 * 1024 * 1024)
    await loop.sock_sendall(sock, payload)  # and do not read yet
    await wait_until(lambda: server.stats().bytes_received == len(payload), timeout=30)
    assert server.stats().bytes_unsent > 0  # echoes in flight: the client is not reading
    server.close()
    closing = asyncio.ensure_future(server.wait_closed())
    assert await recv_until_eof(sock, timeout=60) == payload
    await asyncio.wait_for(closing, 10)
    sock.close()
    assert_nothing_left(server)


async def test_close_while_client_still_sends_delivers_an_intact_prefix() -> None:
    """A client still sending when the server shuts down gets a prefix of its echo, never
    corrupted or reordered bytes, then EOF or a reset; the server still closes cleanly."""
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    sock = await connect(server.port)
    payload = os.urandom(4 * 1024 * 1024)
    sender = asyncio.ensure_future(loop.sock_sendall(sock, payload))
    await wait_until(lambda: server.stats().bytes_received > 0)
    server.close()
    received = bytearray()
    try:
        async with asyncio.timeout(60):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    except ConnectionError:
        pass
    await asyncio.wait_for(server.wait_closed(), 10)
    sender.cancel()
    assert received == payload[: len(received)]
    sock.close()
    assert_nothing_left(server)


async def test_shutdown_timeout_aborts_a_client_that_never_reads() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0, shutdown_timeout=0.5)
    loop = asyncio.get_running_loop()
    sock = await connect(server.port)
    sender = asyncio.ensure_future(loop.sock_sendall(sock, os.urandom(32 * 1024 * 1024)))
    await wait_until(lambda: server.stats().reading_paused == 1, timeout=30)
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)
    assert_nothing_left(server)
    sender.cancel()
    sock.close()


async def test_serve_forever_returns_on_close_and_cleans_up_on_cancel() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    forever = asyncio.ensure_future(server.serve_forever())
    assert await echo(server.port, b"hi") == b"hi"
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    assert_nothing_left(server)

    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    forever = asyncio.ensure_future(server.serve_forever())
    asyncio.get_running_loop().call_soon(server.close)
    await asyncio.wait_for(forever, 10)
    await server.wait_closed()
    assert_nothing_left(server)


async def test_many_open_connections_all_closed_by_shutdown() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        socks = [await connect(server.port) for _ in range(100)]
        await wait_until(lambda: server.stats().open_connections == 100)
    assert_nothing_left(server)
    for sock in socks:
        assert await recv_until_eof(sock, timeout=10) == b""
        sock.close()


async def test_a_close_interrupted_midway_still_finishes() -> None:
    """A second Ctrl-C can raise KeyboardInterrupt inside close(), after it marked the server
    closing: wait_closed() must still finish the shutdown and leave nothing behind."""
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    sock = await connect(server.port)
    await wait_until(lambda: server.stats().open_connections == 1)
    real = server._stop_accepting
    calls: list[int] = []

    def interrupted() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted (stands for KeyboardInterrupt)")
        real()

    server._stop_accepting = interrupted  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="interrupted"):
        server.close()
    assert not server.is_serving()
    await asyncio.wait_for(server.wait_closed(), 30)
    assert len(calls) == 2  # the shutdown did the interrupted part itself
    assert await recv_until_eof(sock) == b""
    sock.close()
    # (IOCP: the client's own last receive completed at once; its packet is dequeued next.)
    await wait_until(lambda: all(op.kind == "wakeup" for op in iocp_echo.pending_operations()))
    assert_nothing_left(server)
