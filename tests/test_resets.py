"""Clients that reset: at every stage, in storms, and during shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading

import pytest

import iocp_echo

from .conftest import assert_nothing_left
from .helpers import connect, connect_not_to_itself, echo, recv_exactly, reset, wait_until

pytestmark = pytest.mark.backend


def _reset_storm(
    port: int, rounds: int, stop: threading.Event, errors: list[BaseException]
) -> None:
    """Blocking clients on their own thread, resetting at each stage of a connection's life:
    straight after connect (often before the server's accept completes), after sending, and
    in the middle of receiving a large echo."""
    try:
        for i in range(rounds):
            if stop.is_set():
                return
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            stage = i % 3
            try:
                if stage >= 1:
                    sock.sendall(b"x" * (100 if stage == 1 else 512 * 1024))
                if stage == 2:
                    sock.recv(1000)
            except OSError:
                pass  # the server may see our reset first; that is the point
            reset(sock)
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


async def test_reset_storm_keeps_listener_and_other_clients_alive(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    errors: list[BaseException] = []
    storm = threading.Thread(target=_reset_storm, args=(server.port, 300, stop, errors))
    storm.start()
    try:
        # Well-behaved clients keep echoing correctly throughout the storm.
        rounds = 0
        while storm.is_alive():
            payload = os.urandom(2000)
            assert await echo(server.port, payload) == payload
            rounds += 1
        await loop.run_in_executor(None, storm.join)
    finally:
        stop.set()
    assert errors == []
    assert rounds > 0
    await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
    # The listener is alive: new clients are accepted and served after the storm.
    for _ in range(20):
        assert await echo(server.port, b"after the storm") == b"after the storm"
    stats = server.stats()
    assert stats.total_connections + stats.failed_accepts >= 300 + rounds + 20
    if sys.platform == "win32":
        # The storm did hit the accept path (resets before AcceptEx completed), not just
        # reads.  Linux completes such accepts and reports the reset on the first read.
        assert stats.failed_accepts > 0


async def test_reset_before_accept_completes_does_not_kill_listener() -> None:
    """Resets racing the accept: many clients connect and reset at once, with the server's
    loop busy, so their connections are reset before the AcceptEx completes."""
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        for _ in range(5):
            socks = []
            for _ in range(50):
                sock = socket.socket()
                sock.setblocking(True)
                sock.connect(("127.0.0.1", server.port))  # the loop does not run meanwhile
                socks.append(sock)
            for sock in socks:
                reset(sock)
            assert await echo(server.port, b"alive") == b"alive"
        await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
        assert server.sockets[0].fileno() != -1
    assert_nothing_left(server)


async def test_reset_during_shutdown_leaks_nothing_and_does_not_hang() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0, shutdown_timeout=2.0)
    loop = asyncio.get_running_loop()
    socks = [await connect(server.port) for _ in range(20)]
    for sock in socks:
        await loop.sock_sendall(sock, os.urandom(256 * 1024))  # echoes still in flight
    await wait_until(lambda: server.stats().open_connections == 20)
    server.close()
    for sock in socks:
        reset(sock)
    await asyncio.wait_for(server.wait_closed(), 10)
    assert_nothing_left(server)


async def test_client_reset_mid_echo_is_counted_and_others_unaffected(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    good = await connect(server.port)
    bad = await connect(server.port)
    await loop.sock_sendall(bad, os.urandom(1024 * 1024))
    reset(bad)
    payload = os.urandom(200_000)
    await loop.sock_sendall(good, payload)
    assert await recv_exactly(good, len(payload)) == payload
    await wait_until(lambda: server.stats().open_connections == 1)
    good.close()


@pytest.mark.iocp
async def test_stock_asyncio_server_loses_its_listener_to_the_same_storm() -> None:
    """Why the server owns its accept loop: under the same storm, ``loop.create_server()``'s
    accept loop (CPython gh-93821, still open) closes its listening socket for good.  If this
    test ever fails, CPython has fixed the bug and the workaround can be reconsidered."""
    loop = asyncio.get_running_loop()
    stock = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    listener = stock.sockets[0]
    port = listener.getsockname()[1]
    handler_calls: list[dict[str, object]] = []
    loop.set_exception_handler(lambda loop, context: handler_calls.append(context))
    try:
        stop = threading.Event()
        await loop.run_in_executor(None, _reset_storm, port, 300, stop, [])
        await wait_until(lambda: listener.fileno() == -1, timeout=30, what="stock listener death")
        with pytest.raises(ConnectionRefusedError):
            await connect_not_to_itself(port)
    finally:
        stock.close()
        await stock.wait_closed()
        loop.set_exception_handler(None)
    assert any("Accept failed" in str(c.get("message")) for c in handler_calls)


async def test_exception_setting_up_one_connection_does_not_stop_accepting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CPython gh-156365: with loop.create_server(), an exception while making one
    connection's transport stops the accept loop. Here it costs that connection only."""
    loop = asyncio.get_running_loop()
    failures = iter([RuntimeError("protocol set-up failed"), OSError(24, "Too many files")])

    def flaky_factory() -> asyncio.BaseProtocol:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return iocp_echo.EchoProtocol()

    async with await iocp_echo.serve(flaky_factory, "127.0.0.1", 0) as server:
        for _ in range(2):  # each of these is dropped: the client sees the connection end
            sock = await connect(server.port)
            try:
                assert await asyncio.wait_for(loop.sock_recv(sock, 10), 10) == b""
            except ConnectionError:
                pass
            sock.close()
        assert await echo(server.port, b"still accepting") == b"still accepting"
        stats = server.stats()
        assert stats.errors == {"RuntimeError": 1, "OSError": 1}
    assert_nothing_left(server)
    errors = [r for r in caplog.records if r.name == "iocp_echo.server" and r.levelno >= 30]
    assert any(r.levelname == "ERROR" and r.exc_info for r in errors)  # unexpected: traceback
    assert any(r.levelname == "WARNING" and "OS error 24" in r.getMessage() for r in errors)
