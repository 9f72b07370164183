"""The admin endpoint and the ``inspect`` client, each facing a hostile other side.

The endpoint is driven with raw sockets: a client that never finishes its request, one that
asks and never reads, a web page arriving through a rebinding domain (a foreign ``Host``).
The client is pointed at fake endpoints written here: one that drips, one that never stops
talking, one that answers with the wrong JSON, or with terminal escape sequences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iocp_echo
from iocp_echo import admin, inspector
from iocp_echo._logflood import LogLimiter
from iocp_echo.introspection import PendingOperation

from .helpers import connect, recv_until_eof, wait_until

ROOT = Path(__file__).resolve().parent.parent

# --- the endpoint ---------------------------------------------------------------------------


def fake_operations(count: int, local: Any = ("127.0.0.1", 9000)) -> list[PendingOperation]:
    """*count* reads, oldest first, as ``pending_operations()`` returns them."""
    return [
        PendingOperation(
            "recv", "pending", 1000 + i, local, ("127.0.0.1", 20000 + i), 65535, float(i), 1.0
        )
        for i in range(count)
    ]


async def request(port: int, head: str) -> tuple[int, dict[str, Any]]:
    """Send *head* as is and return the status and the JSON body of the answer."""
    sock = await connect(port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, head.encode("latin-1"))
        answer = await recv_until_eof(sock, timeout=30)
    finally:
        sock.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(body)


def get(path: str = "/", host: str | None = "127.0.0.1") -> str:
    return f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + "\r\n"


@pytest.mark.backend
async def test_get_serves_stats_and_the_oldest_operations(server: iocp_echo.EchoServer) -> None:
    client = await connect(server.port)
    me = client.getsockname()
    await wait_until(lambda: any(op.peer == me for op in server.pending_operations()))
    async with await admin.start_admin(server, 0) as endpoint:
        assert endpoint.sockets[0].getsockname()[0] == "127.0.0.1"
        status, document = await request(endpoint.port, get(host=f"127.0.0.1:{endpoint.port}"))
    client.close()
    assert status == 200
    assert document["server"]["port"] == server.port
    assert document["stats"]["open_connections"] == 1
    assert [tuple(op["peer"]) for op in document["operations"] if op["peer"]] == [me]
    assert document["operations_total"] == len(document["operations"])
    assert document["operations_limit"] == admin.DEFAULT_OPERATIONS_LIMIT
    assert document["operations_unavailable"] is None


@pytest.mark.backend
async def test_an_answer_lists_at_most_limit_operations_with_their_total(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 connections must not mean a 2 MB answer: the oldest N, and how many there are."""
    with monkeypatch.context() as patch:
        patch.setattr(server, "pending_operations", lambda: fake_operations(10_000))
        async with await admin.start_admin(server, 0) as endpoint:
            sock = await connect(endpoint.port)
            await asyncio.get_running_loop().sock_sendall(sock, get().encode())
            raw = await recv_until_eof(sock)
            sock.close()
            _, limited = await request(endpoint.port, get("/?limit=3"))
            _, summary = await request(endpoint.port, get("/?limit=0"))
    document = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert len(document["operations"]) == admin.DEFAULT_OPERATIONS_LIMIT
    assert document["operations_total"] == 10_000
    assert len(raw) < 30_000  # 100 operations of about 150 bytes
    assert [op["fileno"] for op in limited["operations"]] == [1000, 1001, 1002]  # the oldest
    assert limited["operations_total"] == 10_000 and limited["operations_limit"] == 3
    assert summary["operations"] == [] and summary["stats"]["pending_by_kind"] == {"recv": 10_000}
    assert summary["operations_total"] == 10_000


@pytest.mark.backend
@pytest.mark.parametrize(
    "query",
    ["limit=1001", "limit=-1", "limit=x", "limit=", "limit=1&limit=2", "operations=all", "a"],
)
async def test_a_bad_query_is_refused(server: iocp_echo.EchoServer, query: str) -> None:
    async with await admin.start_admin(server, 0) as endpoint:
        status, document = await request(endpoint.port, get(f"/?{query}"))
    assert status == 400 and list(document) == ["error"]


@pytest.mark.backend
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}", "LocalHost", "[::1]:{port}"]
)
async def test_a_loopback_host_is_answered(server: iocp_echo.EchoServer, host: str) -> None:
    async with await admin.start_admin(server, 0) as endpoint:
        status, document = await request(endpoint.port, get(host=host.format(port=endpoint.port)))
    assert status == 200 and document["server"]["port"] == server.port


@pytest.mark.backend
@pytest.mark.parametrize(
    "head",
    [
        get(host="rebind.example:{port}"),  # what a page on a rebinding domain sends
        get(host="127.0.0.1.rebind.example"),
        get(host="localhost.rebind.example:{port}"),
        get(host="127.0.0.2:{port}"),
        get(host="127.0.0.1:99999"),
        get(host="localhost:{port}x"),
        get(host=""),
        get(host=None),
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: rebind.example\r\n\r\n",
        get("/elsewhere", host="rebind.example"),  # not even which paths exist
        "POST / HTTP/1.1\r\nHost: rebind.example\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_any_other_host_gets_an_error_and_no_data(
    server: iocp_echo.EchoServer, head: str
) -> None:
    client = await connect(server.port)
    me = client.getsockname()
    await wait_until(lambda: any(op.peer == me for op in server.pending_operations()))
    async with await admin.start_admin(server, 0) as endpoint:
        status, document = await request(endpoint.port, head.format(port=endpoint.port))
    client.close()
    assert status == 403
    assert list(document) == ["error"] and "Host" in document["error"]
    assert str(me[1]) not in json.dumps(document)


@pytest.mark.backend
@pytest.mark.parametrize(
    ("head", "status"),
    [
        (get("/elsewhere"), 404),
        ("POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", 405),
        ("GET /\r\nHost: localhost\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost localhost\r\n\r\n", 400),
    ],
)
async def test_other_requests_get_an_error(
    server: iocp_echo.EchoServer, head: str, status: int
) -> None:
    async with await admin.start_admin(server, 0) as endpoint:
        answer = await request(endpoint.port, head)
    assert answer[0] == status and list(answer[1]) == ["error"]


def fake_stuck(reads: int, accepts: int = 0) -> list[PendingOperation]:
    """*accepts* accepts and *reads* reads, about 100 s old, oldest first (read fd 1000 first)."""
    return [
        PendingOperation("accept", "pending", 100, ("127.0.0.1", 9000), None, 0, 0.0, 100.0)
        for _ in range(accepts)
    ] + [
        PendingOperation(
            "recv",
            "pending",
            1000 + i,
            ("127.0.0.1", 9000),
            ("127.0.0.1", 20000 + i),
            65535,
            float(i),
            100.0 - i / 1000,
        )
        for i in range(reads)
    ]


@pytest.mark.backend
async def test_stuck_warnings_are_rate_limited_per_kind_with_a_summary(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Tracker issue 9 item 5b: 3,000 idle clients made one WARNING each per report (11,919
    lines in 8 s).  Now: at most a burst per operation kind per interval, the oldest first,
    the count in the INFO line every time, and one summary of the rest per kind."""
    now = [1000.0]
    limiter = LogLimiter(
        logging.getLogger("iocp_echo.admin"),
        burst=admin.STUCK_LOG_BURST,
        interval=admin.STUCK_LOG_INTERVAL,
        clock=lambda: now[0],
    )
    monkeypatch.setattr(server, "pending_operations", lambda: fake_stuck(3000, accepts=4))
    caplog.clear()
    for _ in range(5):  # five reports within one interval
        admin.log_stats(server, stuck_after=30, limiter=limiter)
        now[0] += 2
    records = [r for r in caplog.records if r.name == "iocp_echo.admin"]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(infos) == 5 and all(line.endswith("| 3004 older than 30 s") for line in infos)
    reads = [w for w in warnings if w.startswith("recv operation pending")]
    accepts = [w for w in warnings if w.startswith("accept operation pending")]
    assert len(reads) == admin.STUCK_LOG_BURST  # not 15,000
    assert [w.split(" on fd ")[1].split(",")[0] for w in reads] == [
        str(1000 + i) for i in range(admin.STUCK_LOG_BURST)
    ]  # the oldest
    assert len(accepts) == admin.STUCK_LOG_BURST  # the reads did not use up the accepts' lines
    assert len(warnings) == 2 * admin.STUCK_LOG_BURST
    caplog.clear()
    now[0] += admin.STUCK_LOG_INTERVAL  # the interval is over: the next report summarises
    admin.log_stats(server, stuck_after=30, limiter=limiter)
    summaries = [r for r in caplog.records if r.getMessage().startswith("suppressed")]
    assert sorted(r.logflood_kind for r in summaries) == ["stuck accept", "stuck recv"]  # type: ignore[attr-defined]
    by_kind = {r.logflood_kind: r.logflood_suppressed for r in summaries}  # type: ignore[attr-defined]
    assert by_kind == {"stuck recv": 5 * 3000 - 10, "stuck accept": 5 * 4 - 10}
    assert all(r.levelno == logging.WARNING for r in summaries)
    new_reads = [r for r in caplog.records if r.getMessage().startswith("recv operation pending")]
    assert len(new_reads) == admin.STUCK_LOG_BURST  # a new interval, a new burst


@pytest.mark.backend
async def test_each_server_keeps_its_stuck_warning_limit_across_reports(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the CLI calls: ``log_stats(server, stuck_after)`` every --stats-every seconds."""
    monkeypatch.setattr(server, "pending_operations", lambda: fake_stuck(3000))
    caplog.clear()
    for _ in range(4):
        admin.log_stats(server, stuck_after=30)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == admin.STUCK_LOG_BURST
    caplog.clear()
    admin.flush_stats_log(server)  # closing: what was held back is summarised now
    [summary] = [r for r in caplog.records if r.name == "iocp_echo.admin"]
    assert summary.logflood_suppressed == 4 * 3000 - admin.STUCK_LOG_BURST  # type: ignore[attr-defined]
    assert "pending=11,990" in summary.getMessage()


async def open_stuck_client(
    server: iocp_echo.EchoServer, endpoint: admin.AdminEndpoint
) -> tuple[socket.socket, int]:
    """A client whose request's answer (10 MB) it never reads past the first bytes, with the
    smallest receive window it can have: the endpoint's sending cannot finish.  Returns the
    socket and the size of the complete answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", endpoint.port)), 10)
    await loop.sock_sendall(sock, get("/?limit=1000").encode())
    # The first bytes arrive: the endpoint is sending the rest now, and cannot.
    first = await asyncio.wait_for(loop.sock_recv(sock, 100), 30)
    assert first.startswith(b"HTTP/1.0 200 OK"), first
    await wait_until(lambda: endpoint.connections == 1, what="the request in progress")
    header = dict(
        line.split(": ", 1) for line in first.decode("latin-1").split("\r\n")[1:] if ": " in line
    )
    return sock, int(header["Content-Length"])


@pytest.mark.backend
async def test_a_client_that_never_reads_is_dropped_at_the_request_timeout(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracker issue 9 item 2: with no write deadline the connection stayed open for good."""
    with monkeypatch.context() as patch:
        patch.setattr(server, "pending_operations", lambda: fake_operations(1000, "x" * 10_000))
        async with await admin.start_admin(server, 0, request_timeout=1.0) as endpoint:
            sock, size = await open_stuck_client(server, endpoint)
            assert size > 9_000_000
            await wait_until(lambda: endpoint.connections == 0, timeout=20, what="the drop")
            try:
                rest = await recv_until_eof(sock, timeout=30)
            except ConnectionError:  # reset: the endpoint aborted the connection
                rest = b""
            sock.close()
    assert len(rest) < size  # cut off, not completed


@pytest.mark.backend
@pytest.mark.parametrize("partial", [b"", b"GET / HTTP/1.1\r\nHost: localhost\r\n"])
async def test_a_client_that_never_finishes_its_request_is_dropped_at_the_request_timeout(
    server: iocp_echo.EchoServer, partial: bytes
) -> None:
    """Tracker issue 9 item 12: removing the request timeout must fail a test."""
    async with await admin.start_admin(server, 0, request_timeout=0.5) as endpoint:
        sock = await connect(endpoint.port)
        await asyncio.get_running_loop().sock_sendall(sock, partial)
        await wait_until(lambda: endpoint.connections == 1, what="the request in progress")
        await wait_until(lambda: endpoint.connections == 0, timeout=20, what="the drop")
        try:
            assert await recv_until_eof(sock, timeout=30) == b""
        except ConnectionError:
            pass  # reset: as good as an end of file here
        sock.close()


@pytest.mark.backend
async def test_closing_drops_requests_in_progress_at_once(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Since 3.12 ``Server.wait_closed()`` waits for every connection: a stuck client held
    the CLI's shutdown for as long as it liked (tracker issue 9 item 2)."""
    with monkeypatch.context() as patch:
        patch.setattr(server, "pending_operations", lambda: fake_operations(1000, "x" * 10_000))
        endpoint = await admin.start_admin(server, 0, request_timeout=120)
        sock, _ = await open_stuck_client(server, endpoint)
        silent = await connect(endpoint.port)
        await wait_until(lambda: endpoint.connections == 2, what="both requests in progress")
        endpoint.close()
        async with asyncio.timeout(10):
            await endpoint.wait_closed()
        assert endpoint.connections == 0
        for client in (sock, silent):
            try:
                await recv_until_eof(client, timeout=30)
            except ConnectionError:
                pass
            client.close()


@pytest.mark.backend
@pytest.mark.uring
def test_native_cli_exits_promptly_on_sigterm_with_an_admin_request_in_progress() -> None:
    """The CLI itself: SIGTERM while a client holds an admin request open.  Before the fix,
    3.12+ waited for the request's own timeout (or for ever, for one stuck in sending)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "iocp_echo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        admin_line = process.stdout.readline()
        if "admin snapshot on http://127.0.0.1:" not in admin_line:
            pytest.fail(f"the CLI did not start: {process.communicate(timeout=30)[1]}")
        port = int(admin_line.rsplit(":", 1)[1].strip(" /\n"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as holder:
            holder.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
            # A complete request answered after it proves the holder's request is in progress.
            assert fetch_status(port) == 200
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=3)  # the request timeout is 5 s
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err


def fetch_status(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(get().encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.backend
async def test_inspect_asks_for_what_it_shows(
    server: iocp_echo.EchoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    clients = [await connect(server.port) for _ in range(3)]
    mine = [f"127.0.0.1:{client.getsockname()[1]}" for client in clients]
    await wait_until(lambda: server.stats().pending_by_kind.get("recv") == 3)
    loop = asyncio.get_running_loop()
    async with await admin.start_admin(server, 0) as endpoint:
        target = f"127.0.0.1:{endpoint.port}"
        full = await loop.run_in_executor(None, inspector.main, [target])
        full_out = capsys.readouterr().out
        one = await loop.run_in_executor(None, inspector.main, [target, "--limit", "1"])
        one_out = capsys.readouterr().out
    for client in clients:
        client.close()
    assert full == one == 0
    for address in mine:
        assert address in full_out
    total = len(full_out.splitlines()) - 3  # less the header, columns and count lines
    assert full_out.splitlines()[-1] == f"{total} pending operation(s)"
    assert len(one_out.splitlines()) == 4
    assert one_out.splitlines()[-1] == f"1 of {total} pending operation(s), oldest first"


# --- the inspect client against hostile endpoints -----------------------------------------


class FakeEndpoint:
    """A loopback listener answering each request with *respond(sock)*, in a thread."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(respond,), daemon=True)
        self.thread.start()

    def _serve(self, respond: Callable[[socket.socket], None]) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with sock:
                sock.settimeout(10)
                try:
                    head = b""
                    while b"\r\n\r\n" not in head and (chunk := sock.recv(4096)):
                        head += chunk
                    respond(sock)
                except OSError:
                    pass  # the client gave up, as it should have

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.listener.close()
        assert not self.thread.is_alive()


@pytest.fixture
def fake_endpoint() -> Iterator[Callable[[Callable[[socket.socket], None]], FakeEndpoint]]:
    started: list[FakeEndpoint] = []

    def start(respond: Callable[[socket.socket], None]) -> FakeEndpoint:
        started.append(FakeEndpoint(respond))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


def http(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def valid_snapshot() -> dict[str, Any]:
    return {
        "server": {"backend": "IOCP", "host": "127.0.0.1", "port": 9000, "python": "3.13.2"},
        "stats": {
            "open_connections": 1,
            "total_connections": 2,
            "bytes_received": 10,
            "bytes_sent": 10,
        },
        "operations": [
            {
                "kind": "recv",
                "state": "pending",
                "fileno": 104,
                "local": ["127.0.0.1", 9000],
                "peer": ["127.0.0.1", 50000],
                "nbytes": 65535,
                "age": 0.25,
            }
        ],
        "operations_total": 1,
        "operations_unavailable": None,
    }


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str, float]:
    """Run ``inspect`` in this process: status, stdout, stderr, seconds taken."""
    started = time.monotonic()
    status = inspector.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err, time.monotonic() - started


def assert_one_error_line(status: int, err: str, *words: str) -> None:
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iocp-echo inspect: cannot read "), err
    for word in words:
        assert word in lines[0]


def snapshot_with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    snapshot = valid_snapshot()
    node: Any = snapshot
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return snapshot


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"snapshot"',
        json.dumps(snapshot_with(("server",), None)).encode(),
        json.dumps(snapshot_with(("stats", "open_connections"), "1")).encode(),
        json.dumps(snapshot_with(("stats", "bytes_sent"), -1)).encode(),
        json.dumps(snapshot_with(("operations",), {})).encode(),
        json.dumps(snapshot_with(("operations", 0, "age"), None)).encode(),
        json.dumps(snapshot_with(("operations", 0, "fileno"), True)).encode(),
        json.dumps(snapshot_with(("operations", 0, "peer"), [None, 1])).encode(),
        json.dumps(snapshot_with(("operations_total",), 0.5)).encode(),
        json.dumps(snapshot_with(("operations", 0, "age"), 12345)).replace("12345", "NaN").encode(),
        json.dumps(snapshot_with(("operations", 0, "age"), 12345))
        .replace("12345", "1e999")
        .encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"\xff\xfe not utf-8",
        b"{",
    ],
    ids=lambda body: body[:40].decode("latin-1"),
)
def test_inspect_refuses_a_malformed_answer_in_one_line(
    fake_endpoint: Callable[..., FakeEndpoint], capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    endpoint = fake_endpoint(lambda sock: sock.sendall(http(body)))
    status, out, err, _ = inspect(capsys, f"127.0.0.1:{endpoint.port}")
    assert_one_error_line(status, err)
    assert out == ""


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", ["not HTTP"]),
        (b"", ["not HTTP"]),
        (http(b'{"error": "nope"}', "403 Forbidden"), ["HTTP 403 Forbidden: nope"]),
        (http(b"<html>", "500 Internal Server Error"), ["HTTP 500"]),
        (http(json.dumps(valid_snapshot()).encode())[:-10], ["cut short"]),
    ],
)
def test_inspect_refuses_an_answer_that_is_not_a_snapshot(
    fake_endpoint: Callable[..., FakeEndpoint],
    capsys: pytest.CaptureFixture[str],
    answer: bytes,
    words: list[str],
) -> None:
    endpoint = fake_endpoint(lambda sock: sock.sendall(answer))
    status, _, err, _ = inspect(capsys, f"127.0.0.1:{endpoint.port}")
    assert_one_error_line(status, err, *words)


def test_inspect_gives_up_on_a_dripping_endpoint_at_its_total_deadline(
    fake_endpoint: Callable[..., FakeEndpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte every 0.1 s never trips a per-read timeout; only a total deadline ends it."""

    def drip(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        deadline = time.monotonic() + 20  # the test's bound: the client must leave first
        while time.monotonic() < deadline:
            sock.sendall(b" ")
            time.sleep(0.1)

    endpoint = fake_endpoint(drip)
    status, _, err, took = inspect(capsys, f"127.0.0.1:{endpoint.port}", "--timeout", "1")
    assert_one_error_line(status, err, "within 1 s")
    assert took < 10


def test_inspect_gives_up_on_an_endless_answer_at_its_size_limit(
    fake_endpoint: Callable[..., FakeEndpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    def flood(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.0 200 OK\r\n\r\n[")
        for _ in range(1024):  # 64 MiB, 16 times the limit; then silence, connection open
            sock.sendall(b"0," * 32768)
        sock.settimeout(20)  # the test's bound: the client must leave first
        sock.recv(1)  # its end of file, or the timeout

    endpoint = fake_endpoint(flood)
    status, _, err, took = inspect(capsys, f"127.0.0.1:{endpoint.port}", "--timeout", "60")
    assert_one_error_line(status, err, f"larger than {inspector.MAX_RESPONSE} bytes")
    assert took < 15


def test_inspect_escapes_what_the_endpoint_says(
    fake_endpoint: Callable[..., FakeEndpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = valid_snapshot()
    snapshot["server"]["backend"] = "\x1b]0;owned\x07\x1b[2J\u202e\x9b31m"
    snapshot["operations"][0]["peer"] = ["\x1b[31mred\r", 1]
    snapshot["operations"][0]["kind"] = "recv\x00\n\x1b[1A"
    endpoint = fake_endpoint(lambda sock: sock.sendall(http(json.dumps(snapshot).encode())))
    status, out, _, _ = inspect(capsys, f"127.0.0.1:{endpoint.port}")
    assert status == 0
    assert all(" " <= char <= "~" for char in out.replace("\n", "")), out
    assert len(out.splitlines()) == 4  # no line break of the endpoint's made it through
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e\\x9b31m" in out
    assert "[\\x1b[31mred\\x0d]:1" in out or "\\x1b[31mred\\x0d:1" in out


def test_inspect_answers_without_the_error_text_escaping_either(
    fake_endpoint: Callable[..., FakeEndpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    body = json.dumps({"error": "\x1b[2J\nsecond line"}).encode()
    endpoint = fake_endpoint(lambda sock: sock.sendall(http(body, "403 \x1b[31mNo")))
    status, _, err, _ = inspect(capsys, f"127.0.0.1:{endpoint.port}")
    assert_one_error_line(status, err, "\\x1b[2J\\x0asecond line")
    assert "\x1b" not in err


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"])
def test_inspect_ignores_web_proxies(
    fake_endpoint: Callable[..., FakeEndpoint],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """A proxy must not see the peer addresses, and cannot reach the endpoint's loopback."""
    proxied = valid_snapshot()
    proxied["server"]["backend"] = "PROXY"
    proxy = fake_endpoint(lambda sock: sock.sendall(http(json.dumps(proxied).encode())))
    endpoint = fake_endpoint(lambda sock: sock.sendall(http(json.dumps(valid_snapshot()).encode())))
    monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    status, out, err, _ = inspect(capsys, f"127.0.0.1:{endpoint.port}")
    assert status == 0, err
    assert out.startswith("IOCP on 127.0.0.1:9000")
    assert proxy.accepted == 0 and endpoint.accepted == 1


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":9001", "x"])
def test_inspect_refuses_a_malformed_target(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    status, _, err, _ = inspect(capsys, target)
    assert_one_error_line(status, err, "HOST:PORT")


# --- format_snapshot against arbitrary JSON -------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

#: Every place of a snapshot that inspect reads.
PATHS: list[tuple[str | int, ...]] = [
    ("server",),
    ("stats",),
    ("operations",),
    ("operations_total",),
    ("operations_unavailable",),
    *[("server", key) for key in ("backend", "host", "port", "python")],
    *[
        ("stats", key)
        for key in ("open_connections", "total_connections", "bytes_received", "bytes_sent")
    ],
    ("operations", 0),
    *[
        ("operations", 0, key)
        for key in ("kind", "state", "fileno", "local", "peer", "nbytes", "age")
    ],
]


def assert_printable(text: str) -> None:
    assert all(" " <= char <= "~" for char in text.replace("\n", "")), repr(text)


def format_or_error(snapshot: Any) -> str:
    """The table, or the error's message; either must be safe to print."""
    try:
        return inspector.format_snapshot(snapshot)
    except inspector.InspectError as exc:
        message = str(exc)
    assert message and "\n" not in message
    return message


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=json_values)
def test_format_snapshot_takes_any_json_without_a_traceback(value: Any) -> None:
    assert_printable(format_or_error(value))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(path=st.sampled_from(PATHS), value=json_values)
def test_format_snapshot_takes_any_field_of_any_shape_without_a_traceback(
    path: tuple[str | int, ...], value: Any
) -> None:
    assert_printable(format_or_error(snapshot_with(path, value)))


@settings(max_examples=200, deadline=None)
@given(
    path=st.sampled_from(
        [
            ("server", "backend"),
            ("server", "python"),
            ("operations", 0, "kind"),
            ("operations", 0, "state"),
            ("operations", 0, "peer"),
            ("operations_unavailable",),
        ]
    ),
    text=st.text(),
)
def test_format_snapshot_prints_any_string_as_printable_ascii(
    path: tuple[str | int, ...], text: str
) -> None:
    output = inspector.format_snapshot(snapshot_with(path, text))
    assert_printable(output)
    assert len(output.splitlines()) == (2 if path == ("operations_unavailable",) else 4)
