"""serve_echo(ssl=...): the same echo over TLS, on the same proactor transport underneath."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest

import iocp_echo

from .conftest import assert_nothing_left

pytestmark = pytest.mark.backend

DATA = Path(__file__).resolve().parent / "data"  # a self-signed certificate for 127.0.0.1


async def test_tls_echo() -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(DATA / "localhost.crt", DATA / "localhost.key")
    client_context = ssl.create_default_context(cafile=str(DATA / "localhost.crt"))
    async with await iocp_echo.serve_echo("127.0.0.1", 0, ssl=server_context) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_context, server_hostname="127.0.0.1"
        )
        payload = os.urandom(300_000)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        writer.close()
        await writer.wait_closed()
    assert_nothing_left(server)
    assert server.stats().bytes_received == len(payload)
