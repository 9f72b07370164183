"""The io_uring backend itself: batching, full rings, cancellation races, closing with I/O in
flight, cross-thread wake-ups, feature detection, direct (handler-called) operations, the
set-up fallbacks, and 10,000 connections."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import iocp_echo
from iocp_echo import _platform
from iocp_echo.errors import UnsupportedPlatformError

from .conftest import assert_nothing_left
from .helpers import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.uring]

if sys.platform.startswith("linux"):
    from iocp_echo import _uring
    from iocp_echo._uring import abi, proactor


@pytest.fixture(params=["defer_taskrun", "coop_taskrun", "plain"])
def small_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A loop on a deliberately tiny ring (8 submission slots, 32 completion slots), in each
    ring set-up mode: this kernel has them all, so the fallbacks are forced."""
    loop = _uring.UringEventLoop(_uring.UringProactor(entries=8, setup_modes=[request.param]))
    assert loop._proactor.capabilities.setup_mode == request.param  # type: ignore[attr-defined]
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
    """A read in flight holds the kernel's reference to its socket: closing the descriptor
    alone does not end the connection.  Cancelled, then closed (what a transport does), the
    socket is really gone once the cancel completes: its peer reads an end of file."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    pairs = _pairs(10)

    async def scenario() -> None:
        futures = [proactor.recv(a, 100) for a, _ in pairs]
        await asyncio.sleep(0)  # in the kernel
        for future, (a, _) in zip(futures, pairs, strict=True):
            future.cancel()
            a.close()
        await wait_until(lambda: _in_flight(small_loop) == 1, timeout=5)
        for _, b in pairs:
            assert await asyncio.wait_for(proactor.recv(b, 100), 5) == b""

    small_loop.run_until_complete(scenario())
    for _, b in pairs:
        b.close()


def test_a_closed_socket_with_a_read_in_flight_stays_open_until_the_read_ends(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """The control for the test above: without the cancel, closing the descriptor leaves the
    connection open (the kernel's read still holds it), so the peer's end of file there is
    the cancel's doing, not the close's."""
    proactor = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]

    async def scenario() -> None:
        reading = proactor.recv(a, 100)
        await asyncio.sleep(0)  # in the kernel
        a.close()
        b.send(b"still read")  # by the read in flight, through the closed descriptor
        assert await asyncio.wait_for(reading, 5) == b"still read"
        assert await asyncio.wait_for(proactor.recv(b, 100), 5) == b""  # now it is gone

    small_loop.run_until_complete(scenario())
    b.close()


def test_close_cancels_and_drains_everything_in_flight() -> None:
    loop = _uring.UringEventLoop(_uring.UringProactor(entries=8))
    pairs = _pairs(30)
    proactor = loop._proactor  # type: ignore[attr-defined]

    async def issue() -> list[asyncio.Future[bytes]]:
        futures = [proactor.recv(a, 10) for a, _ in pairs]
        await asyncio.sleep(0)
        return futures

    futures = loop.run_until_complete(issue())
    abandoned = len(_uring.proactor._abandoned)
    started = time.monotonic()
    loop.close()
    assert time.monotonic() - started < 5
    assert proactor.operations() == []
    assert all(f.cancelled() for f in futures)
    # Every operation came back from the kernel before the ring closed: none was abandoned
    # (kept, with its buffer, for the life of the process).
    assert len(_uring.proactor._abandoned) == abandoned
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


def _refuse_setup(monkeypatch: pytest.MonkeyPatch, code: int, above: int = 0) -> None:
    """Make io_uring_setup fail with *code* for rings of more than *above* entries."""
    real = abi.io_uring_setup

    def refuse(entries: int, params: int) -> int:
        if entries > above:
            ctypes.set_errno(code)
            return -1
        return real(entries, params)

    monkeypatch.setattr(abi, "io_uring_setup", refuse)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EPERM, "io_uring_disabled"),
        (errno.ENOSYS, "Linux 5.11"),
        (errno.EACCES, "io_uring_group"),
        (errno.ENOMEM, "ulimit -l"),
    ],
)
def test_probe_failure_says_why(monkeypatch: pytest.MonkeyPatch, code: int, reason: str) -> None:
    _refuse_setup(monkeypatch, code)
    with pytest.raises(UnsupportedPlatformError, match=reason) as raised:
        _uring.probe()
    assert "winpy.py" in str(raised.value)
    monkeypatch.setattr(_platform, "_probed", {})
    with pytest.raises(UnsupportedPlatformError, match=reason):
        _platform.backend()
    monkeypatch.setattr(_platform, "_probed", {})


def test_probe_refused_enter_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seccomp filter may allow io_uring_setup and refuse io_uring_enter: the probe takes a
    NOP through the ring, so that is caught at start-up too."""

    def refuse(*args: int) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(abi, "io_uring_enter", refuse)
    with pytest.raises(UnsupportedPlatformError, match="seccomp"):
        _uring.probe()


def test_probe_names_a_missing_opcode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proactor, "OPS_USED", {**proactor.OPS_USED, "FUTURE_OP": 63})
    with pytest.raises(UnsupportedPlatformError, match="FUTURE_OP"):
        _uring.probe()


def test_probe_uses_the_ring_the_loop_will_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that sets up small rings but not the loop's 4,096 entries (a memlock limit)
    fails the probe, not the loop later."""
    _refuse_setup(monkeypatch, errno.ENOMEM, above=8)
    with pytest.raises(UnsupportedPlatformError, match="4,096-entry ring"):
        _uring.probe()
    with pytest.raises(UnsupportedPlatformError, match="ulimit -l"):
        _uring.new_event_loop()


def test_failed_loop_construction_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop whose ring cannot be made raises, and nothing else: no AttributeError from
    BaseEventLoop.__del__ on the half-made loop."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    _refuse_setup(monkeypatch, errno.ENOMEM)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        _uring.UringEventLoop()
    gc.collect()
    assert unraisable == []


CLI_WITH_LOW_MEMLOCK = r"""
import ctypes, errno, sys
from iocp_echo._uring import abi
real = abi.io_uring_setup
def refuse(entries, params):
    if entries > 8:  # what a low RLIMIT_MEMLOCK does on kernels before 5.12
        ctypes.set_errno(errno.ENOMEM)
        return -1
    return real(entries, params)
abi.io_uring_setup = refuse
from iocp_echo import cli
sys.exit(cli.main(["--port", "0"]))
"""


def test_cli_reports_a_ring_it_cannot_set_up_in_one_line() -> None:
    process = subprocess.run(
        [sys.executable, "-X", "dev", "-c", CLI_WITH_LOW_MEMLOCK],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert process.returncode == 1
    lines = process.stderr.splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("iocp-echo: error: iocp_echo's Linux backend cannot start: ")
    assert "ulimit -l" in lines[0]


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


# -- issue 9: kernel-owned memory, descriptor reuse, datagram futures -------------------------


def test_cancel_after_an_interrupted_enter_does_not_free_kernel_memory(
    small_loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C can land after io_uring_enter consumed an SQE and before Python noted it.  A
    cancel then must still see the operation as the kernel's (from the SQ head): ASYNC_CANCEL,
    not a NOP over a slot the kernel already took while its buffer is freed."""
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    ring = proactor_.ring
    a, b = _pairs(1)[0]
    reading = proactor_.recv(a, 100)
    real_enter = ring.enter

    def interrupted(wait: bool, timeout: float | None) -> None:
        real_enter(wait, timeout)  # the kernel consumed everything ...
        monkeypatch.setattr(ring, "enter", real_enter)
        raise KeyboardInterrupt  # ... and the signal hit before the bookkeeping

    monkeypatch.setattr(ring, "enter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        small_loop.run_until_complete(reading)
    reading.cancel()
    assert [op.state for op in proactor_.operations() if op.sock is a] == ["cancelling"]

    async def scenario() -> None:
        await wait_until(lambda: _in_flight(small_loop) == 1, timeout=5)  # ECANCELED came
        b.send(b"kept")  # (a recv still armed in the kernel would take it)
        assert await asyncio.wait_for(proactor_.recv(a, 100), 5) == b"kept"

    small_loop.run_until_complete(scenario())
    assert reading.cancelled()
    a.close()
    b.close()


def test_queued_operation_on_a_closed_socket_never_reaches_its_descriptors_next_owner(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """A recv queued (not yet entered) on a socket that is then closed, and whose descriptor
    number is reused at once by another socket, must not read from the new socket: it is
    neutralized before the enter and fails with EBADF."""
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]
    number = a.fileno()
    stale = proactor_.recv(a, 100)
    a.close()
    c, d = socket.socketpair()
    if number not in (c.fileno(), d.fileno()):
        os.dup2(c.fileno(), number)
        c.close()
        c = socket.socket(fileno=number)
    elif d.fileno() == number:
        c, d = d, c
    assert c.fileno() == number
    c.setblocking(False)
    d.send(b"for the new socket")

    async def scenario() -> None:
        with pytest.raises(OSError, match="Bad file descriptor") as failed:
            await asyncio.wait_for(stale, 5)
        assert failed.value.errno == errno.EBADF
        assert await asyncio.wait_for(proactor_.recv(c, 100), 5) == b"for the new socket"

    small_loop.run_until_complete(scenario())
    for sock in (b, c, d):
        sock.close()


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_cancelled_datagram_receive_cancels_its_retried_poll(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """recvfrom waits with POLL_ADD and retries when the datagram was gone; cancelling it
    must cancel the retried POLL_ADD too, not only the first."""

    class Robbed(socket.socket):
        """A socket whose first datagram another reader takes between poll and read."""

        robbed = False

        def recvfrom(self, *args: Any) -> Any:
            if not self.robbed and _in_flight(small_loop) == 1:
                self.robbed = True
                super().recvfrom(65536)
                raise BlockingIOError
            return super().recvfrom(*args)

    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    plain = _udp()
    sock = Robbed(socket.AF_INET, socket.SOCK_DGRAM, fileno=plain.detach())
    sender = _udp()

    async def scenario() -> None:
        receiving = proactor_.recvfrom(sock, 100)
        await asyncio.sleep(0)
        sender.sendto(b"stolen", sock.getsockname())
        await wait_until(lambda: sock.robbed and _in_flight(small_loop) == 2, timeout=5)
        receiving.cancel()
        await wait_until(lambda: _in_flight(small_loop) == 1, timeout=5)
        assert receiving.cancelled()

    small_loop.run_until_complete(scenario())
    sock.close()
    sender.close()


def test_failed_datagram_poll_reaches_the_caller(
    small_loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """A POLL_ADD that fails (here: its socket closed before submission) fails recvfrom with
    that error, and no future is left with an exception nobody retrieved."""
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    sock = _udp()

    async def scenario() -> None:
        receiving = proactor_.recvfrom(sock, 100)
        sock.close()
        with pytest.raises(OSError, match="Bad file descriptor") as failed:
            await asyncio.wait_for(receiving, 5)
        assert failed.value.errno == errno.EBADF

    small_loop.run_until_complete(scenario())
    gc.collect()
    assert "never retrieved" not in caplog.text


# -- direct operations ------------------------------------------------------------------------


def _direct_recv(
    proactor_: Any, sock: socket.socket, got: list[tuple[int, int]], size: int = 64
) -> tuple[int, Any]:
    buffer = ctypes.create_string_buffer(size)
    user_data = proactor_.submit_direct(
        abi.IORING_OP_RECV,
        sock,
        lambda res, flags: got.append((res, flags)),
        kind="recv",
        nbytes=size,
        addr=ctypes.addressof(buffer),
        length=size,
        anchor=buffer,
    )
    return user_data, buffer


def test_direct_operation_calls_its_handler_inline(small_loop: asyncio.AbstractEventLoop) -> None:
    """The handler runs inside select() with (res, cqe_flags): no future, no call_soon; the
    record is listed (future None) while pending and forgotten after its CQE."""
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]
    got: list[tuple[int, int]] = []
    user_data, buffer = _direct_recv(proactor_, a, got)
    [listed] = [op for op in proactor_.operations() if op.sock is a]
    assert (listed.future, listed.kind, listed.nbytes, listed.state) == (
        None,
        "recv",
        64,
        "pending",
    )
    b.send(b"direct")
    for _ in range(100):
        proactor_.select(0.05)
        if got:
            break
    assert got == [(6, 0)]
    assert buffer.raw[:6] == b"direct"
    assert _in_flight(small_loop) == 0  # (the loop never ran: not even its wake-up read)
    assert proactor_.cancel_direct(user_data) is True  # already gone
    a.close()
    b.close()


def test_direct_multishot_accept_stays_one_record_until_cancelled(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    assert proactor_.capabilities.multishot_accept
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    got: list[tuple[int, int]] = []
    user_data = proactor_.submit_direct(
        abi.IORING_OP_ACCEPT,
        listener,
        lambda res, flags: got.append((res, flags)),
        kind="accept",
        ioprio=abi.IORING_ACCEPT_MULTISHOT,
        op_flags=socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
    )
    proactor_.select(0)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    for _ in range(100):
        proactor_.select(0.05)
        if len(got) == 3:
            break
    assert [bool(flags & abi.IORING_CQE_F_MORE) for _, flags in got] == [True] * 3
    assert len(proactor_.operations()) == 1
    assert proactor_.cancel_direct(user_data) is False  # the kernel has it: ASYNC_CANCEL
    assert [op.state for op in proactor_.operations()] == ["cancelling"]
    statuses = _uring.operations(small_loop)
    assert [(op.future, op.state) for op in statuses] == [(None, "cancelling")]
    pending = iocp_echo.pending_operations(small_loop)
    assert [(op.kind, op.state, op.fileno) for op in pending] == [
        ("accept", "cancelling", listener.fileno())
    ]
    for _ in range(100):
        proactor_.select(0.05)
        if len(got) == 4:
            break
    assert got[3] == (-errno.ECANCELED, 0)
    assert proactor_.operations() == []
    for fd, _ in got[:3]:
        os.close(fd)
    for client in clients:
        client.close()
    listener.close()


def test_cancel_direct_before_submission_forgets_it(small_loop: asyncio.AbstractEventLoop) -> None:
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    a, b = _pairs(1)[0]
    got: list[tuple[int, int]] = []
    user_data, _ = _direct_recv(proactor_, a, got)
    assert proactor_.cancel_direct(user_data) is True
    assert proactor_.operations() == []
    b.send(b"kept")
    proactor_.select(0)
    proactor_.select(0)
    assert got == []
    assert a.recv(10) == b"kept"
    a.close()
    b.close()


def test_close_cancels_direct_operations_and_tells_their_handlers() -> None:
    loop = _uring.UringEventLoop(_uring.UringProactor(entries=8))
    proactor_ = loop._proactor  # type: ignore[attr-defined]
    pairs = _pairs(20)
    got: list[tuple[int, int]] = []
    for a, _ in pairs:
        _direct_recv(proactor_, a, got)
    proactor_.select(0)  # all submitted
    loop.close()
    assert got == [(-errno.ECANCELED, 0)] * 20
    assert proactor_.operations() == []
    for a, b in pairs:
        a.close()
        b.close()


def test_direct_handler_error_goes_to_the_loop_and_dispatch_goes_on(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    reported: list[dict[str, Any]] = []
    small_loop.set_exception_handler(lambda loop, context: reported.append(context))
    pairs = _pairs(2)
    got: list[tuple[int, int]] = []

    def broken(res: int, flags: int) -> None:
        raise ValueError("handler bug")

    proactor_.submit_direct(abi.IORING_OP_RECV, pairs[0][0], broken, kind="recv", addr=0, length=0)
    _direct_recv(proactor_, pairs[1][0], got)
    for _, b in pairs:
        b.send(b"x")
    for _ in range(100):
        proactor_.select(0.05)
        if got and reported:
            break
    assert got == [(1, 0)]
    assert isinstance(reported[0]["exception"], ValueError)
    for a, b in pairs:
        a.close()
        b.close()


def test_capabilities_and_forcing_features_off() -> None:
    full = _uring.UringProactor(entries=8)
    assert full.capabilities == proactor.UringCapabilities(
        multishot_accept=True, buffer_ring=True, multishot_recv=True, setup_mode="defer_taskrun"
    )
    full.close()
    reduced = _uring.UringProactor(entries=8, disable={"buffer_ring"}, setup_modes=["plain"])
    assert reduced.capabilities == proactor.UringCapabilities(
        multishot_accept=True, buffer_ring=False, multishot_recv=False, setup_mode="plain"
    )
    reduced.close()
    with pytest.raises(ValueError, match="multishot_send"):
        _uring.UringProactor(entries=8, disable={"multishot_send"})


def test_loop_made_in_one_thread_runs_in_another() -> None:
    """The single-issuer ring is enabled by the thread that runs the loop."""
    loop = _uring.UringEventLoop()
    a, b = _pairs(1)[0]
    results: list[object] = []

    def run() -> None:
        async def scenario() -> bytes:
            b.send(b"across threads")
            return await asyncio.wait_for(loop.sock_recv(a, 100), 5)

        results.append(loop.run_until_complete(scenario()))
        loop.close()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert results == [b"across threads"]
    a.close()
    b.close()


# -- issue 9 item 12: behaviours no test used to hold --------------------------------------------


def test_an_accept_completing_after_its_cancel_has_its_descriptor_closed(
    small_loop: asyncio.AbstractEventLoop,
) -> None:
    """The accept is cancelled after the kernel accepted a connection but before its CQE was
    reaped: nobody will take the descriptor in that CQE, so the proactor closes it; otherwise
    the client would stay connected to nothing."""
    proactor_ = small_loop._proactor  # type: ignore[attr-defined]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    accepting = proactor_.accept(listener)
    proactor_.select(0)  # submitted: the kernel waits for a connection
    client = socket.create_connection(listener.getsockname(), timeout=10)
    proactor_.ring.enter(True, 5.0)  # the kernel completes the accept; the CQE is not reaped
    accepting.cancel()  # too late for the kernel: its ASYNC_CANCEL will find nothing
    assert [op.state for op in proactor_.operations()] == ["cancelling"]
    for _ in range(100):
        proactor_.select(0.05)
        if not proactor_.operations():
            break
    assert proactor_.operations() == []
    assert accepting.cancelled()
    client.settimeout(10)
    assert client.recv(10) == b""  # the server's end was closed
    client.close()
    listener.close()


@pytest.mark.parametrize("mode", ["defer_taskrun", "coop_taskrun", "plain"])
def test_one_reap_takes_the_completions_the_kernel_kept_in_overflow(mode: str) -> None:
    """40 completions for a 16-entry completion ring: the kernel keeps 24 in its overflow list
    (FEAT_NODROP) and flags it; one reap() must bring them in too, not leave them waiting for
    some later io_uring_enter."""
    ring = _uring.ring.Ring(4, setup_modes=[mode])
    try:
        assert ring.cq_entries == 16
        for index in range(40):
            if ring.space() == 0:
                ring.enter(False, None)  # submitted, never reaped
            ring.push(abi.IORING_OP_NOP, -1, user_data=index)
        ring.enter(False, None)
        assert ring._sq_flags.value & abi.IORING_SQ_CQ_OVERFLOW  # the kernel overflowed
        assert ring.reap() == [(index, 0, 0) for index in range(40)]
    finally:
        ring.close()


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _flood_then_reset(port: int, total: int) -> int:
    """Send up to *total* bytes without reading (until the server stops taking them), reset."""
    sent = 0
    chunk = os.urandom(65536)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(2)
        try:
            while sent < total:
                sent += sock.send(chunk)
        except OSError:
            pass  # TimeoutError: the server has stopped reading from us
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    return sent


async def test_memory_comes_back_after_a_flood() -> None:
    """20 clients push what they can (up to 10 MiB each) without reading, then reset.  Every
    provided buffer the flood touched stayed resident (60 MiB above the level before, 10 s
    later); once no receive can pick a buffer, the sweep gives their pages back, and the
    process is within 20 MiB of where it started within 10 s."""
    loop = asyncio.get_running_loop()
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"warm")
        await reader.readexactly(4)
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.stats().open_connections == 0)
        before = _resident_mib()
        sent = await asyncio.gather(
            *(
                loop.run_in_executor(None, _flood_then_reset, server.port, 10 << 20)
                for _ in range(20)
            )
        )
        assert sum(sent) > 64 << 20  # enough to go round the whole ring
        await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
        await wait_until(
            lambda: _resident_mib() - before < 20,
            timeout=10,
            what=f"resident memory back within 20 MiB of {before:.0f} MiB",
        )
    assert_nothing_left(server)
