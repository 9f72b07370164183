"""Flow control and half-close: bounded memory for a client that never reads."""

from __future__ import annotations

import asyncio
import os
import socket
import tracemalloc

import pytest

import iocp_echo

from .helpers import connect, recv_exactly, recv_until_eof, wait_until

pytestmark = pytest.mark.backend


async def test_slow_reader_bounds_server_memory_and_loses_nothing(
    server: iocp_echo.EchoServer,
) -> None:
    """A client that floods and does not read stops the server reading from it; the server's
    Python memory stays under a few hundred KiB however much the client tries to send, and
    once the client reads, every byte comes back in order."""
    loop = asyncio.get_running_loop()
    sock = await connect(server.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    payload = os.urandom(48 * 1024 * 1024)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        sender = asyncio.ensure_future(loop.sock_sendall(sock, payload))
        await wait_until(
            lambda: server.stats().reading_paused == 1,
            timeout=30,
            what="the server to stop reading from the flooding client",
        )
        # The client is still trying to send: the kernel buffers are full, nothing moves.
        assert not sender.done()
        stats = server.stats()
        assert stats.bytes_received < len(payload) // 4
        _, peak = tracemalloc.get_traced_memory()
        # payload itself was allocated before the baseline; what grew is the server's buffers
        grown = peak - baseline
    finally:
        tracemalloc.stop()
    assert grown < 2 * 1024 * 1024, f"server grew by {grown} bytes for a non-reading client"
    echoed = await recv_exactly(sock, len(payload), timeout=120)
    await sender
    assert echoed == payload
    sock.close()


async def test_half_close_gets_every_echo_then_eof(server: iocp_echo.EchoServer) -> None:
    loop = asyncio.get_running_loop()
    sock = await connect(server.port)
    payload = os.urandom(3 * 1024 * 1024)
    await loop.sock_sendall(sock, payload)
    sock.shutdown(socket.SHUT_WR)  # no more from the client; it still reads
    assert await recv_until_eof(sock, timeout=60) == payload
    sock.close()
    await wait_until(lambda: server.stats().open_connections == 0)
    assert server.stats().errors == {}
