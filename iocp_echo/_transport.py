"""iocp_echo's own stream transport: the half of a connection that is the same on every backend.

asyncio's proactor transports turn every completed operation into a Future whose done-callback
runs on the next loop iteration (``call_soon``), and pin a 64 KiB read buffer per connection.
The completion engine drives a connection straight from its completions instead: the backend
calls the transport's completion methods inline, and the transport calls the protocol.  This
module holds what does not depend on the kernel interface: the protocol hosting rules, flow
control, the write queue's accounting, and closing.  The backend subclasses
(``_iocp.engine.IocpTransport``, ``_uring.engine.UringTransport``) issue the reads and sends.

Hosting rules (any asyncio protocol works):

* a protocol with a ``data_lent(view)`` method (see :class:`LendingProtocol`) is lent a
  ``memoryview`` of the engine's own pooled read buffer, valid only during the call; if it
  passes that very view to :meth:`write`, the bytes are sent from the pooled buffer without a
  copy, and the buffer returns to the pool when the kernel has sent them;
* an :class:`asyncio.BufferedProtocol` gets ``get_buffer()``/``buffer_updated()``;
* any other :class:`asyncio.Protocol` gets ``data_received(bytes)``.

Re-entrancy and ordering (asyncio's contract, which streams depend on):

* no method of the transport calls the protocol before it returns, with the two exceptions
  asyncio's own transports make: ``write()`` and ``set_write_buffer_limits()`` may call
  ``pause_writing()``.  ``resume_reading()`` only schedules: whatever was read meanwhile is
  delivered by a loop callback;
* data, EOF and a read error reach the protocol through one ordered path, once each: a
  completion delivers inline only when nothing is waiting before it and reading is not
  paused; otherwise it joins the connection's *backlog* (data copied out of the kernel's
  buffer, so a paused connection pins no pooled or provided buffer), which the scheduled
  resume drains in order, stopping as soon as the protocol pauses again.  EOF and errors come
  after the last byte; after them no read is issued again;
* what a paused connection can hold is bounded by what the kernel had already completed when
  the pause took effect: a backend stops reading on pause (io_uring cancels its multishot
  receive; IOCP issues no further receive).

States of the write side (as in CPython's transports, documented where they are driven):
IDLE (nothing in flight), SENDING (one send in flight, ``_sending`` bytes), BACKED UP (more
queued behind it: ``_queue``).  Closing waits until the write side is IDLE; aborting does not.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Any, Protocol, runtime_checkable

from . import _private

__all__ = [
    "DEFAULT_WRITE_HIGH_WATER",
    "END_OF_STREAM",
    "CompletionTransport",
    "LendingProtocol",
]

logger = logging.getLogger("iocp_echo.transport")

#: Bytes waiting to be sent before the protocol is asked to pause writing (its producer).
DEFAULT_WRITE_HIGH_WATER = 256 * 1024

#: The end of the stream, as it waits in a backlog behind data.
END_OF_STREAM: Any = object()


@runtime_checkable
class LendingProtocol(Protocol):
    """A protocol that can read straight from the engine's buffers.

    ``data_lent`` receives a view of a pooled read buffer that is valid only until it returns.
    Writing that same view back (``transport.write(view)``) hands the buffer to the send
    without a copy, which is how the echo avoids touching its bytes in Python at all.
    """

    def data_lent(self, data: memoryview) -> None: ...


class ConnectionOwner(Protocol):
    """What a transport tells the object that accepted it (the server)."""

    def transport_lost(self, transport: CompletionTransport, exc: BaseException | None) -> None: ...


#: asyncio's flow-control transport base (``loop.sendfile()``'s fallback requires it), which
#: holds the write limits and the loop; plain ``asyncio.Transport`` if its shape changed.
_BASE = _private.flow_control_transport()
_BASE_SLOTS = ("_high_water", "_loop", "_low_water", "_protocol_paused")


class CompletionTransport(_BASE):  # type: ignore[misc,valid-type]
    """A stream transport driven by completions; see the module docstring."""

    #: ``loop.start_tls()`` may upgrade this transport (it swaps the protocol while paused).
    _start_tls_compatible = True

    __slots__ = (
        "__weakref__",
        "_backlog",
        "_closing",
        "_conn_lost",
        "_deliver",
        "_empty_waiter",
        "_eof_pending",
        "_eof_written",
        "_fileno",
        "_last_traffic",
        "_lend",
        "_lent",
        "_max_read",
        "_owner",
        "_peer",
        "_protocol",
        "_proxy",
        "_queue",
        "_queued",
        "_read_ended",
        "_reading",
        "_resume_handle",
        "_sending",
        "_sock",
        "bytes_received",
        "bytes_sent",
        "last_activity",
    ) + (() if _BASE is not asyncio.Transport else _BASE_SLOTS)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        peer: Any,
        max_read: int,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
        owner: ConnectionOwner | None = None,
    ) -> None:
        # asyncio.BaseTransport keeps an ``_extra`` dict per transport; a server's extras are
        # computed on demand instead, which keeps an idle connection small.  The loop's own
        # transports (``_loop_transports.py``) set asyncio's dict.
        self._extra: dict[str, Any] | None = None  # type: ignore[assignment]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # As asyncio's transports do: without it a write that leaves a small tail (a
            # 65,536-byte echo read as 65,535 + 1) waits for the peer's delayed ACK (Nagle).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # the peer is already gone: the first read will say so
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._peer = peer
        #: (the PROXY header, the balancer's address) once a header named the client.
        self._proxy: tuple[Any, Any] | None = None
        self._protocol: asyncio.BaseProtocol = protocol
        self._max_read = max_read
        self._owner = owner
        self._closing = False
        self._conn_lost = 0
        self._eof_written = False
        self._eof_pending = False
        self._reading = True
        self._read_ended = False  # EOF or a read error arrived: no read is issued again
        self._backlog: collections.deque[Any] | None = None
        self._resume_handle: asyncio.Handle | None = None
        self._protocol_paused = False
        self._sending = 0
        self._queue: list[bytes] | None = None
        self._queued = 0
        self._lent: memoryview | None = None
        self._empty_waiter: asyncio.Future[None] | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.last_activity = time.monotonic()
        self._last_traffic = 0
        self._high_water = write_high_water
        self._low_water = write_high_water // 4
        self._deliver = self._choose_delivery(protocol)

    # -- asyncio.Transport ------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = self._extra
        if extra is not None:  # a loop's transport: asyncio's extras, made with it
            return extra.get(name, default)
        if name == "peername":
            return self._peer if self._peer is not None else default
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        if name == "socket":
            return self._sock
        if name in ("proxy_header", "proxy_peername") and self._proxy is not None:
            return self._proxy[0] if name == "proxy_header" else self._proxy[1]
        return default

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._deliver = self._choose_delivery(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._reading_paused()

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._schedule_resume()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 4 * low if low is not None else DEFAULT_WRITE_HIGH_WATER
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        return self._sending + self._queued

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if self._eof_written or self._eof_pending:
            raise RuntimeError("write_eof() already called")
        if self._conn_lost:
            self._conn_lost += 1
            if self._conn_lost == 5:
                logger.warning("socket.send() raised exception.")
            return
        if not data:
            return
        if self._sending or self._queue:
            # SENDING or BACKED UP: queue a copy (the caller may reuse its buffer).
            if self._queue is None:
                self._queue = []
            chunk = bytes(data)
            self._queue.append(chunk)
            self._queued += len(chunk)
            self._maybe_pause_protocol()
            return
        self._start_send(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_written or self._eof_pending:
            return
        if self._sending or self._queue:
            self._eof_pending = True  # sent once the write side is IDLE
        else:
            self._shutdown_write()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._backlog = None
        self._stop_reading()
        if not self._sending and not self._queue:
            self._schedule_connection_lost(None)
        # else: _send_completed() finishes the close once the write side is IDLE

    def abort(self) -> None:
        self._force_close(None)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<{type(self).__name__} fd={self._fileno} peer={self._peer!r} {state}>"

    # -- for the owner and introspection ----------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def peer(self) -> Any:
        return self._peer

    @property
    def reading_paused(self) -> bool:
        return not self._reading

    def note_activity(self, now: float) -> float:
        """When traffic last moved either way, as seen by the owner's periodic sweep.

        The hot path keeps byte counts only (no clock read per read or write); the sweep
        compares them with what it saw last time, so an activity time is exact to one sweep
        interval, which is all an idle timeout or a quiet-connection check needs."""
        traffic = self.bytes_received + self.bytes_sent
        if traffic != self._last_traffic:
            self._last_traffic = traffic
            self.last_activity = now
        return self.last_activity

    def _hand_over(
        self, protocol: asyncio.BaseProtocol, header: Any, rest: bytes | memoryview
    ) -> None:
        """A PROXY header was read (``_proxy_receiver.HeaderReader``): the client it names
        is this connection's peer from now on, *protocol* takes the connection
        (``connection_made`` now), and *rest*, what followed the header in the same read, is
        its first data, delivered before anything read later and never while it pauses.

        Called while the header reader is being delivered a read.  *rest* is then either
        bytes, or a view of the very buffer being lent (a ``memoryview``): delivered now, it
        is lent on in its turn, so an echo of it is sent from the pooled buffer, as it would
        have been had there been no header."""
        self._proxy = (header, self._peer)
        if header.source is not None:
            self._peer = header.source
        if self._extra is not None:  # a loop's transport keeps asyncio's extras in a dict
            self._extra.update(
                peername=self._peer, proxy_header=header, proxy_peername=self._proxy[1]
            )
        self.set_protocol(protocol)
        protocol.connection_made(self)
        if not rest or self._closing:
            return
        if not self._reading or self._backlog is not None:
            self._hold(bytes(rest), first=True)
        elif type(rest) is memoryview:
            self._deliver(rest)  # lent on (a lending protocol), as the read itself would be
        else:
            # Now, as this read's delivery would have been had there been no header: nothing
            # waits before it (a loop iteration and a copy fewer per connection).
            self._dispatch(rest)

    # -- what a backend implements ----------------------------------------------------------

    def start(self) -> None:
        """Call ``connection_made`` and start reading; errors cost this connection only."""
        try:
            self._protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.connection_made() call failed.")
            return
        if self._reading and not self._closing:
            self._start_reading()

    def _start_reading(self) -> None:
        """Issue the first read (the protocol may have paused reading or closed already)."""
        raise NotImplementedError

    def _reading_paused(self) -> None:
        raise NotImplementedError

    def _reading_resumed(self) -> None:
        """Reading resumed and the backlog is empty: issue a read unless one is in flight.
        Called from a loop callback, never from inside a delivery."""
        raise NotImplementedError

    def _stop_reading(self) -> None:
        """Stop reading for good (closing): cancel the read in flight, if any."""
        raise NotImplementedError

    def _start_send(self, data: bytes | bytearray | memoryview) -> None:
        """The write side is IDLE: send *data* (a lent view without copying it)."""
        raise NotImplementedError

    def _cancel_all(self) -> None:
        """Cancel every operation in flight (abort): their completions will find us closed."""
        raise NotImplementedError

    def operations(self) -> list[tuple[str, str, int, float]]:
        """``(kind, state, nbytes, started)`` of each operation in flight, as recorded when it
        was issued (``started`` is a ``time.monotonic()`` value)."""
        raise NotImplementedError

    # -- loop.sendfile() ---------------------------------------------------------------------
    # asyncio's proactor loops send a file over a transport natively (``_sendfile_native``):
    # reading paused, they wait for the write side to be IDLE, send the file on the socket,
    # then resume.  Meanwhile write() is refused, so no bytes can cut into the file's.

    _sendfile_compatible = _private.sendfile_mode("TRY_NATIVE")

    def _make_empty_waiter(self) -> asyncio.Future[None]:
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        if self._conn_lost:
            self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
        elif not self._sending and not self._queue:
            self._empty_waiter.set_result(None)
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None

    # -- shared machinery -------------------------------------------------------------------

    def _choose_delivery(self, protocol: asyncio.BaseProtocol) -> Any:
        """The one callable a completed read calls with a view of the bytes read.  For a
        lending protocol the backends call ``_lend`` themselves (one call fewer per read)."""
        lend = self._lend = getattr(protocol, "data_lent", None)
        if lend is not None:
            return self._deliver_lent
        if isinstance(protocol, asyncio.BufferedProtocol):
            return self._deliver_buffered
        return self._deliver_bytes

    def _deliver_lent(self, view: memoryview) -> None:
        self._lent = view
        try:
            self._protocol.data_lent(view)  # type: ignore[attr-defined]
        finally:
            self._lent = None

    def _deliver_buffered(self, view: memoryview) -> None:
        """Feed *view* through ``get_buffer()``/``buffer_updated()``, as many rounds as the
        protocol's buffer needs; if it pauses, closes or is replaced meanwhile, the rest waits
        at the front of the backlog (asyncio's transports would feed it regardless)."""
        protocol = self._protocol
        assert isinstance(protocol, asyncio.BufferedProtocol)
        offset, size = 0, len(view)
        while offset < size:
            if not self._reading or self._closing or self._protocol is not protocol:
                if not self._closing:
                    self._hold(bytes(view[offset:]), first=True)
                return
            buf = memoryview(protocol.get_buffer(size - offset)).cast("B")
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = min(len(buf), size - offset)
            buf[:n] = view[offset : offset + n]
            offset += n
            protocol.buffer_updated(n)

    def _deliver_bytes(self, view: memoryview) -> None:
        self._protocol.data_received(bytes(view))  # type: ignore[attr-defined]

    # -- the backlog: what arrived while the protocol could not take it ---------------------

    def _hold(self, item: Any, *, first: bool = False) -> None:
        """Put *item* (bytes copied out of a kernel buffer, ``END_OF_STREAM``, or an ``OSError``)
        behind whatever waits already (*first*: before it, for the unread rest of a delivery);
        delivered in order once reading is resumed."""
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = collections.deque()
        if first:
            backlog.appendleft(item)
        else:
            backlog.append(item)
        if item is END_OF_STREAM or isinstance(item, BaseException):
            self._read_ended = True
        if self._reading and not self._closing:
            self._schedule_resume()

    def _schedule_resume(self) -> None:
        if self._resume_handle is None:
            self._resume_handle = self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        """Scheduled by resume_reading() (or a hold while reading): drain the backlog, then
        let the backend read again."""
        self._resume_handle = None
        backlog = self._backlog
        while backlog and self._reading and not self._closing:
            self._dispatch(backlog.popleft())
        if self._backlog is not None and not self._backlog:
            self._backlog = None
        if self._reading and not self._closing and not self._read_ended and self._backlog is None:
            self._reading_resumed()

    def _dispatch(self, item: Any) -> None:
        """Give the protocol one item of the backlog: bytes, the end of the stream, an error."""
        if item is END_OF_STREAM:
            self._eof_received()
        elif isinstance(item, BaseException):
            self._fatal_error(item, "receive failed")
        else:
            try:
                if self._lend is not None:
                    self._lend(memoryview(item))  # a copy: writing it back copies it again
                else:
                    self._deliver(memoryview(item))
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _arrived(self, item: Any) -> None:
        """A completion brought the end of the stream (``END_OF_STREAM``) or an ``OSError``:
        given to the protocol now if nothing waits before it, else after the backlog.  Only
        from a completion, never from a transport method."""
        if self._closing:
            return
        if self._reading and self._backlog is None:
            self._read_ended = True
            self._dispatch(item)
        else:
            self._hold(item)

    def _eof_received(self) -> None:
        """The peer half-closed: ask the protocol whether to keep the transport open."""
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _send_completed(self, sent: int) -> None:
        """The send in flight finished: send what is queued; once the write side is IDLE
        (the queued bytes may all go at once), finish a pending close or EOF."""
        self.bytes_sent += sent
        self._sending = 0
        queue = self._queue
        if queue:
            data = queue[0] if len(queue) == 1 else b"".join(queue)
            self._queue = None
            self._queued = 0
            self._start_send(data)
        if self._conn_lost:
            return
        if self._protocol_paused:
            # First, as asyncio's transports do: a producer resumed now may write more (a TLS
            # layer flushing its last records, close_notify included, after close()).
            self._maybe_resume_protocol()
            if self._conn_lost:
                return
        if not self._sending and not self._queue:
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_result(None)
            if self._closing:
                self._schedule_connection_lost(None)
            elif self._eof_pending:
                self._eof_pending = False
                self._shutdown_write()

    def _maybe_resume_protocol(self) -> None:
        if self._conn_lost:
            return  # (a resume scheduled before the connection was lost)
        if self._protocol_paused and self._sending + self._queued <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report("protocol.resume_writing() failed", exc)

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and self._sending + self._queued > self._high_water:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report("protocol.pause_writing() failed", exc)

    def _shutdown_write(self) -> None:
        self._eof_written = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._force_close(exc)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        """An error that ends the connection.  OS errors are the peer's doing and are the
        owner's to count and log (quietly under a flood); anything else is a bug somewhere
        and goes to the loop's exception handler, as asyncio's transports do."""
        if not isinstance(exc, OSError):
            self._report(message, exc)
        self._force_close(exc)

    def _report(self, message: str, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        waiter = self._empty_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        self._closing = True
        self._reading = False
        self._backlog = None
        self._queue = None
        self._queued = 0
        self._cancel_all()
        self._schedule_connection_lost(exc)

    def _schedule_connection_lost(self, exc: BaseException | None) -> None:
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._report("protocol.connection_lost() failed", error)
        finally:
            self._cancel_all()
            _close_socket(self._sock)
            if self._owner is not None:
                self._owner.transport_lost(self, exc)
            # Let go of the protocol, as asyncio's transports do: a cancelled operation's
            # completion may keep this transport for another loop iteration, and the protocol
            # (a TLS layer, say, with its SSLContext) must not live as long.
            self._protocol = _GONE
            self._deliver = self._deliver_bytes
            self._lend = None


#: The protocol of a transport whose connection is lost: it ignores whatever still arrives.
_GONE = asyncio.Protocol()


def _close_socket(sock: socket.socket) -> None:
    """Close, flushing what the kernel still holds for a peer that is still there."""
    if sock.fileno() == -1:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # reset by the peer, or never connected: nothing to flush
    sock.close()
