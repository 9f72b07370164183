"""Remote input never floods the log: a client-caused storm logs a bounded number of lines,
a summary says what was held back, and the stats keep exact counts."""

from __future__ import annotations

import asyncio
import logging

import pytest

import iocp_echo
from iocp_echo._logflood import DEFAULT_BURST

from .conftest import assert_nothing_left
from .helpers import connect, recv_exactly, reset, wait_until

pytestmark = pytest.mark.backend

RESETS = 60


async def test_a_reset_storm_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        for _ in range(RESETS):
            sock = await connect(server.port)
            await loop.sock_sendall(sock, b"x")
            assert await recv_exactly(sock, 1) == b"x"
            reset(sock)
        await wait_until(lambda: server.stats().open_connections == 0, timeout=30)
        lost = sum(server.stats().errors.values())
        assert lost == RESETS  # exact, whatever the log shows
        lines = [
            r
            for r in caplog.records
            if r.name.startswith("iocp_echo") and r.levelno >= logging.WARNING
        ]
        # the promise kept for the first ones: peer address and OS error code
        assert len(lines) == DEFAULT_BURST
        assert all("127.0.0.1:" in r.getMessage() and "OS error" in r.getMessage() for r in lines)
    summaries = [r for r in caplog.records if r.getMessage().startswith("suppressed")]
    assert len(summaries) == 1  # closing the server summarises what was held back
    message = summaries[0].getMessage()
    assert f"suppressed {RESETS - DEFAULT_BURST} 'connection lost' messages" in message
    assert_nothing_left(server)


async def test_refusals_past_max_connections_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    async with await iocp_echo.serve_echo("127.0.0.1", 0, max_connections=1) as server:
        holder = await connect(server.port)
        await wait_until(lambda: server.stats().open_connections == 1)
        for _ in range(30):
            extra = await connect(server.port)
            assert await asyncio.wait_for(loop.sock_recv(extra, 10), 10) == b""
            extra.close()
        await wait_until(lambda: server.stats().refused_connections == 30)
        refusals = [r for r in caplog.records if "refusing connection" in r.getMessage()]
        assert len(refusals) == DEFAULT_BURST
        holder.close()
    assert_nothing_left(server)
