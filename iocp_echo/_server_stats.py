"""What an :class:`~iocp_echo.EchoServer` reports of itself: :class:`ServerStats` and the
operations it has in flight.

Kept apart from the server's life because it only reads: the counters the accepting side keeps
(``_accepting.py``), the live connections' own counters, and what introspection finds pending
on the server's sockets (the engine's transports report their own operations; for asyncio's
transports, the loop's futures are matched to the connections by :meth:`Reporting.owners`).
A worker process sends the same records to its supervisor (``_worker_protocol.py``).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from . import introspection
from ._server_state import ServerState
from ._stock import StockConnection
from ._transport import CompletionTransport

__all__ = ["Reporting", "ServerStats"]


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
    #: With ``proxy_protocol``: connections by what became of their PROXY header (see
    #: ``proxy_protocol.OUTCOMES``; every outcome present); empty without.
    proxy_headers: dict[str, int] = field(default_factory=dict)


class Reporting(ServerState):
    """The reporting side of :class:`~iocp_echo.EchoServer` (see the module docstring)."""

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
            bytes_unsent=sum(c.get_write_buffer_size() for c in connections),
            reading_paused=sum(c.reading_paused for c in connections),
            errors=dict(self._errors),
            pending_by_kind=pending["by_kind"],
            pending_by_state=pending["by_state"],
            oldest_pending_age=pending["oldest_age"],
            pending_unavailable=unavailable,
            proxy_headers={} if self._proxy is None else dict(self._proxy.outcomes),
        )

    def pending_operations(self) -> list[introspection.PendingOperation]:
        """The operations in flight on this server's sockets, oldest first: its accepts and
        its connections' reads and writes (and, just after they close, their cancelled
        operations until the kernel returns them)."""
        engine_ops: list[introspection.PendingOperation] = []
        stock_sockets: list[socket.socket] = list(self._listeners)
        for connection in [*self._connections, *self._released]:
            if isinstance(connection, CompletionTransport):
                engine_ops.extend(introspection.engine_operations(connection))
            else:
                stock_sockets.append(connection.socket)
        _, owners = self.owners()
        operations = introspection.collect(self._loop, stock_sockets, owners)
        if engine_ops:
            operations = sorted([*operations, *engine_ops], key=lambda op: op.started)
        return operations

    def owners(self) -> tuple[asyncio.AbstractEventLoop, dict[int, Any]]:
        """This server's fallback connections by ``id()`` of their socket (introspection
        matches their transports' futures with them)."""
        owned = {id(c.socket): c for c in self._connections if isinstance(c, StockConnection)}
        return self._loop, owned
