"""max_connections and idle_timeout."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import iocp_echo

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_exactly, recv_until_eof, wait_until

pytestmark = pytest.mark.backend


async def test_connections_past_max_are_closed_at_once_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0, max_connections=3) as server:
        loop = asyncio.get_running_loop()
        admitted = [await connect(server.port) for _ in range(3)]
        await wait_until(lambda: server.stats().open_connections == 3)
        extra = await connect(server.port)
        # The refused client sees the connection end (EOF or reset), never a hang.
        try:
            assert await recv_until_eof(extra, timeout=10) == b""
        except ConnectionError:
            pass
        extra.close()
        assert server.stats().refused_connections == 1
        assert any(
            "max_connections=3" in r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING
        )
        # The admitted ones still echo, and a slot freed is a slot reusable.
        for sock in admitted:
            await loop.sock_sendall(sock, b"ok")
            assert await recv_exactly(sock, 2) == b"ok"
        admitted.pop().close()
        await wait_until(lambda: server.stats().open_connections == 2)
        assert await echo(server.port, b"again") == b"again"
        for sock in admitted:
            sock.close()
    assert_nothing_left(server)


async def test_idle_connection_is_closed_busy_one_is_not() -> None:
    timeout = 0.5
    async with await iocp_echo.serve_echo("127.0.0.1", 0, idle_timeout=timeout) as server:
        loop = asyncio.get_running_loop()
        idle = await connect(server.port)
        busy = await connect(server.port)
        opened = time.monotonic()
        closed_at: list[float] = []

        async def watch_idle() -> None:
            assert await recv_until_eof(idle, timeout=10) == b""
            closed_at.append(time.monotonic())

        watcher = asyncio.ensure_future(watch_idle())
        # The busy client keeps talking for 4 idle periods, never pausing as long as one.
        while time.monotonic() - opened < 4 * timeout:
            await loop.sock_sendall(busy, b"ping")
            assert await recv_exactly(busy, 4) == b"ping"
            await asyncio.sleep(timeout / 5)
        await watcher
        assert timeout * 0.9 <= closed_at[0] - opened < timeout * 3
        # The busy one is still open and echoing.
        await loop.sock_sendall(busy, b"still")
        assert await recv_exactly(busy, 5) == b"still"
        idle.close()
        busy.close()
    assert_nothing_left(server)
