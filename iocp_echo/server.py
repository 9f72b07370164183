"""``serve()``, ``serve_echo()`` and the :class:`EchoServer` they return.

The server owns its accept loop instead of using ``loop.create_server()``, so that one failed
accept or one failed set-up costs one connection and never the listener (``_accepting.py``
says how, and admits each connection).  Each accepted connection gets a transport of the
backend's completion engine (driven straight from its completions: see ``_transport.py``), or,
for TLS and when the engine cannot start on this CPython or kernel, asyncio's own proactor
transport (``_stock.py``).  One sweep timer per server closes idle connections and lets the
engine reclaim buffers from quiet ones.  This module holds the server's life: its arguments,
start, public face, and shutdown.
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
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from . import _platform, _private, introspection
from ._accepting import ACCEPT_ERROR_BACKOFF as ACCEPT_ERROR_BACKOFF
from ._accepting import ACCEPTS_IN_FLIGHT as ACCEPTS_IN_FLIGHT
from ._accepting import Accepting
from ._logflood import LogLimiter
from ._proxy_receiver import ProxyPolicy
from ._server_stats import Reporting, ServerStats
from ._sweeping import Sweeping
from ._transport import DEFAULT_WRITE_HIGH_WATER
from .listeners import format_address, open_listeners, validate_port, validate_positive
from .protocol import DEFAULT_MAX_READ, EchoProtocol
from .proxy_protocol import DEFAULT_HEADER_TIMEOUT, DEFAULT_TRUSTED, TrustedSources

__all__ = ["EchoServer", "ServerStats", "serve", "serve_echo"]

logger = logging.getLogger("iocp_echo.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_BACKLOG = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
#: How long wait_closed() waits for cancelled operations' completion packets.
_DRAIN_TIMEOUT = 5.0


async def serve(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
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
    sock: socket.socket | Sequence[socket.socket] | None = None,
    accept: bool = True,
    proxy_protocol: bool = False,
    proxy_from: str | Sequence[str] = DEFAULT_TRUSTED,
    proxy_header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> EchoServer:
    """Serve any asyncio protocol on the running proactor loop; return the server, accepting.

    *protocol_factory* makes one :class:`asyncio.Protocol` or :class:`asyncio.BufferedProtocol`
    per connection (or a protocol with ``data_lent``: see :class:`iocp_echo.LendingProtocol`).
    Arguments are checked first (:class:`InvalidPortError` for a port outside 1024-65535 and
    not 0), then the platform (:class:`UnsupportedPlatformError`), then the running loop
    (:class:`ProactorRequiredError`), all before any socket is opened.  A port in use raises
    :class:`AddressInUseError` naming it.

    *max_read* caps every read; *max_connections* closes connections past the limit at once;
    *idle_timeout* closes a connection with no traffic in either direction for that many
    seconds; *write_high_water* is how many unsent bytes make a transport ask its protocol to
    pause; *shutdown_timeout* bounds how long :meth:`EchoServer.wait_closed` lets in-flight
    writes drain.  *sock* serves sockets already listening (one, or several: one server and
    one ``max_connections`` for all of them) instead of opening *host*:*port*.

    *proxy_protocol* makes every connection start with a PROXY protocol header (version 1 or
    2, as HAProxy, nginx, Envoy and cloud load balancers send it), accepted only from the
    networks in *proxy_from* (CIDRs; loopback by default) and only if complete within
    *proxy_header_timeout* seconds; the client it names replaces the balancer as the
    connection's peer everywhere.  See :mod:`iocp_echo.proxy_protocol`.
    """
    port = validate_port(port)
    if not callable(protocol_factory):
        raise TypeError(f"protocol_factory must be callable, got {protocol_factory!r}")
    validate_positive("max_read", max_read, allow_none=False)
    validate_positive("max_connections", max_connections, allow_none=True)
    validate_positive("idle_timeout", idle_timeout, allow_none=True, kind=float)
    validate_positive("backlog", backlog, allow_none=False)
    validate_positive("write_high_water", write_high_water, allow_none=False)
    validate_positive("shutdown_timeout", shutdown_timeout, allow_none=False, kind=float)
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext or None, got {ssl!r}")
    validate_positive("proxy_header_timeout", proxy_header_timeout, allow_none=False, kind=float)
    trusted = TrustedSources(proxy_from) if proxy_protocol else None
    backend = _platform.backend()
    loop = asyncio.get_running_loop()
    _platform.require_proactor(loop)
    if sock is not None:
        listeners = [sock] if isinstance(sock, socket.socket) else list(sock)
        for listener in listeners:
            if not isinstance(listener, socket.socket) or listener.type != socket.SOCK_STREAM:
                raise TypeError(f"sock must be listening TCP sockets, got {listener!r}")
            listener.setblocking(False)
        if not listeners:
            raise TypeError("sock is an empty sequence: give at least one listening socket")
    else:
        listeners = open_listeners(host, port, backlog, backend.prepare_listener)
    server = EchoServer(
        loop,
        backend,
        listeners,
        protocol_factory,
        max_read=max_read,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        ssl=ssl,
        write_high_water=write_high_water,
        shutdown_timeout=shutdown_timeout,
    )
    if trusted is not None:
        server._proxy = ProxyPolicy(loop, trusted, proxy_header_timeout)
    server._start(accept=accept)
    return server


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
    sock: socket.socket | None = None,
    proxy_protocol: bool = False,
    proxy_from: str | Sequence[str] = DEFAULT_TRUSTED,
    proxy_header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> EchoServer:
    """Start an echo server on the running proactor loop: :func:`serve` with
    :class:`EchoProtocol`.  See :func:`serve` for the arguments and the errors raised."""
    validate_positive("max_read", max_read, allow_none=False)
    return await serve(
        lambda: EchoProtocol(max_read=max_read),
        host,
        port,
        max_read=max_read,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        ssl=ssl,
        backlog=backlog,
        write_high_water=write_high_water,
        shutdown_timeout=shutdown_timeout,
        sock=sock,
        proxy_protocol=proxy_protocol,
        proxy_from=proxy_from,
        proxy_header_timeout=proxy_header_timeout,
    )


class EchoServer(Accepting, Reporting, Sweeping):
    """A running server.  Use ``async with`` or call :meth:`close` and :meth:`wait_closed`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        backend: _platform.Backend,
        listeners: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
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
        self._protocol_factory = protocol_factory
        self._max_read = max_read
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._ssl = ssl
        self._write_high_water = write_high_water
        self._shutdown_timeout = shutdown_timeout
        self._accept_tasks = []
        self._accepts = set()
        self._setup_tasks = set()
        self._connections = set()
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._closing = False
        self._draining = False
        self._close_requested = asyncio.Event()
        self._closed = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._sweep_handle = None
        self._total = 0
        self._refused = 0
        self._failed_accepts = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._errors = Counter()
        self._log = LogLimiter(logger)
        self._proxy = None
        self._local = listeners[0].getsockname()
        # Connections already closed, kept weakly (an operation in flight keeps them alive) so
        # that pending_operations() still sees their cancelled I/O until the kernel returns it.
        self._released = weakref.WeakSet()
        self._engine = None
        self._engine_unavailable: str | None = "TLS runs on asyncio's own transport"
        if ssl is None:
            try:
                self._engine = backend.make_engine(loop, max_read=max_read)
                self._engine_unavailable = None
            except (_private.InternalsUnavailable, OSError) as exc:
                self._engine_unavailable = str(exc)
                logger.warning(
                    "the completion engine is unavailable (%s); serving on asyncio's own "
                    "proactor transports instead",
                    exc,
                )

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

    @property
    def engine_name(self) -> str:
        """Which transports serve connections: the completion engine, or asyncio's own."""
        if self._engine is not None:
            return self._engine.name
        return f"asyncio proactor transports ({self._engine_unavailable})"

    def is_serving(self) -> bool:
        return not self._closing

    @property
    def draining(self) -> bool:
        """Draining (:meth:`start_draining`): still serving, but no longer ready."""
        return self._draining

    def readiness(self) -> str:
        """``"ready"`` to take connections, else why not: ``"closing"``, ``"draining"``, or
        ``"full"`` (``max_connections`` open).  What ``GET /readyz`` answers."""
        if self._closing:
            return "closing"
        if self._draining:
            return "draining"
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            return "full"
        return "ready"

    def is_ready(self) -> bool:
        """Should a load balancer send new connections here?  See :meth:`readiness`."""
        return self.readiness() == "ready"

    def start_draining(self) -> None:
        """Say "not ready" (``/readyz`` answers 503) while still serving and accepting, so that
        a load balancer's health check takes this server out before it stops accepting."""
        if not self._draining and not self._closing:
            self._draining = True
            logger.info(
                "draining: not ready any more, still serving %s", format_address(self._local)
            )

    async def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Stop gracefully: :meth:`start_draining`, keep serving and accepting for
        *drain_seconds* (cut short by :meth:`close`), then close and :meth:`wait_closed`."""
        if drain_seconds < 0:
            raise ValueError(f"drain_seconds must be 0 or more, got {drain_seconds}")
        self.start_draining()
        if drain_seconds > 0 and not self._closing:
            try:
                await asyncio.wait_for(self._close_requested.wait(), drain_seconds)
            except TimeoutError:
                pass
        self.close()
        await self.wait_closed()

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
                "engine": self.engine_name,
                "python": sys.version.split()[0],
                "serving": self.is_serving(),
                "readiness": self.readiness(),
                "proxy_protocol": self._proxy is not None,
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
        self._close_requested.set()
        # The task first: a second Ctrl-C (KeyboardInterrupt) landing in the middle of the
        # steps below must not leave a server that is closing with nothing to finish the job.
        self._shutdown_task = self._loop.create_task(self._shutdown())
        self._stop_accepting()

    async def wait_closed(self) -> None:
        """Wait until the server is fully closed.

        In-flight writes get up to *shutdown_timeout* seconds to be sent; connections still
        open then are aborted.  On return no socket, task or operation of this server remains.
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
            f"<EchoServer {format_address(self._local)} {state} "
            f"connections={len(self._connections)} backend={self._backend.NAME!r}>"
        )

    def _start(self, *, accept: bool = True) -> None:
        """Post the first accepts now, so that serve() returns with accepts in flight."""
        introspection.register_source(self)
        try:
            if accept:
                self._start_accepting()
        except BaseException:
            self.close()
            raise
        self._start_sweeping()
        logger.info("serving on %s with %s", format_address(self._local), self.engine_name)

    # -- closing ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            self._stop_accepting()  # done by close() already, unless it was interrupted
            self._stop_sweeping()
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
            self._log.flush(force=True)
            if self._proxy is not None:
                self._proxy.close()
            if self._engine is not None:
                self._engine.close()
        finally:
            self._closed.set()

    async def _drain_operations(self) -> None:
        """Wait until the kernel has returned every operation of this server.

        A cancelled operation still owns its buffer (and, on Windows, its ``OVERLAPPED``)
        until its completion is dequeued; only then is nothing of the server left.
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
                    "%d operation(s) still pending %.0f s after close: %s",
                    len(remaining),
                    _DRAIN_TIMEOUT,
                    remaining,
                )
                return
            await asyncio.sleep(0.001)
