"""The state the parts of an :class:`~iocp_echo.EchoServer` share, declared once.

``EchoServer`` (``server.py``: its life and public face) is put together from parts kept in
modules of their own: accepting (``_accepting.py``), reporting (``_server_stats.py``) and the
sweep (``_sweeping.py``).  They all work on the one server's attributes.  :class:`ServerState`
names those attributes and their types, so that mypy checks every part against the same
declarations; ``EchoServer.__init__`` gives them their values.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

from ._backend import Backend, Engine
from ._logflood import LogLimiter
from ._proxy_receiver import ProxyPolicy
from ._stock import StockConnection
from ._transport import CompletionTransport

__all__ = ["Connection", "ServerState"]

#: A connection as the server sees it: the engine's transport, or the fallback's adapter.
Connection = CompletionTransport | StockConnection


class ServerState:
    """The attributes of an :class:`~iocp_echo.EchoServer` that more than one part uses."""

    # What it serves with, and on.
    _loop: asyncio.AbstractEventLoop
    _backend: Backend
    #: None: asyncio's own transports serve every connection (TLS, or no engine here).
    _engine: Engine | None
    _listeners: list[socket.socket]
    #: The first listener's address: the server's, in logs and snapshots.
    _local: Any
    # Its arguments.
    _protocol_factory: Callable[[], asyncio.BaseProtocol]
    _max_read: int
    _max_connections: int | None
    _idle_timeout: float | None
    _ssl: _ssl.SSLContext | None
    _write_high_water: int
    #: None: connections start with the client's own bytes, no PROXY header.
    _proxy: ProxyPolicy | None
    # Its life.
    _closing: bool
    #: Not ready any more (``/readyz``), still serving: see ``EchoServer.start_draining``.
    _draining: bool
    #: Lines a client can cause are rate-limited per kind; stats keep exact counts.
    _log: LogLimiter
    _accept_tasks: list[asyncio.Task[None]]
    _accepts: set[asyncio.Future[tuple[socket.socket, Any]]]
    _setup_tasks: set[asyncio.Task[None]]
    _sweep_handle: asyncio.TimerHandle | None
    # Its connections, open and just closed (kept weakly while an operation is in flight).
    _connections: set[Connection]
    _no_connections: asyncio.Event
    _released: weakref.WeakSet[Any]
    # Its counters.
    _total: int
    _refused: int
    _failed_accepts: int
    _closed_bytes_in: int
    _closed_bytes_out: int
    _errors: Counter[str]

    def _reading_proxy_header(self, connection: Connection) -> bool:
        """Whether *connection* is still reading its PROXY header: until the header is
        complete, its timeout and its loss are the header reader's to count and log."""
        return self._proxy is not None and connection._proxy is None
