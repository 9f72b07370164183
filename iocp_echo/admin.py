"""A read-only view of a running server for people and machines: periodic summaries,
stuck-operation warnings, and a small HTTP endpoint:

- ``GET /`` (or ``/snapshot``): the server's stats and oldest pending operations as JSON;
- ``GET /healthz``: 200 while the process answers at all (liveness);
- ``GET /readyz``: 200 while the server wants new connections, 503 once it is draining,
  closing, or at ``max_connections`` (what a load balancer's health check asks);
- ``GET /metrics``: the same counters in Prometheus' text format (``metrics.py``).

``GET /`` lists peer addresses, which are nobody else's business: it is answered only to a
client on this machine, and only when the request's ``Host`` is a loopback name.  The second
rule keeps web pages out: a page on a domain that re-resolves to 127.0.0.1 ("DNS rebinding")
can read any loopback HTTP server that answers whatever ``Host`` it is asked for, and such a
page cannot send a loopback ``Host``.  The other three paths reveal no address, and their
clients (a balancer's health check, Kubernetes' probes, Prometheus) send any ``Host`` or none:
they are answered whatever the ``Host``.  The endpoint binds 127.0.0.1 by default; bind it
elsewhere (``host=``, ``--admin-host``) for probes and scrapes from other machines.

The endpoint must never hold up the server it describes:

- every request has one deadline, covering reading the request, building the answer and
  sending it; a client still connected after it is dropped (a client that asks and never
  reads would otherwise keep the connection, and since Python 3.12 ``Server.wait_closed()``
  waits for every connection);
- :meth:`AdminEndpoint.close` drops requests in progress, so shutting down never waits on one;
- an answer lists at most :data:`MAX_OPERATIONS_LIMIT` operations (the oldest) with their
  total, never all of them: listing 10,000 connections' operations costs the event loop a
  quarter of a second and the client megabytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import re
import sys
import time
import typing
import urllib.parse
import weakref
from typing import Any

from . import introspection, metrics
from ._logflood import LogLimiter
from .errors import os_error_code
from .server import EchoServer, serve

__all__ = [
    "DEFAULT_OPERATIONS_LIMIT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_STUCK_AFTER",
    "MAX_OPERATIONS_LIMIT",
    "STUCK_LOG_BURST",
    "STUCK_LOG_INTERVAL",
    "AdminEndpoint",
    "flush_stats_log",
    "log_stats",
    "start_admin",
    "summary_line",
]

logger = logging.getLogger("iocp_echo.admin")

DEFAULT_STUCK_AFTER = 30.0
#: Seconds a client gets for the whole exchange: request, answer, and its sending.
DEFAULT_REQUEST_TIMEOUT = 5.0
#: Operations listed by ``GET /`` (oldest first); ``GET /?limit=N`` asks for up to N.
DEFAULT_OPERATIONS_LIMIT = 100
MAX_OPERATIONS_LIMIT = 1000
_MAX_REQUEST_HEAD = 8192
#: Stuck-operation warnings logged as they are, per operation kind, per interval; the rest
#: of the interval's are counted and summarised (see :func:`log_stats`).
STUCK_LOG_BURST = 10
STUCK_LOG_INTERVAL = 60.0
#: One log-limiter kind per operation kind (a small fixed set, as LogLimiter wants).
_STUCK_KINDS: dict[str, str] = {
    kind: f"stuck {kind}" for kind in typing.get_args(introspection.Kind)
}
#: Each server's stuck-warning limiter, kept from one report to the next.
_stuck_limiters: weakref.WeakKeyDictionary[EchoServer, LogLimiter] = weakref.WeakKeyDictionary()

# A loopback name, with an optional port: what a browser sends only for a page it loaded
# from this machine itself, never for a page from a rebinding domain.
_LOOPBACK_HOST = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::(?P<port>[0-9]{1,5}))?")


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


def log_stats(
    server: EchoServer,
    stuck_after: float = DEFAULT_STUCK_AFTER,
    *,
    limiter: LogLimiter | None = None,
) -> None:
    """Log the summary at INFO, with how many operations are older than *stuck_after* s, and
    a WARNING naming each of them, rate-limited.

    An accept waits for the next client and a read for the client's next byte, so on an idle
    server those grow old harmlessly; the warning still names them, since "nothing arrived
    for N seconds" is what a person asking about stuck I/O wants to see.  But 3,000 idle
    clients are 3,000 stuck reads at every report, so the warnings go through a
    :class:`~iocp_echo._logflood.LogLimiter`, one kind per operation kind: at most
    :data:`STUCK_LOG_BURST` lines per kind per :data:`STUCK_LOG_INTERVAL` seconds (the
    oldest operations first), then one summary line per kind counting the rest by state.
    Each server keeps its own *limiter* across calls unless one is given.
    """
    if limiter is None:
        limiter = _stuck_limiters.get(server)
        if limiter is None:
            limiter = _stuck_limiters[server] = LogLimiter(
                logger, burst=STUCK_LOG_BURST, interval=STUCK_LOG_INTERVAL
            )
    limiter.flush()  # the summaries of kinds whose interval is over
    line = summary_line(server)
    try:
        operations = server.pending_operations()
    except introspection.IntrospectionUnavailable:
        logger.info("%s", line)
        return
    stuck = [op for op in operations if op.age > stuck_after]
    logger.info("%s | %d older than %s s", line, len(stuck), f"{stuck_after:g}")
    for op in stuck:  # oldest first
        limiter.log(
            _STUCK_KINDS.get(op.kind, "stuck operation"),
            logging.WARNING,
            "%s operation pending for %.1f s (%s, %s bytes) on fd %s, peer %s",
            op.kind,
            op.age,
            op.state,
            op.nbytes,
            op.fileno,
            _format_address(op.peer) if op.peer else "-",
            error_class=op.state,
        )


def flush_stats_log(server: EchoServer) -> None:
    """Log now the summaries of stuck-operation warnings :func:`log_stats` held back for
    *server* (for when it closes: otherwise they wait for the end of their interval)."""
    limiter = _stuck_limiters.get(server)
    if limiter is not None:
        limiter.flush(force=True)


class _Refusal(Exception):
    """A request answered with an error status and no data."""

    def __init__(self, status: str, message: str, *headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class AdminEndpoint:
    """The admin endpoint of one server (see :func:`start_admin`).

    ``GET /`` answers with the server's description, its ``stats()``, and its
    :data:`DEFAULT_OPERATIONS_LIMIT` oldest pending operations; ``GET /?limit=N`` with up to
    N (0 to :data:`MAX_OPERATIONS_LIMIT`).  ``operations_total`` says how many there were.

    It accepts through iocp_echo's own accept loop (:func:`iocp_echo.serve`), not
    ``loop.create_server()``: a client that resets before its accept completes costs that
    connection, never the endpoint's listening socket (CPython gh-93821).
    """

    def __init__(self, server: EchoServer, request_timeout: float, host: str = "127.0.0.1") -> None:
        self._server = server
        self._host = host
        self._timeout = request_timeout
        self._listener: EchoServer | None = None
        self._requests: set[_Request] = set()
        self._closing = False

    async def _start(self, port: int) -> None:
        self._listener = await serve(
            lambda: _Request(self),
            self._host,
            port,
            max_read=_MAX_REQUEST_HEAD,
            shutdown_timeout=self._timeout,
        )

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening socket(s).  They belong to the endpoint: do not close them."""
        return () if self._listener is None else self._listener.sockets

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.port

    @property
    def connections(self) -> int:
        """Requests in progress: at most one request timeout old each."""
        return len(self._requests)

    def close(self) -> None:
        """Stop accepting, and drop every request in progress."""
        self._closing = True
        for request in list(self._requests):
            request.drop()
        if self._listener is not None:
            self._listener.close()

    async def wait_closed(self) -> None:
        """Wait, at most one request timeout, until no connection of the endpoint remains."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._listener is not None:
                    await self._listener.wait_closed()
        except TimeoutError:
            logger.warning(
                "admin endpoint still had %d connection(s) %.1f s after closing; not waiting",
                len(self._requests),
                self._timeout,
            )

    async def __aenter__(self) -> AdminEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    async def _answer(self, head: bytes, peer: Any) -> tuple[str, str, bytes]:
        """The status, content type and body for a request *head* from *peer*, or
        :class:`_Refusal`."""
        lines = head[:-4].decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        if len(request) != 3 or not request[2].startswith("HTTP/1."):
            raise _Refusal("400 Bad Request", "malformed request line")
        hosts = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _Refusal("400 Bad Request", "malformed header line")
            if name.lower() == "host":
                hosts.append(value.strip())
        method, target = request[0], urllib.parse.urlsplit(request[1])
        probe = target.path in _PROBES and not target.scheme and not target.netloc
        # Before anything else: a refused Host learns nothing, not even which paths exist.
        if not probe and (len(hosts) != 1 or not _is_loopback_host(hosts[0])):
            raise _Refusal("403 Forbidden", "the Host header must be localhost, 127.0.0.1 or [::1]")
        if method not in ("GET", "HEAD"):
            raise _Refusal("405 Method Not Allowed", "only GET is served", "Allow: GET, HEAD")
        if probe:
            if target.query:
                raise _Refusal("400 Bad Request", f"{target.path} takes no query")
            return self._probe(target.path)
        if target.path not in ("/", "/snapshot") or target.scheme or target.netloc:
            raise _Refusal("404 Not Found", "served: GET /, /snapshot, /healthz, /readyz, /metrics")
        if not _is_loopback_peer(peer):
            raise _Refusal(
                "403 Forbidden", "the snapshot (peer addresses) is for this machine only"
            )
        limit = _parse_limit(target.query)
        document = await self._document(limit)
        return "200 OK", _JSON, json.dumps(document, separators=(",", ":")).encode()

    def _probe(self, path: str) -> tuple[str, str, bytes]:
        """``/healthz``, ``/readyz``, ``/metrics``: cheap, and safe for anyone to read."""
        if path == "/healthz":
            return "200 OK", _TEXT, b"ok\n"
        if path == "/readyz":
            readiness = self._server.readiness()
            status = "200 OK" if readiness == "ready" else "503 Service Unavailable"
            return status, _TEXT, f"{readiness}\n".encode()
        return "200 OK", metrics.CONTENT_TYPE, metrics.render_metrics(self._server).encode()

    async def _document(self, limit: int) -> dict[str, Any]:
        """The server's stats and its *limit* oldest pending operations.

        Each of ``stats()`` and ``pending_operations()`` walks every operation in flight
        (about 10 microseconds each); the loop runs in between, so one request stalls it for
        at most one walk at a time, and serializing is bounded by *limit*.
        """
        server = self._server
        stats = server.stats()
        document: dict[str, Any] = {
            "server": {
                "host": server.host,
                "port": server.port,
                "backend": server.backend_name,
                "python": sys.version.split()[0],
                "serving": server.is_serving(),
                "readiness": server.readiness(),
            },
            "stats": dataclasses.asdict(stats),
            "operations": [],
            "operations_total": sum(stats.pending_by_kind.values()),
            "operations_limit": limit,
            "operations_unavailable": stats.pending_unavailable,
            "time": time.monotonic(),
        }
        if limit == 0 or stats.pending_unavailable is not None:
            return document
        await asyncio.sleep(0)
        try:
            operations = server.pending_operations()
        except introspection.IntrospectionUnavailable as exc:
            document["operations_unavailable"] = str(exc)
            return document
        document["operations"] = [op.as_dict() for op in operations[:limit]]
        document["operations_total"] = len(operations)
        document["time"] = time.monotonic()
        return document


_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
#: The paths answered to any client and any Host: they reveal no peer address.
_PROBES = ("/healthz", "/readyz", "/metrics")


class _Request(asyncio.Protocol):
    """One admin connection: read a request head, answer it, close; all of it within one
    deadline, which aborts the connection when it passes."""

    def __init__(self, endpoint: AdminEndpoint) -> None:
        self._endpoint = endpoint
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None
        self._head = bytearray()
        self._deadline: asyncio.TimerHandle | None = None
        self._answering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        endpoint = self._endpoint
        if endpoint._closing:
            transport.abort()
            return
        endpoint._requests.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(endpoint._timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        if self._answering is not None:
            return  # anything after the head is not read: GET has no body
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 or end + 4 > _MAX_REQUEST_HEAD:
            if len(self._head) > _MAX_REQUEST_HEAD:
                self.drop()  # a request head over 8 KiB
            return
        assert self._transport is not None
        self._transport.pause_reading()
        head = bytes(self._head[: end + 4])
        self._answering = asyncio.get_running_loop().create_task(self._answer(head))

    def eof_received(self) -> bool:
        if self._answering is None:
            self.drop()  # hung up before the request was complete
        return True  # a complete request is still answered

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._answering is not None and not self._answering.done():
            self._answering.cancel()
        self._endpoint._requests.discard(self)
        if exc is not None:
            logger.debug(
                "admin connection from %s failed: %s (OS error %s)",
                _format_address(self._peer) if self._peer else "-",
                exc,
                os_error_code(exc) if isinstance(exc, OSError) else None,
            )

    def drop(self) -> None:
        """Abort the connection: whatever is unsent is discarded."""
        if self._transport is not None:
            self._transport.abort()

    def _expired(self) -> None:
        self._deadline = None
        logger.warning(
            "admin request from %s not done within %.1f s: connection dropped",
            _format_address(self._peer) if self._peer else "-",
            self._endpoint._timeout,
        )
        self.drop()

    async def _answer(self, head: bytes) -> None:
        transport = self._transport
        assert transport is not None
        headers = tuple[str, ...]()
        try:
            status, content_type, body = await self._endpoint._answer(head, self._peer)
        except _Refusal as refusal:
            status, content_type, headers = refusal.status, _JSON, refusal.headers
            body = json.dumps({"error": str(refusal)}).encode()
        except asyncio.CancelledError:
            raise  # the connection is gone
        except Exception:
            logger.exception("admin request from %s failed", _format_address(self._peer))
            self.drop()
            return
        if transport.is_closing():
            return
        if head.startswith(b"HEAD "):
            transport.write(_response(status, content_type, headers, body)[: -len(body) or None])
        else:
            transport.write(_response(status, content_type, headers, body))
        transport.close()  # once the answer is sent (or the deadline drops it)


def _format_address(address: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) for a log line."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def _is_loopback_peer(peer: Any) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _is_loopback_host(value: str) -> bool:
    match = _LOOPBACK_HOST.fullmatch(value.lower())
    return match is not None and (match["port"] is None or 0 < int(match["port"]) < 65536)


def _parse_limit(query: str) -> int:
    if not query:
        return DEFAULT_OPERATIONS_LIMIT
    try:
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _Refusal("400 Bad Request", "malformed query") from None
    values = fields.pop("limit", None)
    if fields:
        raise _Refusal("400 Bad Request", "the only query parameter is limit")
    if values is None or len(values) != 1 or not values[0].isdigit() or len(values[0]) > 6:
        raise _Refusal("400 Bad Request", "limit must be one whole number")
    limit = int(values[0])
    if limit > MAX_OPERATIONS_LIMIT:
        raise _Refusal("400 Bad Request", f"limit must be at most {MAX_OPERATIONS_LIMIT}")
    return limit


def _response(status: str, content_type: str, headers: tuple[str, ...], body: bytes) -> bytes:
    head = [
        f"HTTP/1.0 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


async def start_admin(
    server: EchoServer,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> AdminEndpoint:
    """Serve *server*'s stats and pending operations as JSON on ``http://HOST:PORT/``, with
    ``/healthz``, ``/readyz`` and ``/metrics`` beside them (see the module docstring).

    *host* is 127.0.0.1 unless probes or scrapes come from other machines (``0.0.0.0`` for a
    Kubernetes pod): ``GET /`` is answered to this machine only, wherever it listens.  A client
    gets *request_timeout* seconds for its whole request; close the endpoint with ``close()``
    and ``await wait_closed()`` (or use it as an async context manager).
    """
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be greater than 0, got {request_timeout}")
    endpoint = AdminEndpoint(server, request_timeout, host)
    await endpoint._start(port)
    return endpoint
