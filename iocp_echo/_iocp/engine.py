"""The completion engine on I/O completion ports: connections driven by their packets.

The OS model, for a connection.  A socket associated with the completion port posts one packet
for every overlapped operation started on it, when that operation is done (even when it was
done at once: ``SetFileCompletionNotificationModes`` is never used here, because CPython's
proactor relies on every operation posting a packet).  The ``OVERLAPPED`` and the buffer it
names belong to the kernel until that packet is dequeued.  A receive of zero bytes is allowed:
it completes when data arrives and leaves the data in the socket, so a connection waiting for
its client can wait with no buffer at all (libuv waits this way).

How the engine uses it.  ``IocpProactor._poll`` already dequeues every packet and looks its
``OVERLAPPED`` up in ``IocpProactor._cache``; the engine puts its own entries there
(:class:`_CacheEntry`, checked by :func:`iocp_echo._private.completion_hook`), so a packet calls
straight into the connection: no Future, no ``call_soon``.  Each connection has at most one
receive and one send in flight.  Reading has two modes:

* BUSY: an overlapped ``WSARecvInto`` into a buffer from the server's pool, of ``max_read``
  bytes.  The echo writes the bytes back from that same buffer (``WSASend`` from it: no copy);
  the buffer returns to the pool when the send's packet arrives.
* QUIET: a zero-byte ``WSARecvInto``: nothing pinned.  When it completes, one non-blocking
  ``recv_into`` takes what arrived and the connection is BUSY again.

Connections start QUIET, and a wake-up makes one BUSY only when the previous one was less than
``QUIET_AFTER`` seconds before (a client that sends one message and goes silent never pins a
buffer).  The server's sweep (once a second, see :meth:`IocpEngine.sweep`)
cancels the BUSY receive of a connection that has read nothing for ``QUIET_AFTER`` seconds; its
packet (``ERROR_OPERATION_ABORTED``) then moves it to QUIET and frees its buffer.  A zero-byte
receive for every read would cost a second Winsock call per request (about 30% under Wine), so
busy connections keep their buffer.
"""

from __future__ import annotations

import _overlapped  # type: ignore[import-not-found]  # Windows only
import asyncio
import socket
import time
from typing import Any

from .. import _private
from .._transport import CompletionTransport, ConnectionOwner

__all__ = ["QUIET_AFTER", "IocpEngine", "IocpTransport", "describe_entry"]

#: Seconds without a completed read after which a connection gives its read buffer back.
QUIET_AFTER = 1.0
#: Free read buffers kept for reuse; more are released to the allocator.
POOL_LIMIT = 64
_ERROR_OPERATION_ABORTED = 995
_NULL = 0
_EMPTY = bytearray(0)


class _CacheEntry:
    """What the engine puts where ``IocpProactor._cache`` keeps a Future.

    ``_poll`` asks ``done()`` (always False, so our callback runs inline) and then calls
    ``set_result()`` (nothing to store); both are C callables, so a packet costs no Python call
    beyond the connection's own method.  ``IocpProactor.close()`` calls ``cancel()``: that
    cancels the connection's I/O, so that close() gets the packets it waits for.
    """

    __slots__ = ("transport",)
    _source_traceback = None
    done = cancelled = staticmethod(bool)
    set_result = staticmethod(id)

    def __init__(self, transport: IocpTransport) -> None:
        self.transport = transport

    def cancel(self, msg: Any = None) -> bool:
        self.transport._cancel_all()
        return True

    def set_exception(self, exc: BaseException) -> None:  # the callbacks never raise
        self.transport._fatal_error(exc, "unexpected error in a completion callback")


def describe_entry(entry: object, ov: Any) -> tuple[str, str, int, float] | None:
    """``(kind, state, nbytes, started)`` of an engine operation in IocpProactor's cache,
    or None when the entry is not the engine's."""
    if type(entry) is not _CacheEntry:
        return None
    transport = entry.transport  # type: ignore[attr-defined]
    for op in transport.operations(ov):
        return op
    kind = "recv" if transport._closing else "unknown"
    return kind, "cancelling", 0, time.monotonic()


class IocpEngine:
    """One server's completion engine: its read-buffer pool and its connections."""

    needs_sweep = True
    #: Accepts stay the server's AcceptEx loop (one operation each: no multishot on IOCP).
    accepts = False

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_read: int) -> None:
        hook = _private.completion_hook(loop)  # InternalsUnavailable: use the stock path
        self.loop = loop
        self.max_read = max_read
        self.cache = hook.cache
        self.register_socket = hook.register_socket
        self.pool: list[memoryview] = []
        self.transports: set[IocpTransport] = set()

    @property
    def name(self) -> str:
        return "iocp engine"

    def connect(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        peer: Any,
        write_high_water: int,
        owner: ConnectionOwner | None,
    ) -> IocpTransport:
        self.register_socket(sock)
        transport = IocpTransport(
            self,
            sock,
            protocol,
            peer=peer,
            max_read=self.max_read,
            write_high_water=write_high_water,
            owner=owner,
        )
        self.transports.add(transport)
        return transport

    def sweep(self, now: float) -> None:
        """Move connections that read nothing for QUIET_AFTER seconds to zero-byte reads."""
        for transport in self.transports:
            if (
                transport._read_ov is not None
                and transport._read_buf is not None
                and now - transport.note_activity(now) >= QUIET_AFTER
                and not transport._quieting
            ):
                transport._quieting = True
                try:
                    transport._read_ov.cancel()
                except OSError:
                    pass  # it completed meanwhile: its packet is on its way

    def start_accepting(self, listener: Any, admit: Any, failed: Any) -> None:
        raise NotImplementedError("IOCP accepts through the server's AcceptEx loop")

    def stop_accepting(self) -> None:
        pass

    def close(self) -> None:
        self.pool.clear()


class IocpTransport(CompletionTransport):
    """A connection driven by its completion packets (see the module docstring)."""

    __slots__ = (
        "_engine",
        "_entry",
        "_quieting",
        "_read_buf",
        "_read_ov",
        "_read_started",
        "_send_held",
        "_send_ov",
        "_send_started",
        "_stash",
        "_woke_at",
    )

    def __init__(self, engine: IocpEngine, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(engine.loop, sock, *args, **kwargs)
        self._engine = engine
        self._entry = _CacheEntry(self)
        self._read_ov: Any = None
        self._read_buf: memoryview | None = None
        self._read_started = 0.0
        self._quieting = False
        self._woke_at = 0.0
        self._send_ov: Any = None
        self._send_held: Any = None
        self._send_started = 0.0
        self._stash: tuple[memoryview, int] | None = None

    def _start_reading(self) -> None:
        self._read_quietly()

    # -- reading ----------------------------------------------------------------------------

    def _read_quietly(self) -> None:
        """QUIET: a zero-byte receive, pinning nothing until the client sends."""
        ov = _overlapped.Overlapped(_NULL)
        try:
            ov.WSARecvInto(self._fileno, _EMPTY, 0)
        except BrokenPipeError:  # the peer is gone: end of stream
            self._eof_received()
            return
        except OSError as exc:
            self._fatal_error(exc, "WSARecvInto failed")
            return
        self._read_ov = ov
        self._read_started = time.monotonic()
        self._engine.cache[ov.address] = (self._entry, ov, self._sock, self._read_done)

    def _read_busily(self) -> None:
        """BUSY: an overlapped receive into a pooled buffer of max_read bytes."""
        buf = self._read_buf
        if buf is None:
            pool = self._engine.pool
            buf = self._read_buf = pool.pop() if pool else memoryview(bytearray(self._max_read))
        ov = _overlapped.Overlapped(_NULL)
        try:
            ov.WSARecvInto(self._fileno, buf, 0)
        except BrokenPipeError:  # the peer is gone: end of stream
            self._release_read_buffer()
            self._eof_received()
            return
        except OSError as exc:
            self._fatal_error(exc, "WSARecvInto failed")
            return
        self._read_ov = ov
        self._read_started = time.monotonic()
        self._engine.cache[ov.address] = (self._entry, ov, self._sock, self._read_done)

    def _read_done(self, transferred: Any, key: Any, ov: Any) -> None:
        """A receive's packet: deliver, then issue the next receive (BUSY or QUIET)."""
        self._read_ov = None
        buf = self._read_buf
        try:
            nbytes = ov.getresult()
        except BrokenPipeError:
            nbytes = 0
        except OSError as exc:
            if self._closing:
                self._release_read_buffer()
                return
            if self._quieting and getattr(exc, "winerror", None) == _ERROR_OPERATION_ABORTED:
                self._quieting = False  # the sweep's cancel: go QUIET
                self._release_read_buffer()
                self._read_quietly()
                return
            self._fatal_error(exc, "receive failed")
            return
        self._quieting = False
        if self._closing:
            self._release_read_buffer()
            return
        stay_quiet = False
        if buf is None:  # a zero-byte receive: data (or EOF) is waiting in the socket
            # One message does not make a busy connection: go BUSY (and pin a buffer) only
            # when woken twice within QUIET_AFTER seconds.
            now = time.monotonic()
            stay_quiet = now - self._woke_at >= QUIET_AFTER
            self._woke_at = now
            buf = self._read_buf = self._take_buffer()
            try:
                nbytes = self._sock.recv_into(buf)
            except BlockingIOError:
                self._release_read_buffer()
                self._read_quietly()  # woken for nothing: wait again
                return
            except OSError as exc:
                self._fatal_error(exc, "receive failed")
                return
        if not nbytes:
            self._release_read_buffer()
            self._eof_received()
            return
        self.bytes_received += nbytes
        if not self._reading:
            self._stash = (buf, nbytes)  # delivered by resume_reading()
            return
        try:
            lend = self._lend
            if lend is not None:
                self._lent = view = buf[:nbytes]
                lend(view)
                self._lent = None
            else:
                self._deliver(buf[:nbytes])
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._lent = None
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            return
        if stay_quiet:
            if self._reading and not self._closing and self._read_ov is None:
                self._release_read_buffer()
                self._read_quietly()
            return
        if self._reading and not self._closing and self._read_ov is None:
            self._read_busily()  # the next receive, into the same buffer unless a send took it

    def _take_buffer(self) -> memoryview:
        pool = self._engine.pool
        return pool.pop() if pool else memoryview(bytearray(self._max_read))

    def _release_read_buffer(self) -> None:
        buf = self._read_buf
        if buf is not None:
            self._read_buf = None
            pool = self._engine.pool
            if len(pool) < POOL_LIMIT:
                pool.append(buf)

    def _reading_paused(self) -> None:
        pass  # the receive in flight stays; its data waits in _stash

    def _reading_resumed(self) -> None:
        stash = self._stash
        if stash is not None:
            self._stash = None
            buf, nbytes = stash
            try:
                self._deliver(buf[:nbytes])
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
                return
        if self._reading and not self._closing and self._read_ov is None:
            self._read_busily()

    def _stop_reading(self) -> None:
        self._stash = None
        ov = self._read_ov
        if ov is not None:
            try:
                ov.cancel()
            except OSError:
                pass  # completed meanwhile
        else:
            self._release_read_buffer()

    # -- sending ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        """The fast path: write side IDLE and open: one WSASend, from the lent buffer."""
        if self._sending or self._queue or self._conn_lost or self._eof_pending or not data:
            CompletionTransport.write(self, data)
            return
        if self._eof_written:
            raise RuntimeError("write_eof() already called")
        self._start_send(data)

    def _start_send(self, data: bytes | bytearray | memoryview) -> None:
        if data is self._lent:
            held: Any = self._read_buf  # the pooled buffer goes with the send
            self._read_buf = None
        elif type(data) is bytes:
            held = data
        else:
            held = data = bytes(data)
        ov = _overlapped.Overlapped(_NULL)
        try:
            ov.WSASend(self._fileno, data, 0)
        except OSError as exc:
            self._give_back(held)
            self._fatal_error(exc, "WSASend failed")
            return
        self._send_ov = ov
        self._send_held = held
        size = self._sending = len(data)
        self._send_started = time.monotonic()
        self._engine.cache[ov.address] = (self._entry, ov, self._sock, self._send_done)
        if size > self._high_water and not self._protocol_paused:
            self._maybe_pause_protocol()

    def _send_done(self, transferred: Any, key: Any, ov: Any) -> None:
        self._send_ov = None
        held, self._send_held = self._send_held, None
        try:
            sent = ov.getresult()
        except OSError as exc:
            self._give_back(held)
            if not self._conn_lost:
                self._fatal_error(exc, "send failed")
            return
        if type(held) is memoryview:
            if self._read_buf is None and self._read_ov is None:
                self._read_buf = held  # the next receive reuses it
            else:
                pool = self._engine.pool
                if len(pool) < POOL_LIMIT:
                    pool.append(held)
        if self._conn_lost:
            return
        if sent < self._sending:  # overlapped sends complete whole or fail; be safe anyway
            rest = bytes(memoryview(held)[sent : self._sending]) if held is not None else b""
            self.bytes_sent += sent
            self._sending = 0
            self._start_send(rest)
            return
        if self._queue or self._closing or self._eof_pending or self._protocol_paused:
            self._send_completed(sent)
        else:  # IDLE again: nothing else to do
            self.bytes_sent += sent
            self._sending = 0

    def _give_back(self, held: Any) -> None:
        if type(held) is memoryview:
            pool = self._engine.pool
            if len(pool) < POOL_LIMIT:
                pool.append(held)

    def _cancel_all(self) -> None:
        for ov in (self._read_ov, self._send_ov):
            if ov is not None:
                try:
                    ov.cancel()
                except OSError:
                    pass  # completed meanwhile: its packet is on its way

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        self._engine.transports.discard(self)
        super()._call_connection_lost(exc)

    # -- introspection ----------------------------------------------------------------------

    def operations(self, ov: Any = None) -> list[tuple[str, str, int, float]]:
        """``(kind, state, nbytes, started)`` for each operation in flight (only *ov*'s,
        when given)."""
        ops = []
        if self._read_ov is not None and (ov is None or ov is self._read_ov):
            state = "cancelling" if self._closing or self._quieting else "pending"
            size = len(self._read_buf) if self._read_buf is not None else 0
            ops.append(("recv", state, size, self._read_started))
        if self._send_ov is not None and (ov is None or ov is self._send_ov):
            state = "cancelling" if self._conn_lost else "pending"
            ops.append(("send", state, self._sending, self._send_started))
        return ops
