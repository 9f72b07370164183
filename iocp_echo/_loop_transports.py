"""The completion engine under every stream of a loop: the mixin both backends' loops share.

CPython's proactor loops wrap each connected socket (``create_server``, ``create_connection``,
``connect_accepted_socket``, streams, TLS, ``start_tls``) in their generic
``_ProactorSocketTransport``, which turns every read and send into a Future resolved on a later
loop iteration.  :class:`EngineTransports` makes the loop wrap it in the backend's completion
transport instead (see ``_transport.py``), so an application's own servers and clients get the
engine the echo server runs on.  The loop keeps one engine for all of them, made when the
first socket transport is, and closed with the loop.

Where the engine cannot run (CPython's proactor internals changed, or the kernel lacks a
feature the engine needs), the loop says why once and uses asyncio's transports: slower, never
wrong.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from asyncio import trsock
from typing import Any

from . import _platform, _private
from ._backend import Engine
from ._transport import CompletionTransport

__all__ = ["EngineTransports"]

logger = logging.getLogger("iocp_echo.loop")

#: asyncio's own transports' default write buffer limit (low: a quarter of it).
WRITE_HIGH_WATER = 64 * 1024
#: The read size of the loop's connections: what one asyncio proactor read asks for.
READ_SIZE = 65536
#: While the loop has connections, and once more after the last one closed, the engine is
#: asked this often to give back memory nothing uses (IOCP: a quiet connection's read buffer;
#: io_uring: the provided buffers' pages), as a server's sweep does.
SWEEP_INTERVAL = 1.0


class EngineTransports:
    """Mixin for a ``BaseProactorEventLoop`` subclass; listed before it in the bases."""

    _engine: Engine | None = None
    #: Why the engine does not serve this loop's sockets; None while it does (or is not made).
    engine_unavailable: str | None = None
    _open_connections = 0
    _sweep_handle: asyncio.TimerHandle | None = None

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> asyncio.Transport:
        engine = self._connection_engine()
        if engine is None:
            return super()._make_socket_transport(  # type: ignore[misc,no-any-return]
                sock, protocol, waiter, extra, server
            )
        loop: Any = self
        extra = {"socket": trsock.TransportSocket(sock), **(extra or {})}
        for name, get in (("sockname", sock.getsockname), ("peername", sock.getpeername)):
            if name not in extra:
                try:
                    extra[name] = get()
                except OSError:
                    extra[name] = None
        link = _ConnectionLink(self, server)
        transport = engine.connect(
            sock, protocol, peer=extra["peername"], write_high_water=WRITE_HIGH_WATER, owner=link
        )
        transport._extra = extra
        if server is not None:
            _private.server_attach(server, transport)
        self._open_connections += 1
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(SWEEP_INTERVAL, self._sweep)
        loop.call_soon(transport.start)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)
        return transport

    def _make_ssl_transport(
        self,
        rawsock: socket.socket,
        protocol: asyncio.BaseProtocol,
        sslcontext: Any,
        waiter: asyncio.Future[Any] | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.Transport:
        """TLS as every asyncio loop does it (``SSLProtocol`` over a socket transport), over
        the engine's transport."""
        if self._connection_engine() is None:
            return super()._make_ssl_transport(  # type: ignore[misc,no-any-return]
                rawsock,
                protocol,
                sslcontext,
                waiter,
                server_side=server_side,
                server_hostname=server_hostname,
                extra=extra,
                server=server,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        ssl_protocol: Any = _private.ssl_protocol_class()(  # type: ignore[call-arg]
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        super().close()  # type: ignore[misc]

    # -- the engine -------------------------------------------------------------------------

    def _connection_engine(self) -> Engine | None:
        if self._engine is None and self.engine_unavailable is None:
            try:
                self._engine = _platform.backend().make_engine(self, max_read=READ_SIZE)  # type: ignore[arg-type]
            except (_private.InternalsUnavailable, OSError) as exc:
                self.engine_unavailable = str(exc)
                logger.warning(
                    "the completion engine is unavailable (%s): this loop's socket "
                    "transports are asyncio's own",
                    exc,
                )
        return self._engine

    def _connection_lost(self) -> None:
        self._open_connections -= 1

    def _sweep(self) -> None:
        """Every second while connections are open; the last time, a second at most after
        the last one closed (io_uring gives the ring's pages back only then)."""
        self._sweep_handle = None
        if self._engine is None:
            return
        self._engine.sweep(time.monotonic())
        if self._open_connections:
            loop: Any = self
            self._sweep_handle = loop.call_later(SWEEP_INTERVAL, self._sweep)


class _ConnectionLink:
    """What a loop's connection tells when it is gone: the loop (for the engine's memory) and
    the asyncio ``Server`` that accepted it (``wait_closed()`` waits for it)."""

    __slots__ = ("loop", "server")

    def __init__(self, loop: EngineTransports, server: Any) -> None:
        self.loop = loop
        self.server = server

    def transport_lost(self, transport: CompletionTransport, exc: BaseException | None) -> None:
        self.loop._connection_lost()
        if self.server is not None:
            server, self.server = self.server, None
            _private.server_detach(server, transport)


def _set_result_unless_cancelled(future: asyncio.Future[Any], result: Any) -> None:
    if not future.cancelled():
        future.set_result(result)
