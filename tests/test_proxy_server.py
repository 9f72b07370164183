"""A server with ``proxy_protocol=True``, driven over real sockets: exact echoes after a
header however it is cut into packets, the client it names standing in for the balancer
everywhere, and every way a header can fail (untrusted source, malformed, too long, too slow,
never finished) closing that connection with nothing echoed, one count under its outcome and
a rate-limited log line, including storms of thousands of hostile headers.

Runs on the completion engine (io_uring natively, IOCP under Wine) and, for TLS, on asyncio's
own transports with the header read off the socket first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iocp_echo
from iocp_echo.proxy_protocol import (
    MAX_V2_LENGTH,
    OUTCOMES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_header,
)

from .conftest import assert_nothing_left
from .helpers import connect, recv_exactly, reset, wait_until
from .test_proxy_protocol import hostile_bytes, outcome_of, valid_headers

pytestmark = pytest.mark.backend

ON_WINDOWS = sys.platform == "win32"
DATA = Path(__file__).resolve().parent / "data"  # a self-signed certificate for 127.0.0.1

#: The client a balancer names (documentation addresses: nobody's real machine).
CLIENT = ("203.0.113.7", 51234)
CLIENT6 = ("2001:db8::7", 4444)
BALANCED = ("192.0.2.1", 8080)
BALANCED6 = ("2001:db8::1", 8080)

HEADERS = {
    "v1": encode_v1(CLIENT, BALANCED),
    "v1 tcp6": encode_v1(CLIENT6, BALANCED6),
    "v2": encode_v2(CLIENT, BALANCED, tlvs=[(0x04, b"\x00" * 9), (0xE0, b"tenant-7")]),
    "v2 tcp6": encode_v2(CLIENT6, BALANCED6),
}


def outcomes(**counts: int) -> dict[str, int]:
    """The full ``proxy_headers`` record: every outcome, these counts, the rest 0."""
    assert set(counts) <= set(OUTCOMES), counts
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


async def wait_for_outcomes(server: iocp_echo.EchoServer, **counts: int) -> None:
    """Wait until the counters say exactly *counts* (they are updated as the loop runs)."""
    expected = outcomes(**counts)
    await wait_until(
        lambda: server.stats().proxy_headers == expected,
        timeout=30,
        what=f"proxy_headers == {expected}",
    )


async def exchange(sock: socket.socket, chunks: Sequence[bytes], expected: int) -> bytes:
    """Send *chunks* one send each while reading *expected* bytes back."""
    loop = asyncio.get_running_loop()
    reader = asyncio.ensure_future(recv_exactly(sock, expected))
    try:
        for chunk in chunks:
            await loop.sock_sendall(sock, chunk)
        return await reader
    finally:
        reader.cancel()


async def read_what_comes_back(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes; a reset ends the stream as EOF does (a
    server that closes with the client's bytes unread sends RST, and that is fine)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk


def proxy_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "iocp_echo.proxy"]


class Recorder(asyncio.Protocol):
    """An echo that remembers what its transport told it of the connection."""

    def __init__(self, made: list[Recorder]) -> None:
        self.transport: asyncio.Transport | None = None
        self.extra: dict[str, Any] = {}
        self.received = 0
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        for name in ("peername", "sockname", "proxy_peername", "proxy_header"):
            self.extra[name] = transport.get_extra_info(name)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


# -- exact echoes ----------------------------------------------------------------------------


async def send_one_byte_per_read(
    server: iocp_echo.EchoServer, sock: socket.socket, data: bytes
) -> None:
    """Send *data* a byte at a time, each one read by the server on its own: the next byte
    goes only once the server's byte count shows the last one arrived."""
    loop = asyncio.get_running_loop()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = server.stats().bytes_received
    for index in range(len(data)):
        await loop.sock_sendall(sock, data[index : index + 1])
        await wait_until(
            lambda index=index: server.stats().bytes_received == start + index + 1,  # type: ignore[misc]
            what=f"byte {index} of the header read",
        )


@pytest.mark.parametrize("delivery", ["same packet", "separate packets", "one byte per read"])
@pytest.mark.parametrize("kind", sorted(HEADERS))
async def test_exact_echo_after_a_header(kind: str, delivery: str) -> None:
    header = HEADERS[kind]
    payload = os.urandom(100_000)
    counted = "v1" if kind.startswith("v1") else "v2"
    async with await iocp_echo.serve_echo("127.0.0.1", 0, proxy_protocol=True) as server:
        sock = await connect(server.port)
        if delivery == "same packet":
            assert await exchange(sock, [header + payload], len(payload)) == payload
        elif delivery == "separate packets":
            await asyncio.get_running_loop().sock_sendall(sock, header)
            await wait_for_outcomes(server, **{counted: 1})  # read on its own, handed over
            assert await exchange(sock, [payload], len(payload)) == payload
        else:
            await send_one_byte_per_read(server, sock, header)
            await wait_for_outcomes(server, **{counted: 1})
            assert await exchange(sock, [payload[:1], payload[1:]], len(payload)) == payload
        await wait_for_outcomes(server, **{counted: 1})
        sock.close()
        await wait_until(lambda: server.stats().open_connections == 0)
        stats = server.stats()
        assert stats.bytes_received == len(header) + len(payload)  # the header came in too
        assert stats.bytes_sent == len(payload)  # and never went back out
        assert stats.errors == {}
    assert_nothing_left(server)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case=valid_headers(),
    size=st.sampled_from([0, 1, 1000, 65535, 65536, 70_000, 200_000]),
    cuts=st.lists(st.integers(0, 200_500), max_size=12),
)
def test_property_any_header_any_chunking_echoes_exactly(
    case: tuple[bytes, ProxyHeader], size: int, cuts: list[int]
) -> None:
    """Whatever the header, whatever the payload's size (up to and past one 65,535-byte
    read), however header and payload are cut into sends: the payload comes back exactly,
    and the header is counted under its version."""
    header, parsed = case
    payload = os.urandom(size)
    stream = header + payload
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    counted = "local" if parsed.command == "LOCAL" else f"v{parsed.version}"

    async def scenario() -> None:
        async with await iocp_echo.serve_echo("127.0.0.1", 0, proxy_protocol=True) as server:
            sock = await connect(server.port)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert await exchange(sock, chunks, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert await read_what_comes_back(sock) == b""
            sock.close()
            await wait_for_outcomes(server, **{counted: 1})
        assert_nothing_left(server)

    iocp_echo.run(scenario())


# -- the client behind the balancer ----------------------------------------------------------


@pytest.mark.parametrize(("kind", "client"), [("v1", CLIENT), ("v2 tcp6", CLIENT6)])
async def test_the_named_client_replaces_the_balancer_everywhere(
    kind: str, client: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The protocol's transport, pending_operations(), the snapshot and the log all name the
    client from the header; the balancer's own address stays as ``proxy_peername``."""
    made: list[Recorder] = []
    async with await iocp_echo.serve(
        lambda: Recorder(made), "127.0.0.1", 0, proxy_protocol=True
    ) as server:
        sock = await connect(server.port)
        balancer = sock.getsockname()
        assert await exchange(sock, [HEADERS[kind] + b"hello"], 5) == b"hello"
        [recorder] = made
        assert recorder.extra["peername"] == client
        assert recorder.extra["proxy_peername"] == balancer
        assert recorder.extra["proxy_header"] == parse_header(HEADERS[kind])
        assert recorder.extra["sockname"] == ("127.0.0.1", server.port)
        assert recorder.received == 5  # the header was not delivered as data
        # A read is in flight for the connection: it is listed under the client's address.
        await wait_until(lambda: any(op.kind == "recv" for op in server.pending_operations()))
        peers = {op.peer for op in server.pending_operations() if op.kind != "accept"}
        assert peers == {client}
        snapshot = server.snapshot()
        assert {tuple(op["peer"]) for op in snapshot["operations"] if op["kind"] != "accept"} == {
            client
        }
        assert snapshot["server"]["proxy_protocol"] is True
        assert snapshot["stats"]["proxy_headers"] == outcomes(**{kind[:2]: 1})
        # The log names the client too (here, the line saying the connection closed).
        sock.close()
        await wait_until(lambda: server.stats().open_connections == 0)
    closed = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" closed")]
    host = f"[{client[0]}]" if ":" in client[0] else client[0]
    assert closed == [f"connection from {host}:{client[1]} closed"], closed
    assert_nothing_left(server)


@pytest.mark.parametrize(
    ("kind", "header"),
    [
        ("local", encode_v2(None, None, local=True)),
        ("local", encode_v2(None, None, local=True, tlvs=[(0x05, b"health-check")])),
        ("v2", encode_v2(None, None)),  # UNSPEC
        ("v1", encode_v1(None, None)),  # UNKNOWN
    ],
)
async def test_a_header_without_an_address_keeps_the_socket_own(kind: str, header: bytes) -> None:
    """LOCAL (a balancer's own health check), v2 UNSPEC and v1 UNKNOWN: served, and the
    connection's peer is the socket's peer."""
    made: list[Recorder] = []
    async with await iocp_echo.serve(
        lambda: Recorder(made), "127.0.0.1", 0, proxy_protocol=True
    ) as server:
        sock = await connect(server.port)
        own = sock.getsockname()
        assert await exchange(sock, [header + b"ping"], 4) == b"ping"
        [recorder] = made
        assert recorder.extra["peername"] == own
        assert recorder.extra["proxy_peername"] == own
        proxy_header = recorder.extra["proxy_header"]
        assert proxy_header == parse_header(header)
        assert proxy_header.command == ("LOCAL" if kind == "local" else "PROXY")
        await wait_until(lambda: any(op.kind == "recv" for op in server.pending_operations()))
        assert {op.peer for op in server.pending_operations() if op.kind != "accept"} == {own}
        sock.close()
        await wait_for_outcomes(server, **{kind: 1})
    assert_nothing_left(server)


# -- refusals --------------------------------------------------------------------------------


async def test_an_untrusted_source_is_closed_before_a_byte_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """proxy_from="10.0.0.0/8" and a client on 127.0.0.1: closed at once (not after the
    header deadline), nothing read, counted, logged once with the reason."""
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, proxy_protocol=True, proxy_from="10.0.0.0/8", proxy_header_timeout=60
    ) as server:
        loop = asyncio.get_running_loop()
        silent = await connect(server.port)
        started = time.monotonic()
        assert await read_what_comes_back(silent, timeout=10) == b""
        assert time.monotonic() - started < 10  # (60 s would be the header's deadline)
        silent.close()
        talker = await connect(server.port)
        try:
            await loop.sock_sendall(talker, HEADERS["v1"] + b"echo me")
        except ConnectionError:
            pass  # already closed
        assert await read_what_comes_back(talker) == b""
        talker.close()
        await wait_for_outcomes(server, untrusted=2)
        stats = server.stats()
        assert stats.bytes_received == 0 and stats.bytes_sent == 0
        assert stats.open_connections == 0
    lines = [r.getMessage() for r in proxy_lines(caplog)]
    assert len(lines) == 2, lines  # one as it is, one summary at close
    assert "untrusted" in lines[0] and "10.0.0.0/8" in lines[0] and "127.0.0.1:" in lines[0]
    assert lines[1].startswith("suppressed 1 'untrusted' message")
    assert_nothing_left(server)


Act = Callable[[socket.socket, iocp_echo.EchoServer], Awaitable[None]]


async def half_then_keep(sock: socket.socket, server: iocp_echo.EchoServer) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, HEADERS["v1"][:20])


async def half_then_close(sock: socket.socket, server: iocp_echo.EchoServer) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, HEADERS["v2"][:20])
    sock.shutdown(socket.SHUT_WR)


async def half_then_reset(sock: socket.socket, server: iocp_echo.EchoServer) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, HEADERS["v2"][:20])
    # Reset only once the server has accepted (a reset overtaking the accept would be a
    # failed accept, not a connection), and on the engine once it holds the half header
    # (asyncio's transports read the header before there is a connection to count bytes).
    await wait_until(lambda: server.stats().total_connections == 1)
    if not server.engine_name.startswith(STOCK):
        await wait_until(lambda: server.stats().bytes_received == 20)
    reset(sock)


def sender(data: bytes) -> Act:
    async def send(sock: socket.socket, server: iocp_echo.EchoServer) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(sock, data)
        except ConnectionError:
            pass  # refused before all of it was sent

    return send


REFUSALS: dict[str, tuple[str, Act]] = {
    "malformed (HTTP)": ("malformed", sender(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")),
    "malformed (TLS hello)": ("malformed", sender(bytes([0x16, 3, 1, 2, 0, 1, 0, 1, 0xFC]))),
    "malformed (v1 TCP4 with IPv6)": ("malformed", sender(b"PROXY TCP4 ::1 ::2 1 2\r\nhi")),
    "malformed (v2 UDP)": ("malformed", sender(V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12))),
    "too long (v2 length)": (
        "too_long",
        sender(V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(MAX_V2_LENGTH)),
    ),
    "too long (v1 without CRLF)": ("too_long", sender(b"PROXY " + b"A" * 500)),
    "timeout (half a header, then nothing)": ("timeout", half_then_keep),
    "incomplete (half a header, then EOF)": ("incomplete", half_then_close),
    "incomplete (half a header, then reset)": ("incomplete", half_then_reset),
}

#: The engine name of a server on asyncio's own transports (TLS).
STOCK = "asyncio proactor transports"


@pytest.mark.parametrize("tls", [False, True], ids=["engine", "tls"])
@pytest.mark.parametrize("name", list(REFUSALS))
async def test_a_refused_header_closes_its_connection_and_echoes_nothing(
    name: str, tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Each way a header can fail, on the engine's connections and on asyncio's (TLS, where
    the header is read off the socket first): the connection is closed, not a byte comes
    back, one count under its outcome and nothing else, one line in the proxy log and no
    traceback; and the server goes on serving."""
    outcome, act = REFUSALS[name]
    server_context, client_context = tls_contexts()
    async with await iocp_echo.serve_echo(
        "127.0.0.1",
        0,
        proxy_protocol=True,
        proxy_header_timeout=0.3,
        ssl=server_context if tls else None,
    ) as server:
        assert server.engine_name.startswith(STOCK) is tls, server.engine_name
        sock = await connect(server.port)
        await act(sock, server)
        if sock.fileno() != -1:
            assert await read_what_comes_back(sock) == b""
            sock.close()
        await wait_for_outcomes(server, **{outcome: 1})
        await wait_until(lambda: server.stats().open_connections == 0)
        stats = server.stats()
        assert stats.bytes_sent == 0
        assert stats.total_connections == 1
        # Every refusal, a reset before the header was complete included, is the PROXY
        # header's outcome only: counted and logged once, there (on either transport).
        lost: dict[str, int] = {}
        assert stats.errors == lost, stats.errors
        # Still serving: the next connection's header is fine.
        if tls:
            _, writer = await tls_echo_behind_a_header(server, HEADERS["v2"], client_context)
            writer.close()
            await writer.wait_closed()
        else:
            sock = await connect(server.port)
            assert await exchange(sock, [HEADERS["v2"] + b"next"], 4) == b"next"
            sock.close()
        await wait_for_outcomes(server, **{outcome: 1, "v2": 1})
    lines = proxy_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert outcome.replace("_", " ") in message and "127.0.0.1:" in message, message
    assert lines[0].levelno == (logging.INFO if outcome == "incomplete" else logging.WARNING)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    others = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name != "iocp_echo.proxy"
    ]
    assert len(others) == len(lost), others
    assert all("127.0.0.1:" in line and "lost" in line for line in others), others
    assert_nothing_left(server)


async def test_the_idle_timeout_leaves_a_header_to_its_own_deadline() -> None:
    """An ``idle_timeout`` shorter than ``proxy_header_timeout`` does not close a connection
    still sending its header: that is the header deadline's call, and it is counted."""
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=1.0, idle_timeout=0.2
    ) as server:
        sock = await connect(server.port)
        started = time.monotonic()
        await half_then_keep(sock, server)
        assert await read_what_comes_back(sock) == b""
        sock.close()
        await wait_for_outcomes(server, timeout=1)
        assert time.monotonic() - started >= 0.9  # the header deadline, not the idle timeout
        await wait_until(lambda: server.stats().open_connections == 0)
    assert_nothing_left(server)


async def test_a_slow_header_one_byte_per_100_ms_times_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that trickles its header (a slowloris) is closed at the deadline, however
    steadily it sends: the deadline is for the whole header, not between bytes."""
    loop = asyncio.get_running_loop()
    header = HEADERS["v1"]
    sent = 0

    async def trickle(sock: socket.socket) -> None:
        nonlocal sent
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(header)):
            try:
                await loop.sock_sendall(sock, header[index : index + 1])
            except ConnectionError:
                return
            sent += 1
            await asyncio.sleep(0.1)  # the input's pace, not a wait for a result

    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=0.5
    ) as server:
        sock = await connect(server.port)
        started = time.monotonic()
        trickling = asyncio.ensure_future(trickle(sock))
        try:
            assert await read_what_comes_back(sock, timeout=10) == b""
            closed_after = time.monotonic() - started
        finally:
            trickling.cancel()
        sock.close()
        await wait_for_outcomes(server, timeout=1)
        await wait_until(lambda: server.stats().open_connections == 0)
    assert 0.5 <= closed_after < 3.0, closed_after
    assert sent < len(header)  # cut off mid-header
    [line] = proxy_lines(caplog)
    assert "timeout" in line.getMessage() and "0.5 s" in line.getMessage()
    assert_nothing_left(server)


# -- storms ----------------------------------------------------------------------------------


#: The storms' sizes.  Natively: the issue's 10,000 on one server (about 3 s here) and about
#: 10,000 more from hypothesis in 300 batches (about 8 s).  Under Wine a connection costs the
#: in-process client and server about 3 ms (10,000 took 30 to 46 s): 3,000 and 100 batches
#: (about 3,300) keep each test near 10 s there.
STORM = 3_000 if ON_WINDOWS else 10_000
HOSTILE_BATCHES = 100 if ON_WINDOWS else 300
#: Connections in flight at once (more only adds contention here: 20 was fastest natively
#: and under Wine).
CONCURRENCY = 20


async def storm(port: int, streams: Sequence[bytes]) -> list[bytes]:
    """Open one connection per stream, :data:`CONCURRENCY` at a time: send it, half-close,
    read whatever comes back until the server closes.  The client always ends with a reset,
    so that thousands of connections leave no TIME_WAIT behind on the client's ports."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(data: bytes) -> bytes:
        async with gate:
            sock = await connect(port)
            try:
                try:
                    await loop.sock_sendall(sock, data)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # refused (and reset) before all of it was sent
                return await read_what_comes_back(sock, timeout=60)
            finally:
                reset(sock)

    return await asyncio.gather(*(one(data) for data in streams))


def expected_storm(streams: Sequence[bytes]) -> tuple[Counter[str], list[bytes]]:
    """The outcome each stream must get, and what must come back (what followed a valid
    header; nothing for a refused one)."""
    counts: Counter[str] = Counter()
    echoes = []
    for data in streams:
        counts[outcome_of(data)] += 1
        try:
            header = parse_header(data)
        except ProxyHeaderError:
            header = None
        echoes.append(data[header.length :] if header is not None else b"")
    return counts, echoes


async def assert_no_leak(server: iocp_echo.EchoServer) -> None:
    """Every connection gone and nothing of them left in flight: only the accepts remain."""
    await wait_until(lambda: server.stats().open_connections == 0, timeout=60)
    await wait_until(
        lambda: {op.kind for op in server.pending_operations()} <= {"accept"},
        timeout=30,
        what="only accepts in flight",
    )
    assert server.stats().errors == {}


class ProxyLog(logging.Handler):
    """The records of the ``iocp_echo.proxy`` logger while installed (``with ProxyLog()``):
    hypothesis runs many examples in one test, so caplog's one list would mix them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("iocp_echo.proxy")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ProxyLog:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def as_is(self) -> Counter[str]:
        """Refusal lines logged as they are, by outcome."""
        return Counter(_kind_of(r) for r in self.records if not _is_summary(r))

    def summarised(self) -> Counter[str]:
        """Refusals counted in summary lines instead, by outcome."""
        counts: Counter[str] = Counter()
        for record in filter(_is_summary, self.records):
            counts[record.__dict__["logflood_kind"]] += record.__dict__["logflood_suppressed"]
        return counts


def _is_summary(record: logging.LogRecord) -> bool:
    return "logflood_kind" in record.__dict__  # the limiter's extras: what it stands for


def _kind_of(record: logging.LogRecord) -> str:
    """The outcome an as-is refusal line is about ("... PROXY header too long: ...")."""
    message = record.getMessage()
    for outcome in OUTCOMES:
        if f"PROXY header {outcome.replace('_', ' ')}:" in message:
            return outcome
    raise AssertionError(f"not a refusal line: {message}")


def assert_log_accounts_for(log: ProxyLog, counts: Counter[str], elapsed: float) -> None:
    """At most one line per kind of refusal per minute as it is (the issue's promise), and
    every other refusal counted in exactly one summary."""
    refused = {k: v for k, v in counts.items() if k not in ("v1", "v2", "local")}
    windows = 1 + int(elapsed // 60)
    as_is, summarised = log.as_is(), log.summarised()
    assert set(as_is) == set(refused), (as_is, refused)
    for kind, count in refused.items():
        assert 1 <= as_is[kind] <= windows, (kind, as_is)
        assert as_is[kind] + summarised[kind] == count, (kind, as_is, summarised)
    assert len(log.records) <= 2 * windows * len(refused)


@settings(max_examples=HOSTILE_BATCHES, deadline=None, suppress_health_check=list(HealthCheck))
@given(streams=st.lists(hostile_bytes, min_size=20, max_size=100))
def test_property_hostile_first_bytes_over_real_connections(streams: list[bytes]) -> None:
    """Batches of hypothesis's hostile byte strings (random bytes, damaged and oversized
    headers, half headers), each sent on its own real connection, concurrently, each batch
    to a new server (:data:`HOSTILE_BATCHES`: fewer under Wine, where a connection costs
    more).  The server counts each connection under exactly the outcome the parser gives its
    bytes, echoes only what followed a valid header, leaves nothing behind, and logs each
    kind of refusal once, the rest in a summary at close."""
    counts, echoes = expected_storm(streams)

    async def scenario() -> None:
        started = time.monotonic()
        with ProxyLog() as log:
            async with await iocp_echo.serve_echo(
                "127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=30
            ) as server:
                assert await storm(server.port, streams) == echoes
                await wait_for_outcomes(server, **counts)
                await assert_no_leak(server)
            assert_nothing_left(server)
        assert_log_accounts_for(log, counts, time.monotonic() - started)

    iocp_echo.run(scenario())


def hostile_streams(count: int, seed: int) -> list[bytes]:
    """*count* first-bytes as a fuzzer or a broken balancer would send them, from a seeded
    generator (repeatable): valid headers damaged by flips, cuts, insertions and oversized
    lengths, near-headers, random bytes, and a few intact headers."""
    rng = random.Random(seed)

    def address(v6: bool) -> tuple[str, int]:
        if v6:
            return (":".join(f"{rng.getrandbits(16):x}" for _ in range(8)), rng.randrange(65536))
        return (".".join(str(rng.randrange(256)) for _ in range(4)), rng.randrange(65536))

    def valid() -> bytes:
        v6 = rng.random() < 0.5
        source, destination = address(v6), address(v6)
        if rng.random() < 0.5:
            return encode_v1(source, destination)
        tlvs = [(rng.randrange(256), rng.randbytes(rng.randrange(40))) for _ in range(3)]
        return encode_v2(source, destination, tlvs=tlvs, local=rng.random() < 0.1)

    streams = []
    for _ in range(count):
        data = valid()
        how = rng.randrange(8)
        if how == 0:
            index = rng.randrange(len(data))
            data = data[:index] + bytes([data[index] ^ rng.randrange(1, 256)]) + data[index + 1 :]
        elif how == 1:
            data = data[: rng.randrange(len(data))]
        elif how == 2:
            index = rng.randrange(len(data))
            data = data[:index] + rng.randbytes(rng.randrange(1, 8)) + data[index:]
        elif how == 3:
            data = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", rng.randrange(4081, 65536))
        elif how == 4:
            data = b"PROXY " + bytes(rng.choice(b"0123456789.: TCP") for _ in range(110))
        elif how == 5:
            data = rng.randbytes(rng.randrange(300))
        elif how == 6:
            data = b"PROXY " + rng.randbytes(rng.randrange(30))
        else:
            data = data + rng.randbytes(rng.randrange(20))  # intact, then the client's bytes
        streams.append(data)
    return streams


async def test_ten_thousand_hostile_headers_one_server() -> None:
    """The issue's goal: 10,000 hostile first-bytes (:data:`STORM`: 3,000 under Wine, where a
    connection costs more) on real connections to one server, from a seeded generator of
    the kinds hypothesis draws above, as a bulk loop.  No crash, no leak, counters exact
    (each connection under the outcome the parser gives its bytes), the echo only of what
    followed a valid header, and the log: at most one line per kind per minute as it is,
    every other refusal counted in a summary, and those summaries logged at close."""
    streams = hostile_streams(STORM, seed=15)
    counts, echoes = expected_storm(streams)
    assert {"malformed", "too_long", "incomplete"} <= set(counts), counts  # every kind hit
    started = time.monotonic()
    with ProxyLog() as log:
        async with await iocp_echo.serve_echo(
            "127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=30
        ) as server:
            assert await storm(server.port, streams) == echoes
            await wait_for_outcomes(server, **counts)
            assert sum(server.stats().proxy_headers.values()) == STORM
            assert server.stats().total_connections == STORM
            await assert_no_leak(server)
            if time.monotonic() - started < 60:
                assert not [r for r in log.records if _is_summary(r)]  # none due before close
            as_is_before_close = log.as_is()
        assert_nothing_left(server)
    assert log.as_is() == as_is_before_close
    assert_log_accounts_for(log, counts, time.monotonic() - started)


# -- TLS -------------------------------------------------------------------------------------


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(DATA / "localhost.crt", DATA / "localhost.key")
    client_context = ssl.create_default_context(cafile=str(DATA / "localhost.crt"))
    return server_context, client_context


async def tls_echo_behind_a_header(
    server: iocp_echo.EchoServer, header: bytes, client_context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The header in clear, then TLS on the same connection, and a 300,000-byte echo."""
    sock = await connect(server.port)
    await asyncio.get_running_loop().sock_sendall(sock, header)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_context, server_hostname="127.0.0.1"
    )
    payload = os.urandom(300_000)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
    return reader, writer


@pytest.mark.parametrize("kind", ["v1", "v2 tcp6"])
async def test_tls_behind_a_proxy_header(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """The header in clear, then TLS on the same connection (HAProxy's ``send-proxy`` in
    front of a TLS server): exact echo, counted, and the log names the client."""
    server_context, client_context = tls_contexts()
    client = CLIENT if kind == "v1" else CLIENT6
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, ssl=server_context, proxy_protocol=True
    ) as server:
        _, writer = await tls_echo_behind_a_header(server, HEADERS[kind], client_context)
        await wait_for_outcomes(server, **{kind[:2]: 1})
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.stats().open_connections == 0)
    assert server.stats().bytes_received == 300_000
    host = f"[{client[0]}]" if ":" in client[0] else client[0]
    opened = [r.getMessage() for r in caplog.records if "connection opened" in r.getMessage()]
    assert opened == [f"connection opened from {host}:{client[1]}"]
    assert_nothing_left(server)


async def test_tls_pending_operations_name_the_client() -> None:
    """On asyncio's transports (TLS) too, introspection names the client, not the balancer."""
    server_context, client_context = tls_contexts()
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, ssl=server_context, proxy_protocol=True
    ) as server:
        _, writer = await tls_echo_behind_a_header(server, HEADERS["v1"], client_context)
        try:
            await wait_until(lambda: any(op.kind == "recv" for op in server.pending_operations()))
            peers = {op.peer for op in server.pending_operations() if op.kind != "accept"}
            snapshot = server.snapshot()
            listed = {tuple(op["peer"]) for op in snapshot["operations"] if op["kind"] != "accept"}
        finally:
            writer.close()
            await writer.wait_closed()
    assert_nothing_left(server)
    assert peers == listed == {CLIENT}


async def test_tls_protocol_sees_the_client() -> None:
    """A protocol on asyncio's TLS transport sees the client as peername, as on the engine."""
    server_context, client_context = tls_contexts()
    made: list[Recorder] = []
    async with await iocp_echo.serve(
        lambda: Recorder(made), "127.0.0.1", 0, ssl=server_context, proxy_protocol=True
    ) as server:
        _, writer = await tls_echo_behind_a_header(server, HEADERS["v1"], client_context)
        writer.close()
        await writer.wait_closed()
    assert_nothing_left(server)
    [recorder] = made
    assert recorder.extra["peername"] == CLIENT
    assert recorder.extra["proxy_header"] == parse_header(HEADERS["v1"])
    assert recorder.extra["proxy_peername"][0] == "127.0.0.1"


async def test_tls_refused_header_never_reaches_the_tls_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a header, a TLS ClientHello is a malformed header: closed, counted, and no
    TLS error (nor traceback) is logged."""
    server_context, client_context = tls_contexts()
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, ssl=server_context, proxy_protocol=True
    ) as server:
        sock = await connect(server.port)
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=client_context, server_hostname="127.0.0.1"),
                30,
            )
        await wait_for_outcomes(server, malformed=1)
        await wait_until(lambda: server.stats().open_connections == 0)
    [line] = proxy_lines(caplog)
    assert "PROXY header malformed" in line.getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    assert_nothing_left(server)
