"""Health and drain: ``/healthz``, ``/readyz``, ``EchoServer.shutdown(drain_seconds)``, and
the CLI's ``--drain-seconds`` on a stop signal, alone and under ``--workers``.

What a load balancer needs: ``/readyz`` goes 503 *before* the server stops accepting, and the
server keeps serving (and accepting) through the drain window, so that its health check takes
the instance out without a single refused connection.  The in-process tests run natively and
under Wine; the CLI tests run the command natively, and under Wine (``wine_cli``) with a real
Ctrl-C, which Wine delivers to the Windows process as a console event.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import iocp_echo
from iocp_echo import admin
from iocp_echo.admin import start_admin

from .helpers import connect, recv_exactly, recv_until_eof, wait_until

pytestmark = pytest.mark.backend

ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo.py")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) ")
ADMIN = re.compile(r"admin snapshot on http://127\.0\.0\.1:(\d+)/")


async def http(
    port: int, path: str, *, method: str = "GET", host: str | None = None
) -> tuple[int, str, bytes]:
    """One request (no ``Host`` unless given, as HAProxy's check sends it): status, head, body."""
    sock = await connect(port)
    try:
        head = f"{method} {path} HTTP/1.0\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, head.encode())
        answer = await recv_until_eof(sock, timeout=30)
    finally:
        sock.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), head_bytes.decode("latin-1"), body


async def echoes(port: int, payload: bytes = b"ping") -> bool:
    sock = await connect(port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        return await recv_exactly(sock, len(payload)) == payload
    finally:
        sock.close()


async def test_probes_answer_without_a_host_and_the_snapshot_still_needs_one() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    async with server, await start_admin(server, 0) as endpoint:
        status, head, body = await http(endpoint.port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert "Content-Type: text/plain; charset=utf-8" in head
        status, _, body = await http(endpoint.port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        status, head, body = await http(endpoint.port, "/metrics", host="evil.example")
        assert status == 200 and b"iocp_echo_ready 1" in body
        assert "text/plain; version=0.0.4" in head
        status, _, body = await http(endpoint.port, "/")  # no Host: refused, nothing told
        assert status == 403 and b"operations" not in body
        status, head, body = await http(endpoint.port, "/readyz", method="HEAD")
        assert status == 200 and body == b"" and "Content-Length: 6" in head


async def test_the_snapshot_is_for_this_machine_only() -> None:
    """``GET /`` lists peers: refused to a client elsewhere even with a loopback Host (the
    endpoint may listen on every address for probes, with ``--admin-host 0.0.0.0``)."""
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        endpoint = admin.AdminEndpoint(server, 5.0)
        head = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
        with pytest.raises(admin._Refusal) as refused:
            await endpoint._answer(head, ("192.0.2.7", 40000))
        assert refused.value.status == "403 Forbidden"
        status, _, body = await endpoint._answer(head, ("127.0.0.1", 40000))
        assert status == "200 OK" and b'"operations"' in body
        status, _, body = await endpoint._answer(b"GET /readyz HTTP/1.0\r\n\r\n", ("192.0.2.7", 1))
        assert (status, body) == ("200 OK", b"ready\n")


async def test_readyz_says_full_at_max_connections_and_ready_again_below() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0, max_connections=2)
    async with server, await start_admin(server, 0) as endpoint:
        first, second = await connect(server.port), await connect(server.port)
        try:
            await wait_until(lambda: server.stats().open_connections == 2, what="2 open")
            status, _, body = await http(endpoint.port, "/readyz")
            assert (status, body) == (503, b"full\n")
            first.close()
            await wait_until(lambda: server.stats().open_connections == 1, what="1 open")
            status, _, body = await http(endpoint.port, "/readyz")
            assert (status, body) == (200, b"ready\n")
        finally:
            first.close()
            second.close()


async def test_a_draining_server_is_not_ready_yet_serves_and_accepts_until_the_drain_ends() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    endpoint = await start_admin(server, 0)
    try:
        held = await connect(server.port)  # a client that stays through the drain
        shutdown = asyncio.create_task(server.shutdown(drain_seconds=1.0))
        await wait_until(lambda: server.draining, what="draining")
        started = time.monotonic()
        status, _, body = await http(endpoint.port, "/readyz")
        assert (status, body) == (503, b"draining\n")
        assert server.is_serving() and not server.is_ready()
        assert await echoes(server.port)  # a new connection, accepted and served
        await asyncio.get_running_loop().sock_sendall(held, b"still here")
        assert await recv_exactly(held, 10) == b"still here"
        held.close()
        await asyncio.wait_for(shutdown, 30)
        assert time.monotonic() - started >= 0.5  # it waited for the drain before closing
        assert not server.is_serving() and server.readiness() == "closing"
    finally:
        endpoint.close()
        await endpoint.wait_closed()
        server.close()
        await server.wait_closed()


async def test_close_cuts_a_drain_short() -> None:
    server = await iocp_echo.serve_echo("127.0.0.1", 0)
    shutdown = asyncio.create_task(server.shutdown(drain_seconds=600))
    await wait_until(lambda: server.draining, what="draining")
    server.close()
    await asyncio.wait_for(shutdown, 30)  # not 600 s
    assert not server.is_serving()


# -- the command line ------------------------------------------------------------------------


def start(*args: str, wine: str | None = None) -> subprocess.Popen[str]:
    if wine is not None:
        command = [sys.executable, str(ROOT / "tools" / "winpy.py"), "--python", wine, ECHO]
    else:
        command = [sys.executable, ECHO]
    return subprocess.Popen(
        [*command, "--port", "0", "--admin-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        # Launched from a background job, a child inherits SIGINT ignored: give it the default.
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if sys.platform != "win32"
        else None,
    )


@pytest.fixture
def stopped_at_the_end() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(60)


def ports(process: subprocess.Popen[str]) -> tuple[int, int]:
    """The echo and admin ports the CLI printed (it prints them once it serves)."""
    assert process.stdout is not None
    port = admin_port = None
    while port is None or admin_port is None:
        line = process.stdout.readline()
        assert line, f"the CLI exited: {process.stderr.read() if process.stderr else ''}"
        if match := LISTENING.search(line):
            port = int(match.group(1))
        if match := ADMIN.search(line):
            admin_port = int(match.group(1))
    return port, admin_port


async def wait_for_exit(process: subprocess.Popen[str], timeout: float) -> int:
    await wait_until(lambda: process.poll() is not None, timeout, what="the CLI to exit")
    return process.returncode


async def drains_then_stops(process: subprocess.Popen[str], stop: int, drain: float) -> None:
    """Send *stop*; /readyz must go 503 while new connections are still echoed; then exit 0."""
    port, admin_port = ports(process)
    assert (await http(admin_port, "/readyz"))[0] == 200
    assert await echoes(port)
    process.send_signal(stop)
    signalled = time.monotonic()

    async def not_ready() -> bool:
        return (await http(admin_port, "/readyz"))[0] == 503

    deadline = time.monotonic() + 30
    while not await not_ready():
        assert time.monotonic() < deadline, "/readyz never went 503"
        await asyncio.sleep(0.05)
    status, _, body = await http(admin_port, "/readyz")
    assert (status, body) == (503, b"draining\n")
    # Not ready, yet serving: a connection made now is accepted and echoed.
    if time.monotonic() - signalled < drain - 1.0:
        assert await echoes(port, b"during the drain")
    assert await wait_for_exit(process, drain + 60) == 0
    assert time.monotonic() - signalled >= drain * 0.8  # it did wait for the drain


@pytest.mark.skipif(
    sys.platform == "win32", reason="native CLI test: under Wine see wine_cli below"
)
async def test_cli_sigterm_drains_first(stopped_at_the_end: list[subprocess.Popen[str]]) -> None:
    process = start("--drain-seconds", "4")
    stopped_at_the_end.append(process)
    await drains_then_stops(process, signal.SIGTERM, 4.0)


@pytest.mark.skipif(
    sys.platform == "win32", reason="native CLI test: under Wine see wine_cli below"
)
async def test_cli_a_second_signal_cuts_the_drain_short(
    stopped_at_the_end: list[subprocess.Popen[str]],
) -> None:
    process = start("--drain-seconds", "600")
    stopped_at_the_end.append(process)
    _, admin_port = ports(process)
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while (await http(admin_port, "/readyz"))[0] != 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert await wait_for_exit(process, 60) == 0


@pytest.mark.skipif(
    sys.platform == "win32", reason="native CLI test: under Wine see wine_cli below"
)
async def test_cli_workers_drain_behind_the_supervisor(
    stopped_at_the_end: list[subprocess.Popen[str]],
) -> None:
    process = start("--workers", "2", "--drain-seconds", "4")
    stopped_at_the_end.append(process)
    await drains_then_stops(process, signal.SIGTERM, 4.0)


@pytest.mark.wine_cli
async def test_wine_cli_ctrl_c_drains_first(
    wine_python: str, stopped_at_the_end: list[subprocess.Popen[str]]
) -> None:
    process = start("--drain-seconds", "4", wine=wine_python)
    stopped_at_the_end.append(process)
    await drains_then_stops(process, signal.SIGINT, 4.0)


def test_drain_seconds_must_not_be_negative() -> None:
    result = subprocess.run(
        [sys.executable, ECHO, "--drain-seconds", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "--drain-seconds" in result.stderr


async def test_shutdown_refuses_a_negative_drain() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        with pytest.raises(ValueError, match="drain_seconds"):
            await server.shutdown(-1)
        assert server.is_serving()


def test_the_admin_host_option_binds_where_told() -> None:
    """``--admin-host 0.0.0.0`` listens on every address (probes from other machines)."""
    process = start("--admin-host", "0.0.0.0")
    try:
        _, admin_port = ports(process)
        with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as probe:
            probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        process.kill()
        process.wait(60)
