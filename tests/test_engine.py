"""The completion engine's transport: any protocol on it, the whole Transport API, its read
modes, and the fallbacks when CPython's internals or the kernel are not what it needs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from typing import ClassVar

import pytest

import iocp_echo
from iocp_echo import _private
from iocp_echo import server as _server

from .conftest import assert_nothing_left
from .helpers import connect, recv_exactly, recv_until_eof, wait_until

pytestmark = pytest.mark.backend


class Shouting(asyncio.Protocol):
    """A plain Protocol: answers each line upper-cased."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        assert self.transport is not None
        self.transport.writelines([line.upper() + b"\n" for line in lines])


class Digest(asyncio.BufferedProtocol):
    """A BufferedProtocol with a 7-byte buffer: at EOF it answers the length and SHA-256 of
    everything it read, then half-closes (eof_received returns True: it closes itself)."""

    transports: ClassVar[list[asyncio.Transport]] = []

    def __init__(self) -> None:
        self.buffer = bytearray(7)
        self.hash = hashlib.sha256()
        self.size = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        Digest.transports.append(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert nbytes <= 7
        self.hash.update(self.buffer[:nbytes])
        self.size += nbytes

    def eof_received(self) -> bool:
        assert self.transport is not None and self.transport.can_write_eof()
        self.transport.write(f"{self.size} {self.hash.hexdigest()}".encode())
        self.transport.write_eof()
        return True


async def test_engine_serves_the_echo(server: iocp_echo.EchoServer) -> None:
    assert "engine" in server.engine_name and "asyncio" not in server.engine_name


async def test_a_plain_protocol_on_the_engine() -> None:
    async with await iocp_echo.serve(Shouting, "127.0.0.1", 0) as server:
        assert "asyncio" not in server.engine_name
        sock = await connect(server.port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hello\nwor")
        await loop.sock_sendall(sock, b"ld\n")
        assert await recv_exactly(sock, 12) == b"HELLO\nWORLD\n"
        sock.close()
    assert_nothing_left(server)


async def test_a_buffered_protocol_on_the_engine_with_a_tiny_buffer() -> None:
    Digest.transports.clear()
    payload = os.urandom(200_000)
    async with await iocp_echo.serve(Digest, "127.0.0.1", 0) as server:
        sock = await connect(server.port)
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        answer = await recv_until_eof(sock)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
        sock.close()
    assert_nothing_left(server)


async def test_the_transport_api_on_the_engine() -> None:
    Digest.transports.clear()
    async with await iocp_echo.serve(Digest, "127.0.0.1", 0) as server:
        sock = await connect(server.port)
        await wait_until(lambda: len(Digest.transports) == 1)
        [transport] = Digest.transports
        assert transport.get_extra_info("peername") == sock.getsockname()
        assert transport.get_extra_info("sockname") == ("127.0.0.1", server.port)
        assert isinstance(transport.get_extra_info("socket"), socket.socket)
        assert transport.get_extra_info("nonsense", "default") == "default"
        transport.set_write_buffer_limits(high=1000)
        assert transport.get_write_buffer_limits() == (250, 1000)
        with pytest.raises(ValueError, match="high"):
            transport.set_write_buffer_limits(high=1, low=2)
        assert transport.is_reading()
        transport.pause_reading()
        assert not transport.is_reading()
        transport.resume_reading()
        assert transport.is_reading()
        transport.writelines([b"one ", bytearray(b"two "), memoryview(b"three")])
        assert await recv_exactly(sock, 13) == b"one two three"
        assert transport.get_write_buffer_size() == 0
        assert not transport.is_closing()
        transport.close()
        assert transport.is_closing()
        assert await recv_until_eof(sock) == b""
        sock.close()
    assert_nothing_left(server)


async def test_pause_reading_holds_data_until_resumed() -> None:
    """Bytes that arrive while reading is paused are delivered, in order, after resume."""
    Digest.transports.clear()
    async with await iocp_echo.serve(Digest, "127.0.0.1", 0) as server:
        sock = await connect(server.port)
        await wait_until(lambda: len(Digest.transports) == 1)
        [transport] = Digest.transports
        transport.pause_reading()
        payload = os.urandom(50_000)
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        protocol = transport.get_protocol()
        assert isinstance(protocol, Digest)
        assert protocol.size < len(payload)
        transport.resume_reading()
        answer = await recv_until_eof(sock)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
        sock.close()
    assert_nothing_left(server)


async def test_abort_drops_queued_writes_and_closes_now() -> None:
    Digest.transports.clear()
    async with await iocp_echo.serve(Digest, "127.0.0.1", 0) as server:
        sock = await connect(server.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await wait_until(lambda: len(Digest.transports) == 1)
        [transport] = Digest.transports
        for _ in range(64):
            transport.write(os.urandom(64 * 1024))  # far more than the socket takes
        assert transport.get_write_buffer_size() > 0
        transport.abort()
        assert transport.is_closing()
        await wait_until(lambda: server.stats().open_connections == 0)
        sock.close()
    assert_nothing_left(server)


async def test_a_protocol_that_raises_costs_its_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Shouting):
        def data_received(self, data: bytes) -> None:
            if data.startswith(b"boom"):
                raise RuntimeError("protocol bug")
            super().data_received(data)

    loop = asyncio.get_running_loop()
    handled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context))
    try:
        async with await iocp_echo.serve(Broken, "127.0.0.1", 0) as server:
            bad = await connect(server.port)
            await loop.sock_sendall(bad, b"boom\n")
            assert await recv_until_eof(bad) == b""
            bad.close()
            good = await connect(server.port)
            await loop.sock_sendall(good, b"fine\n")
            assert await recv_exactly(good, 5) == b"FINE\n"
            good.close()
    finally:
        loop.set_exception_handler(None)
    assert [str(c["exception"]) for c in handled] == ["protocol bug"]
    assert "data_received" in str(handled[0]["message"])
    assert_nothing_left(server)


@pytest.mark.iocp
async def test_quiet_connections_wait_with_a_zero_byte_receive() -> None:
    """IOCP: a new connection waits with a zero-byte receive (no buffer pinned); one message
    does not change that; two in a row make it busy, reading into a pooled buffer of MIN_READ
    bytes (not max_read); the sweep returns a quiet one to zero bytes."""
    from iocp_echo._iocp import engine

    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        sock = await connect(server.port)

        def recvs() -> list[int | None]:
            return [op.nbytes for op in server.pending_operations() if op.kind == "recv"]

        await wait_until(lambda: recvs() == [0], what="a zero-byte receive")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"ping")
        assert await recv_exactly(sock, 4) == b"ping"
        await wait_until(lambda: recvs() == [0], what="still quiet after one message")
        await loop.sock_sendall(sock, b"pong")
        assert await recv_exactly(sock, 4) == b"pong"
        await wait_until(lambda: recvs() == [engine.MIN_READ], what="a pooled receive")
        await wait_until(lambda: recvs() == [0], timeout=engine.QUIET_AFTER + 5, what="quiet again")
        await loop.sock_sendall(sock, b"again")  # woken from quiet: drained, echoed
        assert await recv_exactly(sock, 5) == b"again"
        sock.close()
    assert_nothing_left(server)


@pytest.mark.iocp
async def test_without_the_completion_hook_the_server_uses_asyncio_transports(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(loop: object) -> object:
        raise _private.InternalsUnavailable("IocpProactor._poll changed (test)")

    monkeypatch.setattr(_private, "completion_hook", unavailable)
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        assert "asyncio proactor transports" in server.engine_name
        assert "IocpProactor._poll changed" in server.engine_name
        sock = await connect(server.port)
        await asyncio.get_running_loop().sock_sendall(sock, b"x" * 100_000)
        assert await recv_exactly(sock, 100_000) == b"x" * 100_000
        sock.close()
    assert_nothing_left(server)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("engine is unavailable" in r.getMessage() for r in warnings)


@pytest.mark.iocp
async def test_completion_hook_shape_check_refuses_a_changed_proactor() -> None:
    loop = asyncio.get_running_loop()
    hook = _private.completion_hook(loop)
    assert hook.cache is loop._proactor._cache  # type: ignore[attr-defined]
    # CPython's class: iocp_echo's loop replaces _poll in a subclass, after checking this one
    stock = asyncio.IocpProactor  # type: ignore[attr-defined]
    original = stock._poll

    def _poll(self: object, timeout: object = None) -> None:  # a "future CPython"
        return None

    stock._poll = _poll
    try:
        with pytest.raises(_private.InternalsUnavailable, match="_poll no longer uses"):
            _private.completion_hook(loop)
    finally:
        stock._poll = original


def _serve_on_uring_loop(disable: set[str]) -> tuple[str, bytes, int]:
    """Run an echo on a fresh io_uring loop with *disable*d kernel features."""
    from iocp_echo._uring import UringEventLoop, UringProactor

    async def main() -> tuple[str, bytes, int]:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            accepts = sum(op.kind == "accept" for op in server.pending_operations())
            payload = os.urandom(300_000)
            sock = await connect(server.port)
            await asyncio.get_running_loop().sock_sendall(sock, payload)
            echoed = await recv_exactly(sock, len(payload))
            sock.close()
            name = server.engine_name
        assert_nothing_left(server)
        return name, echoed if echoed == payload else b"corrupt", accepts

    with asyncio.Runner(loop_factory=lambda: UringEventLoop(UringProactor(disable=disable))) as r:
        return r.run(main())


@pytest.mark.uring
@pytest.mark.parametrize(
    ("disable", "expected", "accepts"),
    [
        (set(), "multishot recv", 1),  # one armed multishot accept
        ({"multishot_recv"}, "one-shot recv", 1),
        ({"multishot_accept"}, "multishot recv", _server.ACCEPTS_IN_FLIGHT),
        ({"buffer_ring"}, "asyncio proactor transports", _server.ACCEPTS_IN_FLIGHT),
    ],
)
async def test_uring_engine_falls_back_feature_by_feature(
    disable: set[str], expected: str, accepts: int
) -> None:
    name, echoed, armed = await asyncio.get_running_loop().run_in_executor(
        None, _serve_on_uring_loop, disable
    )
    assert expected in name
    assert echoed != b"corrupt"
    assert armed == accepts  # multishot: one armed accept; else one future per accept
