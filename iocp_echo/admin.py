"""A read-only view of a running server for people: periodic summaries, stuck-operation
warnings, and a local HTTP endpoint serving :meth:`EchoServer.snapshot` as JSON.

The endpoint binds 127.0.0.1 only and answers ``GET /`` and nothing else: it exposes peer
addresses, so it is never reachable from another machine.
"""

from __future__ import annotations

import asyncio
import json
import logging

from . import introspection
from .protocol import _format_peer
from .server import EchoServer

__all__ = ["DEFAULT_STUCK_AFTER", "log_stats", "start_admin", "summary_line"]

logger = logging.getLogger("iocp_echo.admin")

DEFAULT_STUCK_AFTER = 30.0
_MAX_REQUEST_HEAD = 8192
_REQUEST_TIMEOUT = 5.0


def summary_line(server: EchoServer) -> str:
    """One line for a log: connections, bytes, pending operations by kind, oldest age."""
    stats = server.stats()
    if stats.pending_unavailable is not None:
        pending = f"unavailable ({stats.pending_unavailable})"
    else:
        pending = " ".join(f"{k}={n}" for k, n in sorted(stats.pending_by_kind.items())) or "none"
    return (
        f"connections open={stats.open_connections} total={stats.total_connections} "
        f"refused={stats.refused_connections} | bytes in={stats.bytes_received} "
        f"out={stats.bytes_sent} | pending {pending} | oldest {stats.oldest_pending_age:.1f}s"
    )


def log_stats(server: EchoServer, stuck_after: float = DEFAULT_STUCK_AFTER) -> None:
    """Log the summary at INFO and one WARNING per operation older than *stuck_after* s.

    An accept waits for the next client and a read for the client's next byte, so on an idle
    server those grow old harmlessly; the warning still names them, since "nothing arrived
    for N seconds" is what a person asking about stuck I/O wants to see.
    """
    logger.info("%s", summary_line(server))
    try:
        operations = server.pending_operations()
    except introspection.IntrospectionUnavailable:
        return
    for op in operations:
        if op.age > stuck_after:
            logger.warning(
                "%s operation pending for %.1f s (%s, %s bytes) on fd %s, peer %s",
                op.kind,
                op.age,
                op.state,
                op.nbytes,
                op.fileno,
                _format_peer(op.peer) if op.peer else "-",
            )


async def start_admin(server: EchoServer, port: int = 0) -> asyncio.Server:
    """Serve ``server.snapshot()`` as JSON on ``http://127.0.0.1:PORT/``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        request = head.split(b"\r\n", 1)[0].split()
        if len(request) >= 2 and request[0] == b"GET" and request[1] in (b"/", b"/snapshot"):
            status, body = "200 OK", json.dumps(server.snapshot(), indent=1).encode()
        else:
            status, body = "404 Not Found", b'{"error": "only GET / is served"}'
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, limit=_MAX_REQUEST_HEAD)
