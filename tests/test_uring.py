"""The io_uring backend itself: batching, full rings, cancellation races, closing with I/O in
flight, cross-thread wake-ups, feature detection, and 10,000 connections."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import iocp_echo
from iocp_echo import _platform
from iocp_echo.errors import UnsupportedPlatformError

from .conftest import assert_nothing_left
from .helpers import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.uring]

if sys.platform.startswith("linux"):
    from iocp_echo import _uring


@pytest.fixture
def small_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop on a deliberately tiny ring: 8 submission slots, 32 completion slots."""
    loop = _uring.UringEventLoop(_uring.UringProactor(entries=8))
    yield loop
    loop.close()


def _pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(count):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        pairs.append((a, b))
    return pairs


def _in_flight(loop: asyncio.AbstractEventLoop) -> int:
    return len(loop._proactor.operations())  # type: ignore[attr-defined]


def test_full_submission_ring_and_completion_overflow(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """100 reads issued in one go on an 8-slot ring, then 100 completions at once into a
    32-slot completion ring: every read gets exactly its own bytes."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    pairs = _pairs(100)

    async def scenario() -> None:
        buffers = [bytearray(64) for _ in pairs]
        futures = [proactor.recv_into(a, buf) for (a, _), buf in zip(pairs, buffers, strict=True)]
        await asyncio.sleep(0)  # everything submitted (some early, when the ring filled)
        for index, (_, b) in enumerate(pairs):
            b.send(f"message {index}".encode())
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        for index, (count, buf) in enumerate(zip(results, buffers, strict=True)):
            assert bytes(buf[:count]) == f"message {index}".encode()

    small_loop.run_until_complete(scenario())
    assert _in_flight(small_loop) == 1  # only the loop's own wake-up read
    for a, b in pairs:
        a.close()
        b.close()


def test_one_io_uring_enter_per_loop_iteration() -> None:
    loop = _uring.UringEventLoop()
    proactor = loop._proactor  # type: ignore[attr-defined]
    selects = 0
    original = proactor.select

    def counting_select(timeout: float | None = None) -> list[object]:
        nonlocal selects
        selects += 1
        return original(timeout)  # type: ignore[no-any-return]

    proactor.select = counting_select

    async def scenario() -> None:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            streams = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
            start_selects, start_enters = selects, proactor.enter_calls
            for _ in range(50):
                for _, writer in streams:
                    writer.write(b"x" * 100)
                for reader, _ in streams:
                    assert await reader.readexactly(100) == b"x" * 100
            iterations = selects - start_selects
            enters = proactor.enter_calls - start_enters
            # 20 clients x 50 round trips = 4,000 operations, submitted in batches.
            assert enters <= iterations + 2, (enters, iterations)
            assert iterations < 2000
            for _, writer in streams:
                writer.close()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_cancel_before_submission_loses_nothing(small_loop: asyncio.AbstractEventLoop) -> None:
    """A read cancelled before the kernel saw it becomes a no-op: the bytes stay in the socket
    for the next read."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]

    async def scenario() -> None:
        first = proactor.recv(a, 100)
        first.cancel()
        b.send(b"kept")
        assert await asyncio.wait_for(proactor.recv(a, 100), 5) == b"kept"
        assert first.cancelled()

    small_loop.run_until_complete(scenario())
    assert _in_flight(small_loop) == 1
    a.close()
    b.close()


def test_cancel_racing_completion_is_harmless(small_loop: asyncio.AbstractEventLoop) -> None:
    """Cancel just as the operation completes (data arrived, completion not yet reaped): the
    future is cancelled, the kernel's completion is reaped and ignored, the buffer lived until
    then, and the proactor is clean afterwards."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    pairs = _pairs(20)

    async def scenario() -> None:
        futures = [proactor.recv(a, 100) for a, _ in pairs]
        await asyncio.sleep(0)  # submitted
        for _, b in pairs:
            b.send(b"racing")
        time.sleep(0.05)  # noqa: ASYNC251  (the kernel completes them before the loop reaps)
        for future in futures:
            future.cancel()
        await wait_until(lambda: _in_flight(small_loop) == 1, timeout=5)
        assert all(f.cancelled() for f in futures)
        for a, b in pairs:  # the sockets still work
            b.send(b"after")
            assert (await asyncio.wait_for(proactor.recv(a, 100), 5)).endswith(b"after")

    small_loop.run_until_complete(scenario())
    for a, b in pairs:
        a.close()
        b.close()


def test_closing_sockets_with_operations_in_flight(small_loop: asyncio.AbstractEventLoop) -> None:
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    pairs = _pairs(10)
    fds_before = len(os.listdir("/proc/self/fd"))

    async def scenario() -> None:
        futures = [proactor.recv(a, 100) for a, _ in pairs]
        await asyncio.sleep(0)
        for future, (a, b) in zip(futures, pairs, strict=True):
            future.cancel()  # what a transport does before closing its socket
            a.close()
            b.close()
        await wait_until(lambda: _in_flight(small_loop) == 1, timeout=5)

    small_loop.run_until_complete(scenario())
    assert len(os.listdir("/proc/self/fd")) <= fds_before - 20


def test_close_cancels_and_drains_everything_in_flight() -> None:
    loop = _uring.UringEventLoop(_uring.UringProactor(entries=8))
    pairs = _pairs(30)
    proactor = loop._proactor  # type: ignore[attr-defined]

    async def issue() -> list[asyncio.Future[bytes]]:
        futures = [proactor.recv(a, 10) for a, _ in pairs]
        await asyncio.sleep(0)
        return futures

    futures = loop.run_until_complete(issue())
    started = time.monotonic()
    loop.close()
    assert time.monotonic() - started < 5
    assert proactor.operations() == []
    assert all(f.cancelled() for f in futures)
    for a, b in pairs:
        a.close()
        b.close()


def test_cross_thread_wakeups() -> None:
    loop = _uring.UringEventLoop()

    async def scenario() -> None:
        woke = asyncio.Event()
        # The loop has nothing to do but wait in io_uring_enter with no timeout.
        threading.Timer(0.2, loop.call_soon_threadsafe, args=(woke.set,)).start()
        await asyncio.wait_for(woke.wait(), 5)
        assert await loop.run_in_executor(None, sum, [1, 2, 3]) == 6

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EPERM, "io_uring_disabled"),
        (errno.ENOSYS, "Linux 5.11"),
        (errno.EACCES, "io_uring_group"),
    ],
)
def test_probe_failure_says_why(monkeypatch: pytest.MonkeyPatch, code: int, reason: str) -> None:
    def refuse(entries: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_uring, "_Ring", refuse)
    with pytest.raises(UnsupportedPlatformError, match=reason) as raised:
        _uring.probe()
    assert "winpy.py" in str(raised.value)
    monkeypatch.setattr(_platform, "_probed", {})
    with pytest.raises(UnsupportedPlatformError, match=reason):
        _platform.backend()
    monkeypatch.setattr(_platform, "_probed", {})


def test_probe_names_a_missing_opcode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_uring, "_OPS_USED", {**_uring._OPS_USED, "FUTURE_OP": 63})
    with pytest.raises(UnsupportedPlatformError, match="FUTURE_OP"):
        _uring.probe()


CLIENTS = r"""
import selectors, socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"%08d" % i)
    socks.append(s)
for i, s in enumerate(socks):
    got = b""
    while len(got) < 8:
        got += s.recv(8 - len(got))
    assert got == b"%08d" % i, (i, got)
print("OK", len(socks), flush=True)
sys.stdin.read()
"""


async def test_ten_thousand_concurrent_connections() -> None:
    """10,000 clients (in a child process: one process cannot hold both ends within this
    machine's 20,000 descriptors), each echoed its own bytes while all stay open."""
    import resource  # POSIX only: this module is also collected (and deselected) on Windows

    count = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= count + 200, (
        f"this machine allows {hard} open files per process; the test needs {count + 200}"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * count)), hard))
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        loop = asyncio.get_running_loop()
        # (a proactor loop has no subprocess transports: the child is driven from a thread)
        child = subprocess.Popen(  # noqa: ASYNC220  (no subprocess transports here)
            [sys.executable, "-c", CLIENTS, str(server.port), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        line = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 300)
        assert line.split() == [b"OK", str(count).encode()]
        assert server.stats().open_connections == count
        pending = server.stats().pending_by_kind
        assert pending.get("recv") == count
        child.stdin.close()
        await asyncio.wait_for(loop.run_in_executor(None, child.wait), 60)
        await wait_until(lambda: server.stats().open_connections == 0, timeout=60)
    assert_nothing_left(server)


def test_large_send_completes_only_when_every_byte_is_sent(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """A 4 MiB send into a small socket buffer is taken in parts; the future completes once,
    with the whole size, and the reader gets every byte in order."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    payload = os.urandom(4 * 1024 * 1024)

    async def scenario() -> None:
        sending = proactor.send(a, payload)
        received = bytearray()
        while len(received) < len(payload):
            received += await asyncio.wait_for(proactor.recv(b, 65536), 10)
        assert await asyncio.wait_for(sending, 10) == len(payload)
        assert received == payload

    small_loop.run_until_complete(scenario())
    a.close()
    b.close()
