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

* BUSY: an overlapped ``WSARecvInto`` into a buffer from the server's pool.  The echo writes
  the bytes back from that same buffer (``WSASend`` from it: no copy); the buffer returns to
  the pool when the send's packet arrives.
* QUIET: a zero-byte ``WSARecvInto``: nothing pinned.  When it completes, one non-blocking
  ``recv_into`` takes what arrived and the connection is BUSY again.

Connections start QUIET, and a wake-up makes one BUSY only when the previous one was less than
``QUIET_AFTER`` seconds before (a client that sends one message and goes silent never pins a
buffer).  The server's sweep (once a second, see :meth:`IocpEngine.sweep`)
cancels the BUSY receive of a connection that has read nothing for ``QUIET_AFTER`` seconds; its
packet (``ERROR_OPERATION_ABORTED``) then moves it to QUIET and frees its buffer.  A zero-byte
receive for every read would cost a second Winsock call per request (about 30% under Wine), so
busy connections keep their buffer.

Read sizes adapt (as Netty's adaptive allocator does): a BUSY connection reads into a buffer
of ``MIN_READ`` bytes at first, twice as large after a read that filled it (up to
``max_read``), half as large after ``SHRINK_AFTER`` reads in a row that used at most a quarter
of it.  A connection echoing small messages pins a few KiB, not ``max_read``.

Who owns a pooled buffer.  Exactly one of: the pool (``IocpEngine.take_buffer`` /
``give_back``), the connection between reads (``_read_buf``), the kernel (a receive or a send
in flight names it; the send's is ``_send_held``), or the protocol during ``data_lent`` (a
view of ``_read_buf``; writing that view moves the buffer to the send).  Giving back a buffer
the pool already has raises :class:`BufferOwnershipError`.  Data that arrives while the
protocol is paused is copied into the transport's backlog and the buffer goes back at once.

Fairness.  ``_poll`` keeps dequeuing while packets are ready, and a connection that re-arms its
receive from its own completion can keep it from ever returning to the loop (a client
streaming flat out would starve accepts, timers and every task).  The engine therefore counts
the completions it handles per loop iteration; past ``COMPLETIONS_PER_ITERATION`` a connection
re-arms its receive between two dequeues instead (:meth:`IocpEngine.new_iteration`: called by
iocp_echo's own loop as its next dequeue starts, or from a loop callback on CPython's
``ProactorEventLoop``), so the dequeue runs dry and returns.

Batched receives.  A BUSY connection re-arms its receive between two dequeues too, not from
its completion: by then its client has usually answered the echo, and a receive that finds
data completes at once, which costs Wine far less than one that must wait (measured, 1 KiB x
20 under Wine: 69 instead of 87 µs of server CPU per echo).  The echo's send is usually done
by then as well, and its buffer becomes the next receive's, with no trip through the pool.

One delivery per connection per dequeue.  A QUIET connection issues its next (zero-byte)
receive from the completion that delivered, so that a receive is always pending on it: under
Wine a receive issued after the peer's reset reports the end of the stream, not the reset.
That receive may complete within the same dequeue (``_poll`` dequeues until the port is
empty), bringing the peer's answer to what the protocol just did (its reply, then the peer's
close) before the loop has run the callbacks already scheduled.  asyncio's own transports
issue the next receive from a loop callback, so a protocol gets at most one read per
connection per loop iteration, and code relies on it: CPython's test_connect_accepted_socket,
whose ``connection_lost`` stops the loop, hung under Wine when data, EOF and
``connection_lost`` all came before ``run_until_complete``'s own stop.  So a connection's
second packet in one dequeue is postponed (:meth:`IocpEngine.postpone`) and handled as the
next iteration starts, in order, before the re-arms that waited.

Closing the loop.  ``IocpProactor.close()`` cancels every cached operation and polls until the
cache is empty; the first ``cancel()`` of an engine entry marks the engine stopped, and a
stopped engine issues no operation again (or close() would wait for ever).
"""

from __future__ import annotations

import _overlapped  # type: ignore[import-not-found]  # Windows only
import asyncio
import socket
import time
from typing import Any

from .. import _private
from .._transport import END_OF_STREAM, CompletionTransport, ConnectionOwner
from ..errors import BufferOwnershipError

__all__ = [
    "COMPLETIONS_PER_ITERATION",
    "MIN_READ",
    "QUIET_AFTER",
    "IocpEngine",
    "IocpTransport",
    "describe_entry",
]

#: Seconds without a completed read after which a connection gives its read buffer back.
QUIET_AFTER = 1.0
#: Free read buffers kept for reuse, per size; more are released to the allocator.
POOL_LIMIT = 64
#: The first BUSY read size of a connection (doubles on full reads up to max_read).
MIN_READ = 4096
#: Reads in a row that used at most a quarter of their buffer before the size halves.
SHRINK_AFTER = 4
#: Completions handled inline per loop iteration before re-arms wait for the loop.
COMPLETIONS_PER_ITERATION = 64
_ERROR_OPERATION_ABORTED = 995
_ERROR_NETNAME_DELETED = 64
_NULL = 0
_EMPTY = bytearray(0)


class _CacheEntry:
    """What the engine puts where ``IocpProactor._cache`` keeps a Future.

    ``_poll`` asks ``done()`` (always False, so our callback runs inline) and then calls
    ``set_result()`` (nothing to store); both are C callables, so a packet costs no Python call
    beyond the connection's own method.  Only ``IocpProactor.close()`` calls ``cancel()`` (the
    engine's sockets are never in ``_stopped_serving``): the engine stops issuing operations
    and cancels the connection's I/O, so that close() gets the packets it waits for.
    """

    __slots__ = ("transport",)
    _source_traceback = None
    done = cancelled = staticmethod(bool)
    set_result = staticmethod(id)

    def __init__(self, transport: IocpTransport) -> None:
        self.transport = transport

    def cancel(self, msg: Any = None) -> bool:
        self.transport._engine.stopped = True
        self.transport._cancel_all()
        return True

    def set_exception(self, exc: BaseException) -> None:  # the callbacks never raise
        self.transport._fatal_error(exc, "unexpected error in a completion callback")


def _connection_error(exc: OSError) -> OSError:
    """*exc* as asyncio's proactor reports it: the two Windows errors that mean the connection
    is gone (``ERROR_NETNAME_DELETED``: reset by the peer; ``ERROR_OPERATION_ABORTED``: its
    socket closed under it) map to no ``OSError`` subclass, and ``IocpProactor`` raises
    ``ConnectionResetError`` for both, which code catches as a ``ConnectionError``
    (``StreamWriter.wait_closed()`` callers, TLS shutdown); the Windows code is kept."""
    winerror = getattr(exc, "winerror", None)
    if winerror in (_ERROR_NETNAME_DELETED, _ERROR_OPERATION_ABORTED):
        return ConnectionResetError(exc.errno, exc.strerror, None, winerror)
    return exc


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

    #: Accepts stay the server's AcceptEx loop (one operation each: no multishot on IOCP).
    accepts = False
    #: A BUSY connection's next receive waits for the end of the dequeue ("Batched receives").
    batch_reads = True

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_read: int) -> None:
        hook = _private.completion_hook(loop)  # InternalsUnavailable: use the stock path
        self.loop = loop
        self.max_read = max_read
        self.min_read = min(MIN_READ, max_read)
        self.cache = hook.cache
        self.register_socket = hook.register_socket
        #: Free buffers by size, and the identities of those in it (the ownership check).
        self.pool: dict[int, list[memoryview]] = {}
        self.pooled: set[int] = set()
        self.transports: set[IocpTransport] = set()
        #: True once IocpProactor.close() cancelled an entry: issue nothing again.
        self.stopped = False
        #: Completions left to handle inline in this loop iteration (see "Fairness").
        self.budget = COMPLETIONS_PER_ITERATION
        self.deferred: list[IocpTransport] = []
        #: Loop iterations seen, and the receive packets postponed to the next one ("One
        #: delivery per connection per dequeue").
        self.generation = 0
        self.postponed: list[tuple[IocpTransport, Any, Any, Any]] = []
        #: iocp_echo's own loop renews the budget as each dequeue starts; on CPython's
        #: ProactorEventLoop a loop callback does (scheduled by the iteration's first packet).
        attach = getattr(loop, "attach_engine", None)
        self.renew_by_callback = not (attach is not None and attach(self))

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
        """Serve the connected stream socket *sock* (IPv4 or IPv6, accepted or connected,
        by the proactor or elsewhere): one engine serves every socket of its loop.

        Call on the loop's thread, before :meth:`IocpTransport.start`.  The socket is
        associated with the loop's completion port here if the proactor has not done so
        (``IocpProactor._register_with_iocp`` remembers which are); it must be non-blocking
        (asyncio's ``connect_accepted_socket`` and ``create_connection`` make it so), and no
        other reader may have an operation in flight on it."""
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

    # -- the pool ---------------------------------------------------------------------------

    def take_buffer(self, size: int) -> memoryview:
        free = self.pool.get(size)
        if free:
            buf = free.pop()
            self.pooled.discard(id(buf))
            return buf
        return memoryview(bytearray(size))

    def give_back(self, buf: memoryview) -> None:
        """The one way a buffer returns to the pool (or to the allocator, past POOL_LIMIT)."""
        key = id(buf)
        if key in self.pooled:
            raise BufferOwnershipError(f"read buffer {key:#x} given back to the pool twice")
        free = self.pool.setdefault(len(buf), [])
        if len(free) < POOL_LIMIT:
            free.append(buf)
            self.pooled.add(key)

    def pooled_buffers(self) -> int:
        return len(self.pooled)

    # -- fairness ---------------------------------------------------------------------------

    def new_iteration(self) -> bool:
        """Between two dequeues: a fresh budget, the packets postponed, then the re-arms that
        waited.  True when a postponed packet was handled (it may have scheduled callbacks:
        the next dequeue must not wait)."""
        self.budget = COMPLETIONS_PER_ITERATION
        self.generation += 1
        postponed = self.postponed
        if postponed:
            self.postponed = []
            for transport, transferred, key, ov in postponed:
                transport._read_done(transferred, key, ov)
        deferred, self.deferred = self.deferred, []
        for transport in deferred:
            transport._read_again()
        return bool(postponed)

    def postpone(self, transport: IocpTransport, transferred: Any, key: Any, ov: Any) -> None:
        """Handle *transport*'s receive packet as the next iteration starts (see "One
        delivery per connection per dequeue")."""
        if self.budget == COMPLETIONS_PER_ITERATION:  # make sure new_iteration() runs
            if self.renew_by_callback:
                self.loop.call_soon(self.new_iteration)
            self.budget -= 1
        self.postponed.append((transport, transferred, key, ov))

    # -- the server's hooks -----------------------------------------------------------------

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
        if not self.renew_by_callback:  # connections still open go on being served
            self.loop.detach_engine(self)  # type: ignore[attr-defined]
            self.renew_by_callback = True
            if self.budget != COMPLETIONS_PER_ITERATION and not self.loop.is_closed():
                self.loop.call_soon(self.new_iteration)
        self.pool.clear()
        self.pooled.clear()


class IocpTransport(CompletionTransport):
    """A connection driven by its completion packets (see the module docstring)."""

    __slots__ = (
        "_busy",
        "_delivered_in",
        "_engine",
        "_entry",
        "_quieting",
        "_read_buf",
        "_read_ov",
        "_read_size",
        "_read_started",
        "_send_held",
        "_send_ov",
        "_send_started",
        "_small_reads",
        "_woke_at",
    )

    def __init__(self, engine: IocpEngine, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(engine.loop, sock, *args, **kwargs)
        self._engine = engine
        self._entry = _CacheEntry(self)
        self._read_ov: Any = None
        self._read_buf: memoryview | None = None
        self._read_size = engine.min_read
        self._small_reads = 0
        self._read_started = 0.0
        self._quieting = False
        self._busy = False  # BUSY (a pooled buffer per receive) or QUIET (zero-byte receives)
        self._woke_at = 0.0
        self._delivered_in = -1  # the engine generation of this connection's last packet
        self._send_ov: Any = None
        self._send_held: Any = None
        self._send_started = 0.0

    def _start_reading(self) -> None:
        self._read_quietly()

    # -- reading ----------------------------------------------------------------------------

    def _read_quietly(self) -> None:
        """QUIET: a zero-byte receive, pinning nothing until the client sends."""
        if self._engine.stopped:
            return
        self._release_read_buffer()  # quiet means no buffer pinned
        ov = _overlapped.Overlapped(_NULL)
        try:
            ov.WSARecvInto(self._fileno, _EMPTY, 0)
        except BrokenPipeError:  # the peer is gone: end of stream
            self._hold(END_OF_STREAM)
            return
        except OSError as exc:
            self._fatal_error(_connection_error(exc), "WSARecvInto failed")
            return
        self._read_ov = ov
        self._read_started = time.monotonic()
        self._engine.cache[ov.address] = (self._entry, ov, self._sock, self._read_done)

    def _read_busily(self) -> None:
        """BUSY: an overlapped receive into a pooled buffer of the connection's read size."""
        engine = self._engine
        if engine.stopped:
            return
        buf = self._read_buf
        if buf is None or len(buf) != self._read_size:
            if buf is not None:
                engine.give_back(buf)
            buf = self._read_buf = engine.take_buffer(self._read_size)
        ov = _overlapped.Overlapped(_NULL)
        try:
            ov.WSARecvInto(self._fileno, buf, 0)
        except BrokenPipeError:  # the peer is gone: end of stream
            self._release_read_buffer()
            self._hold(END_OF_STREAM)
            return
        except OSError as exc:
            self._fatal_error(_connection_error(exc), "WSARecvInto failed")
            return
        self._read_ov = ov
        self._read_started = time.monotonic()
        engine.cache[ov.address] = (self._entry, ov, self._sock, self._read_done)

    def _read_again(self) -> None:
        """The next receive, if this connection still reads (from a loop callback)."""
        if (
            self._read_ov is None
            and self._reading
            and not self._closing
            and not self._read_ended
            and self._backlog is None
        ):
            if self._busy:
                self._read_busily()
            else:
                self._read_quietly()

    def _read_done(self, transferred: Any, key: Any, ov: Any) -> None:
        """A receive's packet: deliver, then issue the next receive (BUSY or QUIET)."""
        generation = self._engine.generation
        if self._delivered_in == generation:  # its second packet in this dequeue: later
            self._engine.postpone(self, transferred, key, ov)
            return
        self._delivered_in = generation
        self._read_ov = None
        # Which receive this was is the buffer it was given: none for a zero-byte receive
        # (_read_quietly releases the connection's buffer; nothing gives it one meanwhile).
        buf = self._read_buf
        try:
            nbytes = ov.getresult()
        except BrokenPipeError:
            nbytes = 0
        except OSError as exc:
            if self._closing or self._engine.stopped:
                self._release_read_buffer()
                return
            if self._quieting and getattr(exc, "winerror", None) == _ERROR_OPERATION_ABORTED:
                self._quieting = False  # the sweep's cancel: go QUIET
                self._busy = False
                self._release_read_buffer()
                self._read_quietly()
                return
            self._release_read_buffer()
            self._arrived(_connection_error(exc))
            return
        self._quieting = False
        if self._closing or self._engine.stopped:
            self._release_read_buffer()
            return
        stay_quiet = False
        if buf is None:  # a zero-byte receive: data (or EOF) is waiting in the socket
            # One message does not make a busy connection: go BUSY (and pin a buffer) only
            # when woken twice within QUIET_AFTER seconds.
            now = time.monotonic()
            stay_quiet = now - self._woke_at >= QUIET_AFTER
            self._busy = not stay_quiet
            self._woke_at = now
            buf = self._read_buf = self._engine.take_buffer(self._read_size)
            try:
                nbytes = self._sock.recv_into(buf)
            except BlockingIOError:
                self._release_read_buffer()
                self._read_quietly()  # woken for nothing: wait again
                return
            except OSError as exc:
                self._release_read_buffer()
                self._arrived(exc)
                return
        if not nbytes:
            self._release_read_buffer()
            self._arrived(END_OF_STREAM)
            return
        self.bytes_received += nbytes
        engine = self._engine
        size = len(buf)
        if nbytes == size or self._small_reads or (nbytes <= size >> 2 and size > engine.min_read):
            self._adapt_read_size(nbytes, size)  # (not called for the usual small reads)
        if self._reading and self._backlog is None:
            try:
                lend = self._lend
                if lend is not None:
                    self._lent = view = buf[:nbytes]
                    lend(view)
                else:
                    self._deliver(buf[:nbytes])
            except (SystemExit, KeyboardInterrupt):
                # Out of the loop it goes; the connection reads on if the loop runs again.
                self._loop.call_soon(self._read_again)
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            finally:
                self._lent = None
        else:  # paused: a copy waits in the backlog, the buffer goes back
            self._hold(bytes(buf[:nbytes]))
            self._release_read_buffer()
            return
        if (
            not self._reading
            or self._closing
            or self._read_ov is not None
            or self._backlog is not None
        ):
            if self._read_ov is None:
                self._release_read_buffer()  # nothing will read into it for now
            return
        # The next receive, at once while this loop iteration's budget lasts (see
        # "Fairness"), else from the loop (IocpEngine.new_iteration).  Written out here:
        # it is every echo's path, and each Python call costs.
        budget = engine.budget
        if budget == COMPLETIONS_PER_ITERATION and engine.renew_by_callback:
            engine.loop.call_soon(engine.new_iteration)
        engine.budget = budget - 1
        if budget <= 0 or (self._busy and engine.batch_reads):
            engine.deferred.append(self)
        elif self._busy:
            self._read_busily()
        else:
            self._read_quietly()

    def _adapt_read_size(self, nbytes: int, size: int) -> None:
        if nbytes == size:
            self._small_reads = 0
            if size < self._max_read:
                self._read_size = min(size * 2, self._max_read)
        elif nbytes <= size // 4 and size > self._engine.min_read:
            self._small_reads += 1
            if self._small_reads >= SHRINK_AFTER:
                self._small_reads = 0
                self._read_size = max(size // 2, self._engine.min_read)
        else:
            self._small_reads = 0

    def _release_read_buffer(self) -> None:
        buf = self._read_buf
        if buf is not None:
            self._read_buf = None
            self._engine.give_back(buf)

    def _reading_paused(self) -> None:
        pass  # the receive in flight stays; what it brings waits in the backlog

    def _reading_resumed(self) -> None:
        self._read_again()

    def _stop_reading(self) -> None:
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
        if (
            self._sending
            or self._queue
            or self._conn_lost
            or self._eof_pending
            or self._empty_waiter is not None  # loop.sendfile() under way: refused
            or not data
        ):
            CompletionTransport.write(self, data)
            return
        if self._eof_written:
            raise RuntimeError("write_eof() already called")
        self._start_send(data)

    def _start_send(self, data: bytes | bytearray | memoryview) -> None:
        if self._engine.stopped:
            return
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
            self._give_back_sent(held)
            self._fatal_error(_connection_error(exc), "WSASend failed")
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
        size = self._sending
        try:
            sent = ov.getresult()
        except OSError as exc:
            self._give_back_sent(held)
            if not self._conn_lost:
                self._fatal_error(_connection_error(exc), "send failed")
            return
        rest = bytes(memoryview(held)[sent:size]) if sent < size else b""
        self._give_back_sent(held)
        if self._conn_lost:
            return
        if rest:  # overlapped sends complete whole or fail; be safe anyway
            self.bytes_sent += sent
            self._sending = 0
            self._start_send(rest)
            return
        if self._queue or self._closing or self._eof_pending or self._protocol_paused:
            self._send_completed(sent)
        else:  # IDLE again: nothing else to do
            self.bytes_sent += sent
            self._sending = 0

    def _give_back_sent(self, held: Any) -> None:
        """A send is done with *held*: a pooled buffer becomes the next read's (when the
        connection has none and reads at that size) or goes back to the pool."""
        if type(held) is memoryview:
            if (
                self._read_buf is None
                and self._read_ov is None
                and self._busy
                and len(held) == self._read_size
                and self._reading
                and not self._closing
            ):
                self._read_buf = held
            else:
                self._engine.give_back(held)

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
        if self._read_ov is None:
            self._release_read_buffer()

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
