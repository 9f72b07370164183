"""``serve_echo()`` and the :class:`EchoServer` it returns.

The server owns its accept loop instead of using ``loop.create_server()``: asyncio's proactor
accept loop closes the listening socket when a single accept fails (CPython gh-93821), and
stops accepting when setting up one connection raises (gh-156365).  Here a failed accept costs
one connection, a failed set-up costs one connection, and the listener lives until
:meth:`EchoServer.close`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl as _ssl
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _platform, introspection
from .errors import AddressInUseError, InvalidPortError, is_address_in_use, os_error_code
from .protocol import DEFAULT_MAX_READ, DEFAULT_WRITE_HIGH_WATER, EchoProtocol, _format_peer

__all__ = ["EchoServer", "ServerStats", "serve_echo"]

logger = logging.getLogger("iocp_echo.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_BACKLOG = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
#: AcceptEx operations kept in flight per listening socket, so a burst of connections (or of
#: clients resetting mid-accept) never waits behind one accept's completion.
ACCEPTS_IN_FLIGHT = 4
#: Pause before re-arming after an accept error that is not about one client (for example no
#: buffers or descriptors left): retrying at once would spin.
ACCEPT_ERROR_BACKOFF = 0.5
#: How long wait_closed() waits for cancelled operations' completion packets.
_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of one server's counters (see :meth:`EchoServer.stats`)."""

    open_connections: int
    total_connections: int
    refused_connections: int
    failed_accepts: int
    bytes_received: int
    bytes_sent: int
    bytes_unsent: int
    reading_paused: int
    errors: dict[str, int] = field(default_factory=dict)
    #: Pending overlapped operations of the server by kind and by state, and the age in
    #: seconds of the oldest; ``pending_unavailable`` says why when they cannot be known.
    pending_by_kind: dict[str, int] = field(default_factory=dict)
    pending_by_state: dict[str, int] = field(default_factory=dict)
    oldest_pending_age: float = 0.0
    pending_unavailable: str | None = None


def _validate_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidPortError(f"port must be an integer, got {port!r}")
    if port != 0 and not 1024 <= port <= 65535:
        raise InvalidPortError(
            f"port {port} is out of range: use 1024-65535, or 0 to let the OS choose a free port"
        )
    return port


def _validate_positive(name: str, value: object, *, allow_none: bool, kind: type = int) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        expected = "a number" if kind is float else "an integer"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")


def _open_listeners(
    host: str, port: int, backlog: int, prepare: Callable[[socket.socket], None]
) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _canon, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if listeners and port == 0:  # every address on the port the OS chose first
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, type_, proto)
            listeners.append(sock)
            prepare(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if is_address_in_use(exc):
                    raise AddressInUseError(
                        exc.errno,
                        f"cannot listen on {_format_peer(address)}: port {address[1]!r} is already "
                        f"in use (OS error {os_error_code(exc)}); stop the program using it or "
                        f"choose another port",
                    ) from None
                raise OSError(
                    exc.errno, f"cannot listen on {_format_peer(address)}: {exc.strerror}"
                ) from exc
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


async def serve_echo(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_read: int = DEFAULT_MAX_READ,
    max_connections: int | None = None,
    idle_timeout: float | None = None,
    ssl: _ssl.SSLContext | None = None,
    backlog: int = DEFAULT_BACKLOG,
    write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> EchoServer:
    """Start an echo server on the running proactor loop and return it, already accepting.

    Arguments are checked first (:class:`InvalidPortError` for a port outside 1024-65535 and
    not 0), then the platform (:class:`UnsupportedPlatformError`), then the running loop
    (:class:`ProactorRequiredError`), all before any socket is opened.  A port in use raises
    :class:`AddressInUseError` naming it.

    *max_read* caps every read; *max_connections* closes connections past the limit at once;
    *idle_timeout* closes a connection with no traffic in either direction for that many
    seconds; *write_high_water* is how many unsent bytes make the server stop reading from a
    client; *shutdown_timeout* bounds how long :meth:`EchoServer.wait_closed` lets in-flight
    echoes drain.
    """
    port = _validate_port(port)
    _validate_positive("max_read", max_read, allow_none=False)
    _validate_positive("max_connections", max_connections, allow_none=True)
    _validate_positive("idle_timeout", idle_timeout, allow_none=True, kind=float)
    _validate_positive("backlog", backlog, allow_none=False)
    _validate_positive("write_high_water", write_high_water, allow_none=False)
    _validate_positive("shutdown_timeout", shutdown_timeout, allow_none=False, kind=float)
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext or None, got {ssl!r}")
    backend = _platform.backend()
    loop = asyncio.get_running_loop()
    _platform.require_proactor(loop)
    listeners = _open_listeners(host, port, backlog, backend.prepare_listener)
    server = EchoServer(
        loop,
        backend,
        listeners,
        max_read=max_read,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        ssl=ssl,
        write_high_water=write_high_water,
        shutdown_timeout=shutdown_timeout,
    )
    server._start()
    return server


class EchoServer:
    """A running echo server.  Use ``async with`` or call :meth:`close` and :meth:`wait_closed`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        backend: _platform.Backend,
        listeners: list[socket.socket],
        *,
        max_read: int,
        max_connections: int | None,
        idle_timeout: float | None,
        ssl: _ssl.SSLContext | None,
        write_high_water: int,
        shutdown_timeout: float,
    ) -> None:
        self._loop = loop
        self._backend = backend
        self._listeners = listeners
        self._max_read = max_read
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._ssl = ssl
        self._write_high_water = write_high_water
        self._shutdown_timeout = shutdown_timeout
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._accepts: set[asyncio.Future[tuple[socket.socket, Any]]] = set()
        self._setup_tasks: set[asyncio.Task[None]] = set()
        self._connections: set[EchoProtocol] = set()
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._closing = False
        self._closed = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._total = 0
        self._refused = 0
        self._failed_accepts = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._errors: Counter[str] = Counter()
        self._local = listeners[0].getsockname()
        # Sockets of closed connections, kept (weakly: the proactor's cache holds them while an
        # operation is in flight) so that pending_operations() still sees their cancelled I/O.
        self._released_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    # -- public API -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._local[0])

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose, when started with port 0)."""
        return int(self._local[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets.  They belong to the server: do not close them."""
        return tuple(self._listeners)

    @property
    def backend_name(self) -> str:
        return self._backend.NAME

    def is_serving(self) -> bool:
        return not self._closing

    def stats(self) -> ServerStats:
        connections = list(self._connections)
        try:
            pending = introspection.summarize(self.pending_operations())
            unavailable = None
        except introspection.IntrospectionUnavailable as exc:
            pending = {"by_kind": {}, "by_state": {}, "oldest_age": 0.0}
            unavailable = str(exc)
        return ServerStats(
            open_connections=len(connections),
            total_connections=self._total,
            refused_connections=self._refused,
            failed_accepts=self._failed_accepts,
            bytes_received=self._closed_bytes_in + sum(c.bytes_received for c in connections),
            bytes_sent=self._closed_bytes_out + sum(c.bytes_sent for c in connections),
            bytes_unsent=sum(c.bytes_unsent for c in connections),
            reading_paused=sum(c.reading_paused for c in connections),
            errors=dict(self._errors),
            pending_by_kind=pending["by_kind"],
            pending_by_state=pending["by_state"],
            oldest_pending_age=pending["oldest_age"],
            pending_unavailable=unavailable,
        )

    def pending_operations(self) -> list[introspection.PendingOperation]:
        """The overlapped operations in flight on this server's sockets, oldest first: its
        accepts and its connections' reads and writes (and, just after they close, their
        cancelled operations until the completion port returns them)."""
        _, owners = self.owners()
        sockets = [*self._listeners, *self._released_sockets]
        sockets += [c._sock for c in self._connections if c._sock is not None]
        return introspection.collect(self._loop, sockets, owners)

    def owners(self) -> tuple[asyncio.AbstractEventLoop, dict[int, EchoProtocol]]:
        """This server's connections by ``id()`` of their socket (for introspection)."""
        owned = {id(c._sock): c for c in self._connections if c._sock is not None}
        return self._loop, owned

    def snapshot(self) -> dict[str, Any]:
        """Everything known about the server now, ready for ``json.dumps``."""
        try:
            operations = [op.as_dict() for op in self.pending_operations()]
            unavailable = None
        except introspection.IntrospectionUnavailable as exc:
            operations, unavailable = [], str(exc)
        return {
            "server": {
                "host": self.host,
                "port": self.port,
                "backend": self._backend.NAME,
                "python": sys.version.split()[0],
                "serving": self.is_serving(),
            },
            "stats": dataclasses.asdict(self.stats()),
            "operations": operations,
            "operations_unavailable": unavailable,
            "time": time.monotonic(),
        }

    def close(self) -> None:
        """Stop accepting now and start closing every connection (see :meth:`wait_closed`)."""
        if self._closing:
            return
        self._closing = True
        for task in self._accept_tasks:
            task.cancel()
        # Cancel the accepts themselves too: a task cancelled before it first ran never
        # awaits the accept _start() posted for it.
        for future in list(self._accepts):
            self._abandon_accept(future)
        for listener in self._listeners:
            listener.close()
        self._shutdown_task = self._loop.create_task(self._shutdown())

    async def wait_closed(self) -> None:
        """Wait until the server is fully closed.

        In-flight echoes get up to *shutdown_timeout* seconds to be sent; connections still
        open then are aborted.  On return no socket, task or overlapped operation of this
        server remains.
        """
        if not self._closing:
            # asyncio.Server semantics: waiting on a server nobody closed waits for the close.
            await self._closed.wait()
            return
        assert self._shutdown_task is not None
        await asyncio.shield(self._shutdown_task)

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called, or until cancelled (then close, and re-raise)."""
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    async def __aenter__(self) -> EchoServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        state = "closing" if self._closing else "serving"
        return (
            f"<EchoServer {_format_peer(self._local)} {state} "
            f"connections={len(self._connections)} backend={self._backend.NAME!r}>"
        )

    # -- accepting --------------------------------------------------------------------------

    def _start(self) -> None:
        """Post the first accepts now, so that serve_echo() returns with AcceptEx in flight."""
        introspection.register_source(self)
        try:
            for listener in self._listeners:
                for _ in range(ACCEPTS_IN_FLIGHT):
                    first = self._issue_accept(listener)
                    task = self._loop.create_task(self._accept_loop(listener, first))
                    self._accept_tasks.append(task)
        except BaseException:
            self.close()
            raise

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
                self._errors[type(exc).__name__] += 1
                self._failed_accepts += 1
                if self._backend.is_transient_accept_error(exc):
                    logger.warning(
                        "accept on %s failed: the client went away before it completed: %s "
                        "(OS error %s); still accepting",
                        _format_peer(self._local),
                        exc,
                        os_error_code(exc),
                    )
                    continue
                logger.error(
                    "accept on %s failed: %s (OS error %s); retrying in %.1f s",
                    _format_peer(self._local),
                    exc,
                    os_error_code(exc),
                    ACCEPT_ERROR_BACKOFF,
                )
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF)
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

    def _admit(self, conn: socket.socket, address: Any) -> None:
        if self._closing:
            conn.close()
            return
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            self._refused += 1
            logger.warning(
                "refusing connection from %s: max_connections=%d reached",
                _format_peer(address),
                self._max_connections,
            )
            conn.close()
            return
        protocol = EchoProtocol(
            max_read=self._max_read,
            idle_timeout=self._idle_timeout,
            write_high_water=self._write_high_water,
            sock=conn,
            on_lost=self._connection_lost,
        )
        protocol.peer = address
        self._connections.add(protocol)
        self._no_connections.clear()
        self._total += 1
        task = self._loop.create_task(self._set_up(conn, protocol))
        self._setup_tasks.add(task)
        task.add_done_callback(self._setup_tasks.discard)

    async def _set_up(self, conn: socket.socket, protocol: EchoProtocol) -> None:
        """Wrap an accepted socket in a proactor transport; a failure costs only this client."""
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn, ssl=self._ssl)
        except BaseException as exc:
            if protocol.transport is None:  # connection_lost will not come: clean up here
                conn.close()
                self._forget(protocol)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._errors[type(exc).__name__] += 1
            if isinstance(exc, OSError):
                logger.warning(
                    "setting up the connection from %s failed: %s (OS error %s)",
                    _format_peer(protocol.peer),
                    exc,
                    os_error_code(exc),
                )
            else:
                logger.error(
                    "setting up the connection from %s failed",
                    _format_peer(protocol.peer),
                    exc_info=exc,
                )

    def _connection_lost(self, protocol: EchoProtocol, exc: BaseException | None) -> None:
        if exc is not None:
            self._errors[type(exc).__name__] += 1
        self._forget(protocol)

    def _forget(self, protocol: EchoProtocol) -> None:
        if protocol not in self._connections:
            return
        self._connections.discard(protocol)
        self._closed_bytes_in += protocol.bytes_received
        self._closed_bytes_out += protocol.bytes_sent
        if protocol._sock is not None:
            self._released_sockets.add(protocol._sock)
        if not self._connections:
            self._no_connections.set()

    # -- closing ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            await asyncio.gather(*self._accept_tasks, return_exceptions=True)
            for task in list(self._setup_tasks):
                task.cancel()
            await asyncio.gather(*self._setup_tasks, return_exceptions=True)
            for connection in list(self._connections):
                connection.close()
            try:
                await asyncio.wait_for(self._no_connections.wait(), self._shutdown_timeout)
            except TimeoutError:
                logger.warning(
                    "aborting %d connection(s) still sending after shutdown_timeout=%.1f s",
                    len(self._connections),
                    self._shutdown_timeout,
                )
                for connection in list(self._connections):
                    connection.abort()
                await self._no_connections.wait()
            await self._drain_operations()
        finally:
            self._closed.set()

    async def _drain_operations(self) -> None:
        """Wait until the completion port has returned every operation of this server.

        A cancelled operation still owns its ``OVERLAPPED`` until the kernel's packet is
        dequeued; only then is nothing of the server left in the proactor.
        """
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while True:
            try:
                remaining = self.pending_operations()
            except introspection.IntrospectionUnavailable:
                return  # nothing to wait on that we can see
            if not remaining:
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "%d overlapped operation(s) still pending %.0f s after close: %s",
                    len(remaining),
                    _DRAIN_TIMEOUT,
                    remaining,
                )
                return
            await asyncio.sleep(0.001)
