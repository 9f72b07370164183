"""The fallback path: a protocol hosted on asyncio's own proactor transport.

Used for TLS (asyncio's TLS layer needs its own transport) and when the completion engine
cannot start (CPython's proactor internals are not the ones the engine was checked against, or
the kernel lacks a feature).  :class:`StockConnection` sits between the transport and the
user's protocol to give the server what the engine's transports give it: byte counts, the
time of the last read, and a call when the connection is gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from . import _private
from ._transport import ConnectionOwner, _close_socket

__all__ = ["StockConnection"]

logger = logging.getLogger("iocp_echo.connection")

_warned_read_size = False
_warned_extras = False


class StockConnection(asyncio.BufferedProtocol):
    """Forwards asyncio's protocol calls to *protocol*, counting on the way."""

    def __init__(
        self,
        protocol: asyncio.BaseProtocol,
        *,
        sock: socket.socket,
        peer: Any,
        max_read: int,
        write_high_water: int,
        owner: ConnectionOwner,
        proxy: tuple[Any, Any] | None = None,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self.socket = sock
        self.peer = peer
        self.bytes_received = 0
        self.last_activity = time.monotonic()
        #: When the transport's read now in flight was issued (introspection shows its age).
        self.read_started = self.last_activity
        self._last_unsent = 0
        self._max_read = max_read
        self._write_high_water = write_high_water
        self._owner = owner
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        #: (the PROXY header, the balancer's address) when a header was read: *peer* is then
        #: the client it named (or the balancer's address, for one that named none).
        self._proxy = proxy
        self._buffer: memoryview | None = None

    # -- what the server reads --------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        return int(getattr(self.protocol, "bytes_sent", 0))

    @property
    def reading_paused(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def note_activity(self, now: float) -> float:
        """The last traffic either way: a change in unsent bytes means the client reads."""
        unsent = self.get_write_buffer_size()
        if unsent != self._last_unsent:
            self._last_unsent = unsent
            self.last_activity = now
        return self.last_activity

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio's calls --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        global _warned_read_size
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if transport.get_extra_info("sslcontext") is None:
            # (With TLS the socket is read by asyncio's TLS layer, in 64 KiB records;
            # max_read then bounds the plaintext only: see the README.)
            try:
                _private.set_read_buffer_size(transport, self._max_read)
            except _private.InternalsUnavailable as exc:
                if not _warned_read_size:
                    _warned_read_size = True
                    logger.warning(
                        "cannot bound reads to max_read=%d bytes: %s", self._max_read, exc
                    )
        transport.set_write_buffer_limits(high=self._write_high_water)
        if self._proxy is None:
            self.peer = transport.get_extra_info("peername") or self.peer
        else:
            self._show_client(transport)
        self.protocol.connection_made(transport)

    def _show_client(self, transport: asyncio.BaseTransport) -> None:
        """The protocol's ``get_extra_info`` names the client, as on the engine's transports."""
        global _warned_extras
        header, balancer = self._proxy  # type: ignore[misc]
        try:
            extra = _private.transport_extras(transport)
        except _private.InternalsUnavailable as exc:
            if not _warned_extras:
                _warned_extras = True
                logger.warning(
                    "protocols on asyncio's transports see the balancer's address as peername, "
                    "not the PROXY header's client: %s",
                    exc,
                )
            return
        extra.update(peername=self.peer, proxy_header=header, proxy_peername=balancer)

    def get_buffer(self, sizehint: int) -> Any:
        if self._buffered:
            return self.protocol.get_buffer(sizehint)  # type: ignore[attr-defined]
        if self._buffer is None:
            self._buffer = memoryview(bytearray(self._max_read))  # a view: see EchoProtocol
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.last_activity = self.read_started = time.monotonic()
        if self._buffered:
            self.protocol.buffer_updated(nbytes)  # type: ignore[attr-defined]
        else:
            assert self._buffer is not None
            self.protocol.data_received(bytes(self._buffer[:nbytes]))  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()  # type: ignore[attr-defined,no-any-return]

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.protocol.connection_lost(exc)
        finally:
            # CPython's _call_connection_lost calls shutdown() unguarded, which raises on a
            # reset peer and skips the close: close the socket here first.
            _close_socket(self.socket)
            self._owner.transport_lost(self, exc)  # type: ignore[arg-type]
