"""The echo Protocol: every byte read is written back, in order, through a proactor transport.

Reads are completions, not readiness: the transport keeps one overlapped read in flight and
hands each completed read to :meth:`EchoProtocol.data_received`, which queues it for an
overlapped send.  Memory stays bounded because the transport's flow control calls
:meth:`~EchoProtocol.pause_writing` once more than ``write_high_water`` bytes wait to be sent,
and this protocol then stops issuing reads until they drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from asyncio import proactor_events
from collections.abc import Callable
from typing import Any

from . import _private
from .errors import ProactorRequiredError, os_error_code

__all__ = ["DEFAULT_MAX_READ", "DEFAULT_WRITE_HIGH_WATER", "EchoProtocol"]

logger = logging.getLogger("iocp_echo.connection")

#: The largest read the seed allows: one read never asks for more than this.
DEFAULT_MAX_READ = 65535
#: Bytes waiting to be sent to one client before the server stops reading from it.
DEFAULT_WRITE_HIGH_WATER = 256 * 1024

_warned_read_size = False


def _is_proactor_transport(transport: asyncio.BaseTransport) -> bool:
    if isinstance(transport, proactor_events._ProactorBasePipeTransport):
        return True
    # TLS wraps the proactor transport in asyncio's SSL transport; the loop tells the rest.
    return transport.get_extra_info("sslcontext") is not None and isinstance(
        asyncio.get_running_loop(), proactor_events.BaseProactorEventLoop
    )


class EchoProtocol(asyncio.Protocol):
    """Echo a TCP stream back to its sender.

    Usable on its own with ``loop.create_server(EchoProtocol, ...)`` on a proactor loop;
    :func:`iocp_echo.serve_echo` adds a resilient accept loop, limits and shutdown around it.

    *sock* is the raw accepted socket, when the caller has it: the protocol then closes it
    itself in :meth:`connection_lost`, which keeps CPython's unguarded ``shutdown()`` in
    ``_call_connection_lost`` from raising on a reset connection and leaking the socket.
    """

    def __init__(
        self,
        *,
        max_read: int = DEFAULT_MAX_READ,
        idle_timeout: float | None = None,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
        sock: socket.socket | None = None,
        on_lost: Callable[[EchoProtocol, BaseException | None], None] | None = None,
    ) -> None:
        self.max_read = max_read
        self.idle_timeout = idle_timeout
        self.write_high_water = write_high_water
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.reading_paused = False
        self._sock = sock
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_activity = 0.0
        #: When the transport's read now in flight was issued (loop time: monotonic).
        self.read_started = 0.0
        self._last_unsent = 0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        global _warned_read_size
        if not _is_proactor_transport(transport):
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            raise ProactorRequiredError(
                f"EchoProtocol needs a proactor transport, got {type(transport).__name__}: "
                "serve it on iocp_echo.new_event_loop() (asyncio.ProactorEventLoop on Windows)"
            )
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # The transport asks getpeername(), which fails once the peer has reset; the address
        # the accept returned (set by the server) is then the better answer.
        self.peer = transport.get_extra_info("peername") or self.peer
        self._loop = asyncio.get_running_loop()
        self._last_activity = self.read_started = self._loop.time()
        try:
            if transport.get_extra_info("sslcontext") is None:
                # (With TLS the socket is read by asyncio's TLS layer, in 64 KiB records;
                # max_read then bounds nothing: see the README.)
                _private.set_read_buffer_size(transport, self.max_read)
        except _private.InternalsUnavailable as exc:
            if not _warned_read_size:
                _warned_read_size = True
                logger.warning("cannot bound reads to max_read=%d bytes: %s", self.max_read, exc)
        transport.set_write_buffer_limits(high=self.write_high_water)
        if self.idle_timeout is not None:
            self._idle_timer = self._loop.call_later(self.idle_timeout, self._check_idle)
        logger.debug("connection opened from %s", _format_peer(self.peer))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self._loop is not None
        size = len(data)
        self.bytes_received += size
        self._last_activity = self.read_started = self._loop.time()
        self.transport.write(data)
        self.bytes_sent += size

    def eof_received(self) -> bool:
        # Returning False closes the transport once every queued echo has been sent, which is
        # exactly the half-close contract: the client still gets all its bytes, then EOF.
        logger.debug("end of stream from %s", _format_peer(self.peer))
        return False

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.reading_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.reading_paused = False
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._sock is not None:
            _close_quietly(self._sock)
        peer = _format_peer(self.peer)
        if exc is None:
            logger.debug("connection from %s closed", peer)
        elif isinstance(exc, OSError):
            logger.warning(
                "connection from %s lost: %s: %s (OS error %s)",
                peer,
                type(exc).__name__,
                exc,
                os_error_code(exc),
            )
        else:
            logger.error("connection from %s failed", peer, exc_info=exc)
        if self._on_lost is not None:
            self._on_lost(self, exc)

    # -- for the server ---------------------------------------------------------------------

    @property
    def bytes_unsent(self) -> int:
        """Bytes handed to the transport that the kernel has not yet taken."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self) -> None:
        """Close after the echoes already queued have been sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping anything not yet sent."""
        if self.transport is not None:
            self.transport.abort()

    def _check_idle(self) -> None:
        assert self._loop is not None and self.idle_timeout is not None
        now = self._loop.time()
        unsent = self.bytes_unsent
        if unsent != self._last_unsent:  # a send completed: the client is reading
            self._last_unsent = unsent
            self._last_activity = now
        idle_for = now - self._last_activity
        if idle_for >= self.idle_timeout:
            self._idle_timer = None
            logger.info(
                "closing connection from %s: no traffic for %.1f s (idle_timeout)",
                _format_peer(self.peer),
                idle_for,
            )
            self.abort()
        else:
            self._idle_timer = self._loop.call_later(self.idle_timeout - idle_for, self._check_idle)


def _close_quietly(sock: socket.socket) -> None:
    if sock.fileno() == -1:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer reset or the socket never connected: nothing left to flush
    sock.close()


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)
