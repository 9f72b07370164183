"""Clients that take more than their share: one connection streaming flat out, a thousand that
flood and never read, a thousand that read a byte a second.  Everyone else is still served,
and the server's memory stays bounded.  The greedy clients run in their own process
(``hostile_clients.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import iocp_echo

from .conftest import assert_nothing_left
from .helpers import wait_until

pytestmark = pytest.mark.backend

CLIENTS = Path(__file__).with_name("hostile_clients.py")
#: Round-trip bounds for a well-behaved client beside greedy ones (the issue's goals).
ON_WINDOWS = sys.platform == "win32"
PING_PONG_P99 = 0.5 if ON_WINDOWS else 0.05
HOSTILE_DELAY = 1.0 if ON_WINDOWS else 0.1


@contextlib.asynccontextmanager
async def greedy_clients(port: int, **counts: int) -> AsyncIterator[None]:
    """Run hostile_clients.py against *port* until the block ends; it is killed whatever
    happens in the block."""
    args = [f"--{name.replace('_', '-')}={count}" for name, count in counts.items()]
    # Popen from a thread: iocp_echo's io_uring loop has no subprocess support yet.
    process = await asyncio.get_running_loop().run_in_executor(
        None,
        functools.partial(
            subprocess.Popen,
            [sys.executable, str(CLIENTS), str(port), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ),
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, process.stdout.readline), 120
        )
        assert line.strip() == "ready", line
        yield
    finally:
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.get_running_loop().run_in_executor(None, process.wait)


async def round_trips(port: int, count: int, size: int = 1024) -> list[float]:
    """A well-behaved client: *count* echoes of *size* bytes, one at a time; their times."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    message = b"w" * size
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(message)
            assert await asyncio.wait_for(reader.readexactly(size), 30) == message
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
        await writer.wait_closed()
    return times


#: The greedy clients' opening burst moves hundreds of MB a second; once it is over the server
#: receives (next to) nothing.  Less than this in one window of SETTLE_WINDOW is "over".
SETTLED_BYTES = 1 << 20
SETTLE_WINDOW = 0.25


async def wait_until_settled(
    server: iocp_echo.EchoServer, paused: int, connections: int, timeout: float = 120.0
) -> None:
    """Wait until *connections* are open, *paused* of them have stopped reading, and the server
    received less than SETTLED_BYTES in the last SETTLE_WINDOW: the greedy clients are in
    their steady state, their opening burst over.  Fail after *timeout* seconds, saying
    which of the three did not happen."""
    deadline = time.monotonic() + timeout
    received = server.stats().bytes_received
    while True:
        await asyncio.sleep(SETTLE_WINDOW)
        stats = server.stats()
        grown, received = stats.bytes_received - received, stats.bytes_received
        if (
            stats.open_connections >= connections
            and stats.reading_paused >= paused
            and grown < SETTLED_BYTES
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled after {timeout} s: {stats.open_connections} of {connections} "
                f"connections open, {stats.reading_paused} of {paused} paused, {grown:,} bytes "
                f"received in the last {SETTLE_WINDOW} s (settled: < {SETTLED_BYTES:,})"
            )


def p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def timer_lateness(duration: float, interval: float = 0.01) -> float:
    """How late a 10 ms timer runs, at worst, over *duration* seconds."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    deadline = loop.time() + duration
    while loop.time() < deadline:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        worst = max(worst, loop.time() - due)
    return worst


async def test_one_connection_streaming_flat_out_does_not_hold_the_loop() -> None:
    """Under Wine a client pumping 64 KiB messages kept IocpProactor._poll draining the port
    (the engine re-armed each receive from its completion): a client connecting meanwhile was
    not accepted until the stream stopped (6.5 s), and no timer or task ran.  Beside such a
    client, new clients are served at once, every ping-pong client's p99 stays under 50 ms
    natively (500 ms under Wine), and timers keep their schedule."""
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        async with greedy_clients(server.port, pumps=1):
            bytes_before = server.stats().bytes_sent
            lateness = asyncio.ensure_future(timer_lateness(2.0))
            started = time.perf_counter()
            first = await round_trips(server.port, 1)  # a new connection, during the stream
            accepted_in = time.perf_counter() - started
            per_client = await asyncio.gather(*(round_trips(server.port, 50) for _ in range(5)))
            worst_timer = await lateness
            assert server.stats().bytes_sent - bytes_before > 10 * 65536  # it did pump
        assert accepted_in < PING_PONG_P99 * 2, (accepted_in, first)
        for times in per_client:
            assert p99(times) < PING_PONG_P99, sorted(times)[-5:]
        assert worst_timer < PING_PONG_P99, worst_timer
        await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
    assert_nothing_left(server)


def resident_bytes() -> int:
    """This process's resident memory (the server runs in it)."""
    if sys.platform == "win32":

        class Counters(ctypes.Structure):
            _fields_ = [  # PROCESS_MEMORY_COUNTERS
                ("cb", ctypes.c_ulong),
                ("PageFaultCount", ctypes.c_ulong),
                ("PeakWorkingSetSize", ctypes.c_size_t),
                ("WorkingSetSize", ctypes.c_size_t),
                ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                ("PagefileUsage", ctypes.c_size_t),
                ("PeakPagefileUsage", ctypes.c_size_t),
            ]

        counters = Counters()
        counters.cb = ctypes.sizeof(counters)
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p
        kernel32.K32GetProcessMemoryInfo.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_ulong,
        ]
        process = kernel32.GetCurrentProcess()
        assert kernel32.K32GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
        return int(counters.WorkingSetSize)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_a_thousand_flooders_and_a_thousand_slow_readers_cannot_delay_an_echo() -> None:
    """1,000 connections that send and never read and 1,000 that read one byte a second
    cannot delay a well-behaved client's echo by more than 100 ms natively (1 s under Wine),
    and the server's memory is bounded by what each connection may hold: the write
    high-water mark plus a read or two."""
    flooders = slow_readers = 1000
    write_high_water = 64 * 1024
    before = resident_bytes()
    async with await iocp_echo.serve_echo(
        "127.0.0.1", 0, write_high_water=write_high_water
    ) as server:
        baseline = await round_trips(server.port, 20)
        async with greedy_clients(server.port, flooders=flooders, slow_readers=slow_readers):
            # Measured once the greedy clients are in the state the test is about, not
            # while the slow readers' 256 KiB each (250 MB in all) is still being echoed: on
            # one busy core that burst outlasted the pauses by over a second, and a new
            # connection's first echo waited its turn behind it.
            await wait_until_settled(server, paused=flooders, connections=flooders + slow_readers)
            during = await round_trips(server.port, 50)
            grown = resident_bytes() - before
        await wait_until(lambda: server.stats().open_connections == 0, timeout=60)
    assert_nothing_left(server)
    assert p99(during) - p99(baseline) < HOSTILE_DELAY, (sorted(baseline)[-3:], sorted(during)[-3:])
    per_connection = write_high_water + 2 * 65536
    bound = (flooders + slow_readers) * per_connection + 64 * 1024 * 1024
    assert grown < bound, f"grew {grown >> 20} MiB, bound {bound >> 20} MiB"
