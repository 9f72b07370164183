"""Echo correctness: the seed's examples, sizes, contents, chunkings, many clients."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iocp_echo

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_exactly, recv_until_eof, wait_until

pytestmark = pytest.mark.backend


async def test_seed_example_1_hello(server: iocp_echo.EchoServer) -> None:
    assert await echo(server.port, b"Hello, IOCP!") == b"Hello, IOCP!"


async def test_seed_example_2_abrupt_disconnect_is_logged_and_closed(
    server: iocp_echo.EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    from .helpers import reset

    sock = await connect(server.port)
    await asyncio.get_running_loop().sock_sendall(sock, b"partial")
    await recv_exactly(sock, 7)
    reset(sock)
    await wait_until(lambda: server.stats().open_connections == 0, what="connection closed")
    warnings = [
        r for r in caplog.records if r.name.startswith("iocp_echo") and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    message = warnings[0].getMessage()
    assert "127.0.0.1:" in message and "OS error" in message
    assert sum(server.stats().errors.values()) == 1
    assert await echo(server.port, b"still serving") == b"still serving"


async def test_seed_example_3_empty_message(
    server: iocp_echo.EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    sock = await connect(server.port)
    await loop.sock_sendall(sock, b"")  # a zero-length send puts nothing on the wire
    await loop.sock_sendall(sock, b"after")
    assert await recv_exactly(sock, 5) == b"after"
    sock.shutdown(socket.SHUT_WR)
    assert await recv_until_eof(sock) == b""
    sock.close()
    # A client that connects and leaves without a byte is not an error.
    silent = await connect(server.port)
    silent.close()
    await wait_until(
        lambda: server.stats().total_connections == 2 and server.stats().open_connections == 0
    )
    assert server.stats().errors == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("size", [1, 65535, 65536, 8 * 1024 * 1024])
async def test_message_sizes(server: iocp_echo.EchoServer, size: int) -> None:
    payload = os.urandom(size)
    assert await echo(server.port, payload) == payload


async def test_reads_never_ask_more_than_max_read() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0, max_read=1000) as server:
        sock = await connect(server.port)
        payload = os.urandom(100_000)
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        assert await recv_exactly(sock, len(payload)) == payload
        # (a busy connection's next receive is issued as the loop's next dequeue starts)
        await wait_until(lambda: any(op.kind == "recv" for op in server.pending_operations()))
        recvs = [op for op in server.pending_operations() if op.kind == "recv"]
        assert [op.nbytes for op in recvs] == [1000]
        sock.close()
    assert_nothing_left(server)


async def test_reads_grow_to_65535_and_never_past_it(server: iocp_echo.EchoServer) -> None:
    """The seed's limit: no read asks for more than 65,535 bytes.  (On IOCP a busy connection
    starts with small reads and doubles them on full ones: 64 KiB messages reach the limit.)
    Between two messages the server's next read is pending, so its size can be seen."""
    sock = await connect(server.port)
    sizes = []
    for _ in range(8):
        message = os.urandom(65536)
        assert await echo_on(sock, message) == message
        await wait_until(lambda: any(op.kind == "recv" for op in server.pending_operations()))
        sizes += [op.nbytes for op in server.pending_operations() if op.kind == "recv"]
    assert max(size or 0 for size in sizes) == 65535, sizes
    sock.close()


async def echo_on(sock: socket.socket, payload: bytes) -> bytes:
    await asyncio.get_running_loop().sock_sendall(sock, payload)
    return await recv_exactly(sock, len(payload))


async def test_thousand_concurrent_clients_each_get_their_own_bytes(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    clients = [await connect(server.port) for _ in range(1000)]
    await wait_until(lambda: server.stats().open_connections == 1000, timeout=60)
    payloads = [f"client {i}:".encode() + os.urandom(64 + i % 500) for i in range(1000)]

    async def exchange(sock: socket.socket, payload: bytes) -> bytes:
        await loop.sock_sendall(sock, payload)
        return await recv_exactly(sock, len(payload), timeout=60)

    replies = await asyncio.gather(
        *(exchange(s, p) for s, p in zip(clients, payloads, strict=True))
    )
    assert replies == payloads
    for sock in clients:
        sock.close()
    await wait_until(lambda: server.stats().open_connections == 0, timeout=60)
    assert server.stats().total_connections == 1000


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=8))
def test_property_any_bytes_any_chunking_comes_back_in_order(chunks: list[bytes]) -> None:
    """Whatever is sent, however it is cut into sends, the same bytes come back in order."""

    async def scenario() -> None:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            loop = asyncio.get_running_loop()
            sock = await connect(server.port)
            expected = b"".join(chunks)
            reader = asyncio.ensure_future(recv_exactly(sock, len(expected)))
            for chunk in chunks:
                await loop.sock_sendall(sock, chunk)
            assert await reader == expected
            sock.close()
        assert_nothing_left(server)

    iocp_echo.run(scenario())


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(st.binary(min_size=1, max_size=3000), min_size=2, max_size=12))
def test_property_interleaved_clients_lose_duplicate_or_reorder_nothing(
    messages: list[bytes],
) -> None:
    """Many clients interleaving their sends each get exactly their own stream back."""

    async def scenario() -> None:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            loop = asyncio.get_running_loop()
            socks = [await connect(server.port) for _ in range(4)]
            sent: list[bytearray] = [bytearray() for _ in socks]
            for index, message in enumerate(messages):
                target = index % len(socks)
                await loop.sock_sendall(socks[target], message)
                sent[target] += message
            for sock, expected in zip(socks, sent, strict=True):
                sock.shutdown(socket.SHUT_WR)
                assert await recv_until_eof(sock) == bytes(expected)
                sock.close()
        assert_nothing_left(server)

    iocp_echo.run(scenario())
