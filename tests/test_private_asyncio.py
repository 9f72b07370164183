"""The private asyncio internals iocp_echo's loops rely on on every platform (asyncio's
``Server`` bookkeeping and TLS layer), checked on each supported CPython.  The IOCP proactor's
internals are checked in ``test_private.py``."""

from __future__ import annotations

import asyncio
import sys

import pytest

from iocp_echo import _private


class _Transport(asyncio.Transport):
    pass


async def test_server_attach_and_detach_have_the_shape_this_cpython_has() -> None:
    """The engine's connections count in ``Server.wait_closed()`` through these two."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    transport = _Transport()  # 3.13 keeps a weak reference to it
    _private.server_attach(server, transport)
    server.close()
    waiting = asyncio.ensure_future(server.wait_closed())
    if sys.version_info >= (3, 12):
        done, _ = await asyncio.wait([waiting], timeout=0.1)
        assert not done, "wait_closed() returned with a transport attached"
    else:  # 3.11's wait_closed() does not wait for connections: its count says it
        assert server._active_count == 1  # type: ignore[attr-defined]
    _private.server_detach(server, transport)
    await asyncio.wait_for(waiting, 10)


def test_server_hooks_refuse_a_shape_they_do_not_know() -> None:
    class Other:
        def _attach(self, transport: object, extra: object) -> None: ...

    with pytest.raises(_private.InternalsUnavailable, match="takes 2 arguments"):
        _private.server_attach(Other(), asyncio.Transport())
    with pytest.raises(_private.InternalsUnavailable, match="no _detach"):
        _private.server_detach(Other(), asyncio.Transport())


def test_ssl_protocol_class_is_asyncios_tls_layer() -> None:
    from asyncio import sslproto

    assert _private.ssl_protocol_class() is sslproto.SSLProtocol
