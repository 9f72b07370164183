"""How connections come into an :class:`~iocp_echo.EchoServer`: accepting, admitting, counting.

The server owns its accept loop instead of using ``loop.create_server()``: asyncio's proactor
accept loop closes the listening socket when a single accept fails (CPython gh-93821), and
stops accepting when setting up one connection raises (gh-156365).  Here a failed accept costs
one connection, a failed set-up costs one connection, and the listener lives until the server
closes.

Accepts come from the engine's multishot accept where it has one (io_uring: completions go
straight to :meth:`Accepting._admit`), or from :data:`ACCEPTS_IN_FLIGHT` accept loops per
listener on the backend's ``accept`` (``AcceptEx`` on Windows).  Every connection, accepted
here or adopted from elsewhere (``serve(accept=False)``: the workers on Windows), passes the
same admission: refused past ``max_connections``, then given a transport of the engine, or
asyncio's own proactor transport (``_stock.py``) for TLS or where the engine cannot start.
The server learns that a connection ended from :meth:`Accepting.transport_lost`, which its
transport calls.

:class:`Accepting` is a part of :class:`~iocp_echo.EchoServer`, kept apart because it is the
server's busiest concern; it works on the server's own state (``_server_state.py``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from . import introspection
from ._proxy_receiver import HeaderReader, read_header
from ._server_state import Connection, ServerState
from ._stock import StockConnection
from .errors import os_error_code
from .listeners import format_address

__all__ = ["ACCEPTS_IN_FLIGHT", "ACCEPT_ERROR_BACKOFF", "Accepting"]

#: The server's log, whichever part of it writes.
logger = logging.getLogger("iocp_echo.server")

#: AcceptEx operations kept in flight per listening socket, so a burst of connections (or of
#: clients resetting mid-accept) never waits behind one accept's completion.
ACCEPTS_IN_FLIGHT = 4
#: Pause before re-arming after an accept error that is not about one client (for example no
#: buffers or descriptors left): retrying at once would spin.
ACCEPT_ERROR_BACKOFF = 0.5


class Accepting(ServerState):
    """The accepting side of :class:`~iocp_echo.EchoServer` (see the module docstring)."""

    def adopt(self, conn: socket.socket, address: Any) -> None:
        """Serve a connection accepted elsewhere (see ``serve(accept=False)``), with the same
        limits as the server's own accepts.  Call it on the loop's thread (from another
        thread: ``loop.call_soon_threadsafe(server.adopt, conn, address)``)."""
        conn.setblocking(False)
        self._admit(conn, address)

    def _start_accepting(self) -> None:
        """Post the first accepts on every listener."""
        for listener in self._listeners:
            if self._engine is not None and self._engine.accepts:
                # one multishot accept per listener, completions straight to _admit
                self._engine.start_accepting(listener, self._admit, self._accept_failed)
                continue
            for _ in range(ACCEPTS_IN_FLIGHT):
                first = self._issue_accept(listener)
                task = self._loop.create_task(self._accept_loop(listener, first))
                self._accept_tasks.append(task)

    def _stop_accepting(self) -> None:
        """Cancel every accept and close the listeners (idempotent: _shutdown() repeats it)."""
        for task in self._accept_tasks:
            task.cancel()
        # Cancel the accepts themselves too: a task cancelled before it first ran never
        # awaits the accept _start() posted for it.
        for future in list(self._accepts):
            self._abandon_accept(future)
        if self._engine is not None and self._engine.accepts:
            self._engine.stop_accepting()
        for listener in self._listeners:
            listener.close()

    def _issue_accept(self, listener: socket.socket) -> asyncio.Future[tuple[socket.socket, Any]]:
        future = self._backend.accept(self._loop, listener)
        introspection.record(future, "accept", 0)
        self._accepts.add(future)
        future.add_done_callback(self._accepts.discard)
        return future

    @staticmethod
    def _abandon_accept(future: asyncio.Future[tuple[socket.socket, Any]]) -> None:
        """Cancel an accept nobody will await, or close what it accepted."""
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            future.result()[0].close()

    async def _accept_loop(
        self, listener: socket.socket, first: asyncio.Future[tuple[socket.socket, Any]] | None
    ) -> None:
        while True:
            try:
                future = first if first is not None else self._issue_accept(listener)
                first = None
                try:
                    conn, address = await future
                except asyncio.CancelledError:
                    self._abandon_accept(future)  # it may have accepted just as we were cancelled
                    raise
            except OSError as exc:
                if self._closing:
                    return
                delay = self._accept_failed(exc)
                if delay:
                    await asyncio.sleep(delay)
                continue
            except Exception as exc:
                if self._closing:
                    return
                self._errors[type(exc).__name__] += 1
                self._failed_accepts += 1
                logger.exception("unexpected error while accepting; still accepting")
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF)
                continue
            self._admit(conn, address)

    def _accept_failed(self, exc: OSError) -> float:
        """Count and log (rate-limited) a failed accept; return how long to wait before
        accepting again: 0 when one client went away, a pause when the cause is not one
        client (no descriptors or buffers left: retrying at once would spin)."""
        self._errors[type(exc).__name__] += 1
        self._failed_accepts += 1
        if self._backend.is_transient_accept_error(exc):
            self._log.log(
                "accept failed",
                logging.WARNING,
                "accept on %s failed: the client went away before it completed: %s "
                "(OS error %s); still accepting",
                format_address(self._local),
                exc,
                os_error_code(exc),
                error_class=type(exc).__name__,
            )
            return 0.0
        self._log.log(
            "accept failed",
            logging.ERROR,
            "accept on %s failed: %s (OS error %s); retrying in %.1f s",
            format_address(self._local),
            exc,
            os_error_code(exc),
            ACCEPT_ERROR_BACKOFF,
            error_class=type(exc).__name__,
        )
        return ACCEPT_ERROR_BACKOFF

    def _admit(self, conn: socket.socket, address: Any) -> None:
        if self._closing:
            conn.close()
            return
        proxy = self._proxy
        if proxy is not None and address not in proxy.trusted:
            proxy.refused("untrusted", address, f"the source is not in proxy_from {proxy.trusted}")
            conn.close()
            return
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            self._refused += 1
            self._log.log(
                "connection refused",
                logging.WARNING,
                "refusing connection from %s: max_connections=%d reached",
                format_address(address),
                self._max_connections,
                error_class="max_connections",
            )
            conn.close()
            return
        self._total += 1
        if self._engine is None:
            task = self._loop.create_task(self._set_up_stock(conn, address))
            self._setup_tasks.add(task)
            task.add_done_callback(self._setup_tasks.discard)
            return
        try:
            protocol = self._protocol_factory()
            if proxy is not None:
                protocol = HeaderReader(protocol, proxy)
            transport = self._engine.connect(
                conn,
                protocol,
                peer=address,
                write_high_water=self._write_high_water,
                owner=self,
            )
        except Exception as exc:
            conn.close()
            self._set_up_failed(address, exc)
            return
        self._connections.add(transport)
        self._no_connections.clear()
        logger.debug("connection opened from %s", format_address(address))
        transport.start()

    async def _set_up_stock(self, conn: socket.socket, address: Any) -> None:
        """Wrap an accepted socket in asyncio's proactor transport (TLS, or no engine)."""
        connection: StockConnection | None = None
        proxy = None
        try:
            if self._proxy is not None:
                header = await read_header(conn, address, self._proxy)
                if header is None:
                    conn.close()
                    return
                proxy = (header, address)
                address = header.source or address
            connection = StockConnection(
                self._protocol_factory(),
                sock=conn,
                peer=address,
                max_read=self._max_read,
                write_high_water=self._write_high_water,
                owner=self,
                proxy=proxy,
            )
            self._connections.add(connection)
            self._no_connections.clear()
            logger.debug("connection opened from %s", format_address(address))
            await self._loop.connect_accepted_socket(lambda: connection, conn, ssl=self._ssl)
        except BaseException as exc:
            if connection is None or connection.transport is None:
                conn.close()  # connection_lost will not come: clean up here
                if connection is not None:
                    self._forget(connection)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._set_up_failed(address, exc)

    def _set_up_failed(self, address: Any, exc: BaseException) -> None:
        """A failure making one connection costs that connection only."""
        self._errors[type(exc).__name__] += 1
        if isinstance(exc, OSError):
            self._log.log(
                "set-up failed",
                logging.WARNING,
                "setting up the connection from %s failed: %s (OS error %s)",
                format_address(address),
                exc,
                os_error_code(exc),
                error_class=type(exc).__name__,
            )
        else:
            self._log.log(
                "set-up failed",
                logging.ERROR,
                "setting up the connection from %s failed",
                format_address(address),
                exc_info=exc,
                error_class=type(exc).__name__,
            )

    def transport_lost(self, connection: Any, exc: BaseException | None) -> None:
        """A connection ended (its protocol's ``connection_lost`` has run)."""
        peer = format_address(connection.peer)
        if exc is None:
            logger.debug("connection from %s closed", peer)
        elif self._reading_proxy_header(connection):
            pass  # counted and logged once, as "incomplete", by the header reader
        else:
            self._errors[type(exc).__name__] += 1
            if isinstance(exc, OSError):
                self._log.log(
                    "connection lost",
                    logging.WARNING,
                    "connection from %s lost: %s: %s (OS error %s)",
                    peer,
                    type(exc).__name__,
                    exc,
                    os_error_code(exc),
                    error_class=type(exc).__name__,
                )
            else:
                self._log.log(
                    "connection lost",
                    logging.ERROR,
                    "connection from %s failed",
                    peer,
                    exc_info=exc,
                    error_class=type(exc).__name__,
                )
        self._forget(connection)

    def _forget(self, connection: Connection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        self._closed_bytes_in += connection.bytes_received
        self._closed_bytes_out += connection.bytes_sent
        self._released.add(connection)
        if not self._connections:
            self._no_connections.set()
