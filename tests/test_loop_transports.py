"""The completion engine under every stream of iocp_echo's loop (``_loop_transports.py``).

An application's own servers and clients (``create_server``, ``create_connection``,
``connect_accepted_socket``, streams, TLS) get the engine's transport on iocp_echo's loop,
with asyncio's contract and extras, and leave nothing behind once closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iocp_echo
from iocp_echo import _platform, _private
from iocp_echo.introspection import pending_operations
from tests.helpers import wait_until

pytestmark = pytest.mark.backend

DATA = Path(__file__).parent / "data"


class EchoHandlers:
    """A streams echo handler that counts its running connections, so a test can wait for
    the server side to finish rather than leave handler tasks to the loop's teardown."""

    def __init__(self) -> None:
        self.running = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.running += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()
        finally:
            self.running -= 1

    async def finished(self) -> None:
        await wait_until(lambda: self.running == 0, what="every server handler finished")


def _own_operations(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The loop's operations in flight, but for its own self-pipe read."""
    return [op for op in pending_operations(loop) if op.kind != "wakeup"]


async def test_streams_on_both_sides_run_on_the_engine_with_asyncio_extras() -> None:
    loop = asyncio.get_running_loop()
    accepted: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await echo(reader, writer)

    echo = EchoHandlers()
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = bytes(range(256)) * 4096  # 1 MiB, past any single read
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload

    assert isinstance(writer.transport, iocp_echo.CompletionTransport)
    assert isinstance(accepted[0].transport, iocp_echo.CompletionTransport)
    client_sock = writer.get_extra_info("socket")
    assert isinstance(client_sock, asyncio.trsock.TransportSocket)
    assert writer.get_extra_info("peername") == ("127.0.0.1", port)
    assert accepted[0].get_extra_info("peername") == writer.get_extra_info("sockname")
    assert writer.get_extra_info("no such extra", "default") == "default"

    writer.close()
    await writer.wait_closed()
    await echo.finished()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)
    await wait_until(lambda: not _own_operations(loop), what="operations of closed streams")


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


async def test_create_connection_schedules_connection_made_and_reports_eof_once() -> None:
    """asyncio's contract: the transport is returned before its protocol hears of it, and
    EOF then connection_lost arrive once each, in order."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made_before_return: list[list[str]] = []

    def factory() -> _Recorder:
        protocol = _Recorder()
        loop.call_soon(lambda: made_before_return.append(list(protocol.events)))
        return protocol

    transport, protocol = await loop.create_connection(factory, "127.0.0.1", port)
    assert isinstance(transport, iocp_echo.CompletionTransport)
    transport.write(b"hello")
    transport.write_eof()
    assert await asyncio.wait_for(protocol.lost, 10) is None
    assert bytes(protocol.data) == b"hello"
    assert protocol.events == ["made", "eof", "lost"]
    await handlers.finished()
    server.close()
    await server.wait_closed()


async def test_connect_accepted_socket_gets_the_engine() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
    listener.close()
    transport, protocol = await loop.connect_accepted_socket(_Recorder, conn)
    assert isinstance(transport, iocp_echo.CompletionTransport)
    client.sendall(b"from a socket the loop did not accept")
    client.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(protocol.lost, 10)
    assert bytes(protocol.data) == b"from a socket the loop did not accept"
    client.close()


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(DATA / "localhost.crt", DATA / "localhost.key")
    return server_ctx, ssl.create_default_context(cafile=str(DATA / "localhost.crt"))


async def test_tls_streams_ride_on_the_engine() -> None:
    server_ctx, client_ctx = _tls_contexts()
    server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    payload = bytes(range(256)) * 1000
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
    assert writer.get_extra_info("ssl_object") is not None
    # Under the TLS layer: the engine's transport (asyncio keeps it in _ssl_protocol).
    raw = writer.transport._ssl_protocol._transport  # type: ignore[attr-defined]
    assert isinstance(raw, iocp_echo.CompletionTransport)
    writer.close()
    await writer.wait_closed()
    await handlers.finished()
    server.close()
    await server.wait_closed()


async def test_server_wait_closed_waits_for_its_engine_connections() -> None:
    """``Server.wait_closed()`` counts the engine's connections like asyncio's own."""
    server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
    server.close()
    waiting = asyncio.ensure_future(server.wait_closed())
    if sys.version_info >= (3, 12):  # 3.11's wait_closed() does not wait for connections
        done, _ = await asyncio.wait([waiting], timeout=0.2)
        assert not done, "wait_closed() returned while a connection was open"
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(waiting, 10)
    await handlers.finished()


@pytest.mark.skipif(sys.version_info < (3, 13), reason="Server.close_clients() is new in 3.13")
async def test_close_clients_reaches_engine_connections() -> None:
    server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
    server.close()
    server.close_clients()  # type: ignore[attr-defined]
    assert await asyncio.wait_for(reader.read(), 10) == b""
    await asyncio.wait_for(server.wait_closed(), 10)
    writer.close()
    await writer.wait_closed()
    await handlers.finished()


def test_without_the_engine_the_loop_says_why_and_uses_asyncio_transports(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoEngine:
        def make_engine(self, loop: Any, *, max_read: int) -> Any:
            raise _private.InternalsUnavailable("internals changed (simulated)")

    loop = iocp_echo.new_event_loop()
    monkeypatch.setattr(_platform, "backend", NoEngine)
    try:
        with caplog.at_level(logging.WARNING, logger="iocp_echo.loop"):

            async def scenario() -> None:
                server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"still echoed")
                assert await asyncio.wait_for(reader.readexactly(12), 10) == b"still echoed"
                assert not isinstance(writer.transport, iocp_echo.CompletionTransport)
                writer.close()
                await writer.wait_closed()
                await handlers.finished()
                server.close()
                await server.wait_closed()

            loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert getattr(loop, "engine_unavailable", None) == "internals changed (simulated)"
    warnings = [r for r in caplog.records if "engine is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    streams=st.lists(
        st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=5),
        min_size=1,
        max_size=4,
    )
)
def test_property_streams_clients_get_their_own_bytes_back(streams: list[list[bytes]]) -> None:
    """Several stream clients of a stream server on one loop, each writing its chunks
    interleaved with the others: each gets exactly its own bytes back, in order."""

    async def scenario() -> None:
        server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in streams]
        readers = [
            asyncio.ensure_future(reader.readexactly(sum(map(len, chunks))))
            for (reader, _), chunks in zip(clients, streams, strict=True)
        ]
        for step in range(max(map(len, streams))):
            for (_, writer), chunks in zip(clients, streams, strict=True):
                if step < len(chunks):
                    writer.write(chunks[step])
                    await writer.drain()
        for future, chunks in zip(readers, streams, strict=True):
            assert await asyncio.wait_for(future, 30) == b"".join(chunks)
        for _, writer in clients:
            writer.close()
            await writer.wait_closed()
        await handlers.finished()
        server.close()
        await server.wait_closed()
        loop = asyncio.get_running_loop()
        await wait_until(lambda: not _own_operations(loop), what="operations of closed streams")

    iocp_echo.run(scenario())


async def test_sendfile_sends_the_file_and_refuses_writes_meanwhile(tmp_path: Path) -> None:
    """``loop.sendfile()`` on the engine's transport: the file's bytes exactly, between the
    bytes written before and after, and no write() can cut into them."""
    loop = asyncio.get_running_loop()
    content = bytes(range(256)) * (128 << 10) + b"tail"  # 32 MiB: more than sockets buffer
    path = tmp_path / "file"
    path.write_bytes(content)
    received: asyncio.Future[bytes] = loop.create_future()
    reading = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()  # (not before sendfile() is under way)
        received.set_result(await reader.read())
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    transport: Any = writer.transport
    assert isinstance(transport, iocp_echo.CompletionTransport)
    writer.write(b"before:")
    with path.open("rb") as file:
        sending = asyncio.ensure_future(loop.sendfile(writer.transport, file, 10))
        # The peer does not read yet, so the file cannot all go at once.
        await wait_until(lambda: transport._empty_waiter is not None, what="sendfile")
        assert not sending.done()
        with pytest.raises(RuntimeError, match="sendfile is in progress"):
            transport.write(b"cut in")
        reading.set()
        assert await asyncio.wait_for(sending, 30) == len(content) - 10
        assert file.tell() == len(content)
    writer.write(b":after")
    writer.write_eof()
    assert await asyncio.wait_for(received, 30) == b"before:" + content[10:] + b":after"
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


class _FlushesAfterClose(asyncio.Protocol):
    """A producer that, like asyncio's TLS layer, holds its last bytes while paused and
    writes them when resumed, after it has already called close()."""

    def __init__(self, first: bytes, last: bytes) -> None:
        self.first, self.last = first, last
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.first)  # far past the high-water mark: pause_writing() now
        transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.transport.write(self.last)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_a_producer_resumed_after_close_still_gets_its_last_bytes_out() -> None:
    """The write side resumes a paused producer before it finishes a close, as asyncio's
    transports do (a TLS layer's close_notify was lost this way: CPython's
    test_remote_shutdown_receives_trailing_data hung)."""
    loop = asyncio.get_running_loop()
    first, last = b"x" * (4 << 20), b"the last bytes"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    connecting = asyncio.ensure_future(
        loop.create_connection(lambda: _FlushesAfterClose(first, last), "127.0.0.1", port)
    )
    peer, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
    listener.close()
    transport, protocol = await asyncio.wait_for(connecting, 10)
    assert isinstance(transport, iocp_echo.CompletionTransport)
    received = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 30):
        received += chunk
    assert len(received) == len(first) + len(last) and received.endswith(last)
    assert await asyncio.wait_for(protocol.lost, 10) is None
    peer.close()


async def test_a_lost_connection_lets_go_of_its_protocol() -> None:
    """Once connection_lost() ran, the transport holds no reference to the protocol (a
    cancelled read may keep the transport one more loop iteration; a TLS layer and its
    SSLContext must not live as long)."""
    import gc
    import weakref

    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(handlers := EchoHandlers(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, protocol = await loop.create_connection(_Recorder, "127.0.0.1", port)
    gone = weakref.ref(protocol)
    transport.close()
    await asyncio.wait_for(protocol.lost, 10)
    del protocol
    gc.collect()
    assert gone() is None
    assert transport.is_closing()
    await handlers.finished()
    server.close()
    await server.wait_closed()
