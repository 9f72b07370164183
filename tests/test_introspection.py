"""pending_operations(): what the completion port waits on, checked against what clients do.

Run on each Windows CPython: the proactor's callbacks differ between 3.11 (finish_recv,
finish_send) and 3.12+ (one finish_socket_func), so each version's kind mapping is really used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iocp_echo
from iocp_echo import admin, inspector
from iocp_echo import server as _server

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_exactly, reset, wait_until

#: Accepts armed per listener: IOCP keeps several AcceptEx in flight; io_uring arms one
#: multishot accept (one operation however many connections it returns).
ACCEPTS_IN_FLIGHT = 1 if sys.platform.startswith("linux") else _server.ACCEPTS_IN_FLIGHT

pytestmark = pytest.mark.backend


def ops_by_peer(server: iocp_echo.EchoServer) -> dict[object, list[str]]:
    table: dict[object, list[str]] = {}
    for op in server.pending_operations():
        table.setdefault(op.peer, []).append(op.kind)
    return table


async def test_idle_server_with_one_client(server: iocp_echo.EchoServer) -> None:
    assert [op.kind for op in server.pending_operations()] == ["accept"] * ACCEPTS_IN_FLIGHT
    client = await connect(server.port)
    me = client.getsockname()
    await wait_until(lambda: me in ops_by_peer(server), what="the client's read")
    ops = server.pending_operations()
    accepts = [op for op in ops if op.kind == "accept"]
    recvs = [op for op in ops if op.kind == "recv"]
    assert len(accepts) == ACCEPTS_IN_FLIGHT and len(recvs) == 1 and len(ops) == len(accepts) + 1
    assert all(op.local == ("127.0.0.1", server.port) and op.peer is None for op in accepts)
    (recv,) = recvs
    # IOCP: a connection waiting for its client waits with a zero-byte receive (no buffer);
    # io_uring: one armed multishot receive that may take up to max_read bytes when data comes
    quiet_size = 0 if sys.platform == "win32" else 65535
    assert recv.peer == me and recv.state == "pending" and recv.nbytes == quiet_size
    assert recv.fileno is not None and recv.local == ("127.0.0.1", server.port)
    assert 0 <= recv.age < 30
    # Loop-wide: the server's operations, the client's own read is not issued, the wakeup.
    kinds = sorted(op.kind for op in iocp_echo.pending_operations())
    assert kinds == sorted(["accept"] * ACCEPTS_IN_FLIGHT + ["recv", "wakeup"])
    client.close()


async def test_client_that_does_not_read_shows_a_send_with_bytes_and_growing_age(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    client = await connect(server.port)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    payload = os.urandom(8 * 1024 * 1024)
    sender = asyncio.ensure_future(loop.sock_sendall(client, payload))

    def sends() -> list[iocp_echo.PendingOperation]:
        ops = server.pending_operations()
        return [op for op in ops if op.kind == "send" and op.state == "pending"]

    try:
        # Once the kernel buffers are full, one send stays in flight, growing older.
        await wait_until(
            lambda: bool(sends()) and sends()[0].age > 0.2, timeout=30, what="a stuck send"
        )
        first = sends()[0]
        assert first.peer == client.getsockname()
        assert first.nbytes is not None and first.nbytes > 0
        await wait_until(lambda: bool(sends()) and sends()[0].age > first.age + 0.1, timeout=10)
        assert sends()[0].started == first.started  # the same operation, older
        stats = server.stats()
        assert stats.pending_by_kind.get("send") == 1
        assert stats.oldest_pending_age >= 0.3
        # The client reads: the send completes and goes away.
        assert await recv_exactly(client, len(payload), timeout=120) == payload
        await sender
        await wait_until(lambda: not sends(), what="the send to complete")
    finally:
        sender.cancel()
        client.close()


async def test_churn_and_resets_return_to_baseline(server: iocp_echo.EchoServer) -> None:
    baseline = sorted(op.kind for op in server.pending_operations())
    for round_ in range(3):
        socks = [await connect(server.port) for _ in range(30)]
        for index, sock in enumerate(socks):
            if index % 2:
                reset(sock)
            else:
                sock.close()
        assert await echo(server.port, b"x" * (round_ + 1)) == b"x" * (round_ + 1)
        await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
        await wait_until(
            lambda: sorted(op.kind for op in server.pending_operations()) == baseline,
            timeout=10,
            what="pending operations back to the baseline",
        )
    assert len(server.pending_operations()) == ACCEPTS_IN_FLIGHT


async def test_after_close_nothing_is_pending_but_the_loops_wakeup() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    socks = [await connect(server.port) for _ in range(10)]
    await wait_until(lambda: server.stats().open_connections == 10)
    server.close()
    await server.wait_closed()
    assert server.pending_operations() == []
    assert [op.kind for op in iocp_echo.pending_operations()] == ["wakeup"]
    assert_nothing_left(server)
    for sock in socks:
        sock.close()


async def test_stuck_warning_names_old_operations_not_fresh_ones(
    server: iocp_echo.EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    old = await connect(server.port)
    me = old.getsockname()
    await wait_until(lambda: me in ops_by_peer(server))
    await wait_until(
        lambda: any(op.peer == me and op.age > 0.3 for op in server.pending_operations())
    )
    fresh = await connect(server.port)
    fresh_me = fresh.getsockname()
    await wait_until(lambda: fresh_me in ops_by_peer(server))
    caplog.clear()
    admin.log_stats(server, stuck_after=0.3)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(info) == 1 and "connections open=2" in info[0] and "recv=2" in info[0]
    peer_text = f"{me[0]}:{me[1]}"
    assert any("recv operation pending" in w and peer_text in w for w in warnings), warnings
    assert not any(f"{fresh_me[0]}:{fresh_me[1]}" in w for w in warnings)
    old.close()
    fresh.close()


async def test_admin_endpoint_serves_the_snapshot(server: iocp_echo.EchoServer) -> None:
    endpoint = await admin.start_admin(server, 0)
    port = endpoint.sockets[0].getsockname()[1]
    assert endpoint.sockets[0].getsockname()[0] == "127.0.0.1"
    client = await connect(server.port)
    me = client.getsockname()
    await wait_until(lambda: me in ops_by_peer(server))

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    loop = asyncio.get_running_loop()
    status, body = await loop.run_in_executor(None, get, "/")
    snapshot = json.loads(body)
    assert status == 200
    assert snapshot["server"]["port"] == server.port
    assert snapshot["stats"]["open_connections"] == 1
    peers = [tuple(op["peer"]) for op in snapshot["operations"] if op["peer"]]
    assert peers == [me]
    status, _ = await loop.run_in_executor(None, get, "/elsewhere")
    assert status == 404
    table = inspector.format_snapshot(snapshot)
    assert f"{me[0]}:{me[1]}" in table and "recv" in table and "accept" in table
    endpoint.close()
    await endpoint.wait_closed()
    client.close()


async def test_pending_operations_threadsafe_from_another_thread(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    ops = await loop.run_in_executor(None, iocp_echo.pending_operations_threadsafe, loop)
    # The loop's wakeup read is being re-armed: the request itself woke the loop.
    assert [op.kind for op in ops if op.kind != "wakeup"] == ["accept"] * ACCEPTS_IN_FLIGHT


def test_snapshot_is_json_ready_and_version_tagged() -> None:
    async def scenario() -> dict[str, object]:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            loaded: dict[str, object] = json.loads(json.dumps(server.snapshot()))
            return loaded

    snapshot = iocp_echo.run(scenario())
    assert snapshot["server"]["python"] == sys.version.split()[0]  # type: ignore[index]
    assert snapshot["operations_unavailable"] is None


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["open", "write", "reset", "close"]), st.integers(0, 5)),
        min_size=1,
        max_size=25,
    )
)
def test_property_reported_operations_match_what_clients_did(
    steps: list[tuple[str, int]],
) -> None:
    """After every step, the server reports exactly: its accepts, and one read per open
    client, on that client's address; never an operation for a client that has gone."""

    async def scenario() -> None:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            loop = asyncio.get_running_loop()
            clients: list[socket.socket] = []
            for action, index in steps:
                if action == "open" or not clients:
                    clients.append(await connect(server.port))
                else:
                    sock = clients[index % len(clients)]
                    if action == "write":
                        await loop.sock_sendall(sock, b"w" * (index + 1))
                        assert await recv_exactly(sock, index + 1) == b"w" * (index + 1)
                    else:
                        clients.remove(sock)
                        reset(sock) if action == "reset" else sock.close()

                def reported() -> list[str]:
                    ops = server.pending_operations()
                    accepts = [op for op in ops if op.kind == "accept"]
                    others = sorted(str(op.peer) for op in ops if op.kind != "accept")
                    return ["accepts", str(len(accepts)), *others]

                expected = [
                    "accepts",
                    str(ACCEPTS_IN_FLIGHT),
                    *sorted(str(c.getsockname()) for c in clients),
                ]
                await wait_until(
                    lambda expected=expected: reported() == expected,  # type: ignore[misc]
                    timeout=10,
                    what=f"the reported operations to match {expected}",
                )
                assert all(
                    op.kind == "recv" for op in server.pending_operations() if op.kind != "accept"
                )
            for sock in clients:
                sock.close()
        assert_nothing_left(server)

    iocp_echo.run(scenario())
