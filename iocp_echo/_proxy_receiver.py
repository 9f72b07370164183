"""Reading a PROXY header before a connection's protocol sees a byte (``proxy_protocol=True``).

Each accepted connection goes through three checks, each counted once in
:attr:`ProxyPolicy.outcomes` (``proxy_protocol.OUTCOMES`` names them):

1. its source must be trusted (``proxy_from``); otherwise it is closed before anything is read;
2. its first bytes must be a valid header, complete within ``proxy_header_timeout`` seconds;
   otherwise it is closed, nothing echoed;
3. the header's client address then replaces the balancer's as the connection's peer: in logs,
   stats, ``pending_operations()``, the admin endpoint and ``get_extra_info("peername")``
   (the balancer's stays as ``"proxy_peername"``, the header as ``"proxy_header"``).

On the completion engine, :class:`HeaderReader` is the transport's protocol until the header
is complete: it is lent the first reads like any protocol, so a header and the client's first
bytes that arrive together cost one read, and then it hands the transport to the real protocol
(``connection_made``) and puts whatever followed the header back at the front of the
transport's backlog, where asyncio's ordering and pausing rules deliver it.  On asyncio's own
transports (TLS, or where the engine cannot run), :func:`read_header` reads the header from
the socket before the transport exists, never past its end (TLS's first bytes must reach the
TLS layer untouched).

Every refusal is logged through a :class:`~iocp_echo._logflood.LogLimiter` of one line per
kind per minute (the rest counted and summarised): a balancer that is misconfigured, or a
scanner, would otherwise write a line per connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from ._logflood import LogLimiter
from .errors import os_error_code
from .listeners import format_address
from .proxy_protocol import (
    OUTCOMES,
    ProxyHeader,
    ProxyHeaderError,
    TrustedSources,
    bytes_wanted,
    parse_header,
)

__all__ = ["HeaderReader", "ProxyPolicy", "read_header"]

logger = logging.getLogger("iocp_echo.proxy")

#: Lines logged as they are per refusal kind per interval (the rest are counted).
LOG_BURST = 1
LOG_INTERVAL = 60.0
#: Bounds of how often the header deadlines are checked (see ``ProxyPolicy``).
_CHECK_MIN = 0.05
_CHECK_MAX = 1.0


class ProxyPolicy:
    """One server's PROXY settings, counters, log limiter, and header deadlines.

    Deadlines: the readers still waiting for their header are kept in a set, and one timer
    for the whole server, running only while the set is not empty, checks them every quarter
    of the timeout (at most every second): a deadline is kept to within that much, late
    rather than early.  A connection costs an add and a discard, where a timer of its own
    (``call_later``, then ``cancel``) cost a heap push and pop and a handle per connection.
    """

    __slots__ = (
        "_check_every",
        "_log",
        "_timer",
        "_watched",
        "loop",
        "outcomes",
        "timeout",
        "trusted",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, trusted: TrustedSources, timeout: float
    ) -> None:
        self.loop = loop
        self.trusted = trusted
        self.timeout = timeout
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._log = LogLimiter(logger, burst=LOG_BURST, interval=LOG_INTERVAL)
        self._watched: set[HeaderReader] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._check_every = max(_CHECK_MIN, min(timeout / 4, _CHECK_MAX))

    def watch(self, reader: HeaderReader) -> None:
        """Time *reader* out (``HeaderReader._expired``) *timeout* seconds from now."""
        reader._started = self.loop.time()
        self._watched.add(reader)
        if self._timer is None:
            self._timer = self.loop.call_later(self._check_every, self._expire)

    def unwatch(self, reader: HeaderReader) -> None:
        self._watched.discard(reader)

    def _expire(self) -> None:
        self._timer = None
        due = self.loop.time() - self.timeout
        for reader in [r for r in self._watched if r._started <= due]:
            reader._expired()  # refuses it, which unwatches it
        if self._watched:
            self._timer = self.loop.call_later(self._check_every, self._expire)

    def close(self) -> None:
        """The server is closed: no deadline is left to keep (nor a timer on the loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watched.clear()
        self._log.flush(force=True)

    def accepted(self, header: ProxyHeader) -> None:
        if header.command == "LOCAL":
            self.outcomes["local"] += 1
        else:
            self.outcomes["v1" if header.version == 1 else "v2"] += 1

    def refused(
        self, outcome: str, peer: Any, reason: str, *, level: int = logging.WARNING
    ) -> None:
        """Count a connection closed for *outcome* and log it, rate-limited."""
        self.outcomes[outcome] += 1
        self._log.log(
            outcome,
            level,
            "closing the connection from %s: PROXY header %s: %s",
            format_address(peer),
            outcome.replace("_", " "),
            reason,
            error_class=outcome,
        )

    def flush(self) -> None:
        self._log.flush()


class HeaderReader(asyncio.Protocol):
    """A connection's protocol until its PROXY header is read (see the module docstring)."""

    __slots__ = ("_buffer", "_done", "_policy", "_protocol", "_started", "_transport")

    def __init__(self, protocol: asyncio.BaseProtocol, policy: ProxyPolicy) -> None:
        self._protocol = protocol
        self._policy = policy
        self._transport: Any = None
        self._buffer: bytearray | None = None
        self._started = 0.0  # loop time of connection_made (the deadline's start)
        self._done = False  # an outcome has been counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._policy.watch(self)

    def data_lent(self, view: memoryview) -> None:
        """The first reads: parse them (usually the whole header is in the first one)."""
        if self._done:
            return
        buffer = self._buffer
        if buffer is not None:
            buffer += view
            data: bytes | bytearray | memoryview = buffer
        else:
            data = view
        try:
            header = parse_header(data)
        except ProxyHeaderError as exc:
            self._refuse(exc.outcome, str(exc))
            return
        if header is None:
            if buffer is None:
                self._buffer = bytearray(view)
            return
        # What followed the header: a view of the buffer being lent (delivered on at once,
        # it is lent on too), or a copy out of this reader's own buffer.
        rest = view[header.length :] if buffer is None else bytes(data[header.length :])
        transport, protocol = self._transport, self._protocol
        self._finish()
        self._policy.accepted(header)
        transport._hand_over(protocol, header, rest)

    def data_received(self, data: bytes) -> None:
        self.data_lent(memoryview(data))

    def eof_received(self) -> bool:
        if not self._done:
            self._refuse("incomplete", "the client closed its side first", level=logging.INFO)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done and exc is not None:  # (closed by the server: not counted)
            error = f"{type(exc).__name__}: {exc} (OS error {os_error_code(exc)})"
            self._policy.refused("incomplete", self._peer(), error, level=logging.INFO)
        self._finish()

    def _expired(self) -> None:
        """The header deadline passed (called by the policy; nothing once done)."""
        if not self._done:
            self._refuse("timeout", f"not complete within {self._policy.timeout:g} s")

    def _refuse(self, outcome: str, reason: str, *, level: int = logging.WARNING) -> None:
        transport, peer = self._transport, self._peer()
        self._finish()
        self._policy.refused(outcome, peer, reason, level=level)
        transport.abort()

    def _finish(self) -> None:
        """Done: no deadline any more, and nothing of the connection kept."""
        if not self._done:
            self._done = True
            self._policy.unwatch(self)
        self._buffer = None
        self._transport = None
        self._protocol = None  # type: ignore[assignment]

    def _peer(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport else None


async def read_header(conn: socket.socket, peer: Any, policy: ProxyPolicy) -> ProxyHeader | None:
    """Read *conn*'s PROXY header and nothing after it, within the policy's deadline (asyncio's
    own transports: the header must be off the socket before the transport reads it).

    Returns None, with the connection's outcome counted and logged, when it is refused: the
    caller then closes *conn*.
    """
    loop = policy.loop
    data = bytearray()
    try:
        async with asyncio.timeout(policy.timeout):
            while True:
                wanted = bytes_wanted(data)  # raises ProxyHeaderError when it cannot be one
                if not wanted:
                    header = parse_header(data)
                    assert header is not None
                    policy.accepted(header)
                    return header
                chunk = await loop.sock_recv(conn, wanted)
                if not chunk:
                    policy.refused(
                        "incomplete", peer, "the client closed its side first", level=logging.INFO
                    )
                    return None
                data += chunk
    except ProxyHeaderError as exc:
        policy.refused(exc.outcome, peer, str(exc))
    except TimeoutError:
        policy.refused("timeout", peer, f"not complete within {policy.timeout:g} s")
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc} (OS error {os_error_code(exc)})"
        policy.refused("incomplete", peer, error, level=logging.INFO)
    return None
