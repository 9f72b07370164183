"""Every listener on iocp_echo's loops outlives clients that reset, and a server leaves no accepted
socket or timer of its own behind when it closes.

A client that connects and resets before its accept completes used to kill the listening socket
of anything accepting through asyncio's proactor accept loop (CPython gh-93821): on Windows,
``AcceptEx`` fails; on Linux, the io_uring proactor's accept failed in ``getpeername()`` with
ENOTCONN.  Here: the admin endpoint on both platforms, and a user's own ``loop.create_server()``
on iocp_echo's Linux loop, each shown still accepting and serving after storms of such clients.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

import iocp_echo
from iocp_echo import _platform, admin

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_until_eof, reset, wait_until

pytestmark = pytest.mark.backend

if sys.platform.startswith("linux"):
    from iocp_echo._uring import proactor as uring_proactor

#: Storms: this many rounds of this many clients that connect and reset at once.
ROUNDS, CLIENTS = 5, 20


def connect_and_reset(port: int, count: int = CLIENTS) -> None:
    """*count* clients connect (blocking: the loop does not run meanwhile, so their accepts
    are still pending) and then all reset: the connections die in the listener's backlog or
    in the middle of their accept."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    for sock in socks:
        reset(sock)


async def admin_status(port: int) -> tuple[int, dict[str, Any]]:
    sock = await connect(port)
    try:
        await asyncio.get_running_loop().sock_sendall(
            sock, b"GET /?limit=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        answer = await recv_until_eof(sock, timeout=30)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the running loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: reported.append(context))
    yield reported
    loop.set_exception_handler(None)


# -- the admin endpoint ------------------------------------------------------------------------


async def test_admin_endpoint_survives_reset_storms(
    server: iocp_echo.EchoServer, loop_errors: list[dict[str, Any]]
) -> None:
    """Tracker issue 9 item 1: twenty connect-then-reset clients left the admin endpoint
    refusing connections (its stock listener closed) while the echo went on."""
    async with await admin.start_admin(server, 0) as endpoint:
        listener = endpoint.sockets[0]
        for _ in range(ROUNDS):
            connect_and_reset(endpoint.port)
            status, document = await admin_status(endpoint.port)
            assert status == 200 and document["server"]["port"] == server.port
        await wait_until(lambda: endpoint.connections == 0, what="the storm's connections gone")
        assert listener.fileno() != -1
        assert (await admin_status(endpoint.port))[0] == 200
        assert await echo(server.port, b"echo too") == b"echo too"
    assert listener.fileno() == -1  # closed with the endpoint, not before
    assert loop_errors == []


# -- a user's own loop.create_server() on the Linux loop ---------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _stock_server_through_storms(loop_errors: list[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    stock = await loop.create_server(_Echo, "127.0.0.1", 0)
    listener = stock.sockets[0]
    port = listener.getsockname()[1]
    try:
        for round_ in range(ROUNDS):
            connect_and_reset(port)
            payload = b"round %d" % round_
            assert await echo(port, payload) == payload
        assert listener.fileno() != -1
    finally:
        stock.close()
        # Since 3.12 this waits for every connection the server made: a reset connection
        # whose transport could not close its socket held it for ever.
        await asyncio.wait_for(stock.wait_closed(), 10)
    assert loop_errors == []  # no "Accept failed", no failed connection_lost


@pytest.mark.uring
async def test_stock_create_server_on_the_uring_loop_survives_reset_storms(
    loop_errors: list[dict[str, Any]],
) -> None:
    """The kernel returns a connection reset in the backlog; ``getpeername()`` on it failed
    with ENOTCONN, which failed the accept and closed the listener (gh-93821 on Linux).  And
    each such connection's transport raised ENOTCONN from ``shutdown()`` when closing, which
    left its socket open."""
    await _stock_server_through_storms(loop_errors)


@pytest.mark.uring
async def test_an_accept_whose_connection_is_gone_is_submitted_again(
    loop_errors: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same storms with the peer address taken from ``getpeername()`` (as for a family the
    proactor does not decode): ENOTCONN for a reset connection re-arms the accept; the future
    never fails for it."""
    monkeypatch.setattr(uring_proactor, "_peer_address", lambda address: None)
    proactor = asyncio.get_running_loop()._proactor  # type: ignore[attr-defined]
    before = proactor.accepts_retried
    await _stock_server_through_storms(loop_errors)
    assert proactor.accepts_retried > before  # the storm really hit that path


@pytest.mark.uring
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
async def test_accept_gives_the_peer_address_from_the_kernel(
    family: socket.AddressFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ACCEPT's own sockaddr, as ``getpeername()`` would give it, without calling it."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError as exc:  # pragma: no cover - a machine without IPv6 loopback
        pytest.fail(f"cannot listen on {host}: {exc}")

    def refuse(self: socket.socket) -> Any:
        raise AssertionError("getpeername() called")

    monkeypatch.setattr(uring_proactor._AcceptedSocket, "getpeername", refuse)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    accepting = loop._proactor.accept(listener)  # type: ignore[attr-defined]
    client = socket.socket(family)
    client.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(client, listener.getsockname()), 10)
    conn, peer = await asyncio.wait_for(accepting, 10)
    assert peer == client.getsockname()
    assert conn.getsockname() == client.getpeername()
    for sock in (conn, client, listener):
        sock.close()


@pytest.mark.uring
async def test_an_accept_error_of_the_listener_itself_still_fails_the_accept() -> None:
    """Only a connection's own errors are retried: a socket that is not listening fails the
    accept at once (retrying would spin)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    with pytest.raises(OSError, match="Invalid argument") as failed:
        await asyncio.wait_for(loop._proactor.accept(sock), 10)  # type: ignore[attr-defined]
    assert failed.value.errno == errno.EINVAL
    sock.close()


# -- what a closed server leaves behind ------------------------------------------------------


def _no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve on asyncio's transports, accepting with the server's own accept loop."""

    def unavailable(loop: asyncio.AbstractEventLoop, *, max_read: int) -> Any:
        raise OSError(errno.ENOSYS, "no engine in this test")

    monkeypatch.setattr(_platform.backend(), "make_engine", unavailable)


async def test_a_connection_accepted_as_the_server_closes_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accept completes, and the server closes before its accept loop has taken the
    connection: the accept loop is cancelled with the accepted socket in its future, and
    must close it (``_abandon_accept``), or it stays open with nobody serving it."""
    _no_engine(monkeypatch)
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    accepted: list[socket.socket] = []

    def close_server(future: asyncio.Future[tuple[socket.socket, Any]]) -> None:
        # Runs before the accept loop's task wakes up for the same future.
        if not future.cancelled() and future.exception() is None:
            accepted.append(future.result()[0])
            server.close()

    # The accept loops' tasks have not run yet: these callbacks come before their wake-ups.
    for future in list(server._accepts):
        future.add_done_callback(close_server)
    # One iteration for the tasks to start awaiting (awaiting an accept that is already done
    # would take its connection at once, before any callback runs).
    await asyncio.sleep(0)
    client = await connect(server.port)
    await asyncio.wait_for(server.wait_closed(), 10)
    assert len(accepted) == 1
    try:
        assert accepted[0].fileno() == -1
        try:
            assert await recv_until_eof(client, timeout=10) == b""
        except ConnectionError:
            pass  # reset: as closed as an end of file
    finally:
        for sock in (*accepted, client):
            sock.close()
    assert server.stats().total_connections == 0
    # (IOCP: the client's last read, done at once, still has its packet to dequeue)
    await wait_until(lambda: _loop_operations() == [], what="the client's operations dequeued")
    assert_nothing_left(server)


def _loop_operations() -> list[str]:
    return [op.kind for op in iocp_echo.pending_operations() if op.kind != "wakeup"]


def _our_timers(loop: asyncio.AbstractEventLoop, owner: object) -> list[asyncio.TimerHandle]:
    """Timers on *loop* still due to call a method of *owner*."""
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    return [
        handle
        for handle in scheduled
        if not handle.cancelled() and getattr(handle._callback, "__self__", None) is owner  # type: ignore[attr-defined]
    ]


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "asyncio-transports"])
async def test_idle_connection_is_closed_and_closing_cancels_the_sweep_timer(
    monkeypatch: pytest.MonkeyPatch, engine: bool
) -> None:
    """The idle timeout is one sweep timer per server: it closes a connection with no traffic,
    and closing the server cancels it, leaving no timer of the server's on the loop."""
    if not engine:
        _no_engine(monkeypatch)
    loop = asyncio.get_running_loop()
    server = await iocp_echo.serve_echo("127.0.0.1", 0, idle_timeout=0.3)
    assert len(_our_timers(loop, server)) == 1  # the sweep, and only it
    client = await connect(server.port)
    await wait_until(lambda: server.stats().open_connections == 1)
    try:
        assert await recv_until_eof(client, timeout=10) == b""
    except ConnectionError:
        pass  # aborted: a reset is as closed as an end of file
    client.close()
    await wait_until(lambda: server.stats().open_connections == 0)
    assert len(_our_timers(loop, server)) == 1  # still sweeping while it serves
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)
    assert _our_timers(loop, server) == []
    assert_nothing_left(server)
