r"""The completion engine on io_uring: connections driven by their completions.

The OS model, for a connection.  One multishot ``RECV`` with ``IOSQE_BUFFER_SELECT`` stays
armed for as long as the connection reads: each time data arrives the kernel picks a buffer
from the server's provided-buffer ring (:class:`~.ring.BufferRing`), fills it and posts a CQE
naming it (``cqe.flags >> IORING_CQE_BUFFER_SHIFT``), with ``IORING_CQE_F_MORE`` while the
receive stays armed.  No buffer is tied to a connection until data arrives, so an idle
connection costs the kernel one armed request and this process a few hundred bytes.  When the
ring has no free buffer the receive ends with ``-ENOBUFS`` (the data stays in the socket) and
is armed again once a buffer comes back.

Sending tries the socket first: a non-blocking ``send()`` usually takes the whole echo, and the
buffer goes straight back to the ring.  Only when it takes part (or nothing: ``EAGAIN``) is a
``SEND`` submitted for the rest, from a copy: a peer that does not read must never hold a
provided buffer.  A later write never overtakes a send in flight: it queues behind it (see
:class:`~iocp_echo._transport.CompletionTransport`).

Who owns a provided buffer.  The ring is shared by every connection of the server, so one
connection holding buffers starves all the others; the rule is therefore that the program holds
a buffer only for the batch of completions that filled it.  Its state is one byte in
``BufferRing.states``::

    IN_KERNEL --CQE names it (take)--> LENT --delivery returns--> IN_KERNEL (recycle)
                                         |  \
                    the lent view written  \  the protocol writes the lent view while the
                    and flushed inside the  \ read filled its buffer (more of the message
                    delivery: stays LENT     \ follows in this batch)
                                              v
                                            CORKED --end of the batch: sendmsg()--> IN_KERNEL

Exactly one place returns each buffer: the end of its delivery (``_recv_done``) when it is
still LENT, or the cork's flush when it is CORKED (never the buffer being delivered at that
moment, which the delivery returns).  What is not sent at once, and whatever arrives while the
protocol is paused, is copied out first (into the transport's backlog or a pending ``SEND``),
so a paused connection or a stalled peer holds no buffer at all.  ``BufferRing.recycle``
refuses a buffer the kernel has (``BufferOwnershipError``) instead of corrupting the ring.

How much a connection can hold.  A multishot receive reads ahead: in one batch of completions
the kernel may fill dozens of buffers for one connection (everything its socket held), before
the program sees the first.  For a client that reads its answers that is the fast path; for one
that floods and never reads, it is memory the server must hold once the protocol pauses.  So a
connection starts with one-shot receives (one buffer in flight at most, re-armed after each
delivery) and earns a multishot receive after ``CALM_READS`` reads in a row that left its write
side idle, the last arriving with nothing unacknowledged in its socket (``SIOCOUTQ``: the client
had read every answer before it sent more); a send the socket does not take at once, or a
pause, cancels the multishot receive and the connection starts over.  A flooding client
therefore never has more than one read in flight, and what it makes the server hold is bounded
by the write high-water mark plus one read (plus, once per calm spell, what the last batch of a
calm connection brought when it turned into a flood).

Completions reach the connection through :meth:`~.proactor.UringProactor.submit_direct`: the
proactor calls the handler inline from its ``select()``, with no Future and no ``call_soon``.
A kernel without multishot receive gets a one-shot ``RECV`` with buffer selection, re-armed
after each completion; a kernel without provided-buffer rings gets no engine at all (the
server then uses asyncio's own transports).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from .._transport import END_OF_STREAM, CompletionTransport, ConnectionOwner
from . import abi
from .proactor import UringProactor, _pin_for_reading
from .ring import IN_KERNEL, BufferRing

__all__ = ["UringEngine", "UringTransport"]

#: Provided buffers per server: reads in flight at once, across all its connections.
BUFFER_COUNT = 1024
#: One-shot receives in a row, each leaving the write side idle, before a connection's
#: receive becomes multishot (see "How much a connection can hold").
CALM_READS = 4
#: Each buffer's size (the per-read limit is ``min(max_read, this)``).
BUFFER_SIZE = 64 * 1024

_F_MORE = abi.IORING_CQE_F_MORE
_F_BUFFER = abi.IORING_CQE_F_BUFFER
#: Buffer states of the program's (see the module docstring); IN_KERNEL is the kernel's.
_LENT = 1
_CORKED = 2
_SHIFT = abi.IORING_CQE_BUFFER_SHIFT
_OP_RECV = abi.IORING_OP_RECV
_OP_ACCEPT = abi.IORING_OP_ACCEPT
_ACCEPT_MULTISHOT = abi.IORING_ACCEPT_MULTISHOT
_ACCEPT_FLAGS = int(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
_OP_SEND = abi.IORING_OP_SEND
_BUFFER_SELECT = abi.IOSQE_BUFFER_SELECT
_MULTISHOT = abi.IORING_RECV_MULTISHOT
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_ECANCELED = errno.ECANCELED
_ENOBUFS = errno.ENOBUFS
_EXCEPTIONS: dict[int, type[OSError]] = {
    errno.ECONNRESET: ConnectionResetError,
    errno.EPIPE: BrokenPipeError,
    errno.ECONNABORTED: ConnectionAbortedError,
}

_next_group = 0


def _error(code: int) -> OSError:
    return _EXCEPTIONS.get(code, OSError)(code, os.strerror(code))


class UringEngine:
    """One server's completion engine: its provided-buffer ring, its connections, and (on
    kernels with multishot accept) its listeners' accepts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_read: int) -> None:
        global _next_group
        proactor = getattr(loop, "proactor", None)
        if not isinstance(proactor, UringProactor):
            raise OSError(errno.ENOTSUP, f"{type(loop).__name__} is not iocp_echo's io_uring loop")
        capabilities = proactor.capabilities
        if not capabilities.buffer_ring:
            raise OSError(errno.ENOTSUP, "this kernel has no provided-buffer rings (Linux 5.19+)")
        self.loop = loop
        self.proactor = proactor
        self.multishot = capabilities.multishot_recv
        size = min(BUFFER_SIZE, -(-max_read // 4096) * 4096)
        _next_group = (_next_group + 1) % 0x8000
        self.buffers = BufferRing(
            proactor.ring, _next_group, BUFFER_COUNT, size, length=min(max_read, size)
        )
        self.group = self.buffers.group_id
        self.views = [self.buffers.view(bid) for bid in range(BUFFER_COUNT)]
        self.states = self.buffers.states
        self.take = self.buffers.take
        self.recycle = self.buffers.recycle
        self.read_size = self.buffers.buffer_length
        self.starved: list[UringTransport] = []
        self.corked: list[UringTransport] = []
        self._batch_end: asyncio.Handle | None = None
        self._pages_returned = False  # since the last receive was armed
        self.transports: set[UringTransport] = set()
        #: True when :meth:`start_accepting` can keep one multishot ACCEPT armed per listener.
        self.accepts = capabilities.multishot_accept
        self._accepting: dict[socket.socket, _Acceptor] = {}

    @property
    def name(self) -> str:
        mode = "multishot recv" if self.multishot else "one-shot recv"
        return (
            f"io_uring engine ({mode}, provided buffers, {self.proactor.capabilities.setup_mode})"
        )

    def connect(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        peer: Any,
        write_high_water: int,
        owner: ConnectionOwner | None,
    ) -> UringTransport:
        transport = UringTransport(
            self,
            sock,
            protocol,
            peer=peer,
            max_read=self.read_size,
            write_high_water=write_high_water,
            owner=owner,
        )
        self.transports.add(transport)
        return transport

    def sweep(self, now: float) -> None:
        """Give the pages of the provided buffers back to the OS while no receive can pick
        one (no connection is reading: after a flood's clients have gone, say).  Each buffer
        touched once stays resident otherwise (64 MiB for the whole ring); a buffer the kernel
        picks later is simply faulted in again."""
        if self._pages_returned or self.buffers.closed:
            return
        if (
            self.proactor.selects_from(self.group)
            or self.proactor.completions_waiting()
            or self.held_buffers()
        ):
            return
        self.buffers.release_pages()
        self._pages_returned = True

    def start_accepting(
        self,
        listener: socket.socket,
        admit: Callable[[socket.socket, Any], None],
        failed: Callable[[OSError], float],
    ) -> None:
        """Keep one multishot ACCEPT armed on *listener*: ``admit(conn, peer)`` for each
        connection; ``failed(exc)`` for each error, returning how long to wait before the
        accept is armed again (0: at once)."""
        acceptor = _Acceptor(self, listener, admit, failed)
        self._accepting[listener] = acceptor
        acceptor.arm()

    def stop_accepting(self) -> None:
        """Cancel every armed accept (before the listeners close)."""
        for acceptor in self._accepting.values():
            acceptor.stop()
        self._accepting.clear()

    def at_batch_end(self) -> None:
        """Have :meth:`_end_batch` run once this batch of completions is delivered."""
        if self._batch_end is None:
            self._batch_end = self.loop.call_soon(self._end_batch)

    def _end_batch(self) -> None:
        """After a batch of completions: send every connection's corked writes (which gives
        their buffers back), then re-arm the receives that found the ring empty.  Buffers
        are only held within a batch, so by now every one is back in the kernel's ring; a
        receive that ran dry earlier in the batch would otherwise wait for ever."""
        self._batch_end = None
        corked, self.corked = self.corked, []
        for transport in corked:
            transport._flush_cork()
        starved, self.starved = self.starved, []
        for transport in starved:
            transport._rearm_if_reading()

    def held_buffers(self) -> int:
        """How many provided buffers the program holds now (0 between batches)."""
        return len(self.states) - self.states.count(IN_KERNEL)

    def close(self) -> None:
        """Free the buffers, unless an operation may still select one (then they are kept
        until the loop's proactor closes, which abandons or frees them safely)."""
        if self.proactor.closing or self.buffers.closed:
            return
        if self.proactor.selects_from(self.group):
            return  # freed when the loop's proactor closes (or abandoned, never unsafe)
        try:
            self.buffers.close()
        except OSError:
            pass  # close() abandoned them: still safe


class _Acceptor:
    """One listener's multishot ACCEPT: one armed operation, one CQE per connection."""

    __slots__ = ("admit", "engine", "failed", "listener", "retry", "stopped", "tag")

    def __init__(
        self,
        engine: UringEngine,
        listener: socket.socket,
        admit: Callable[[socket.socket, Any], None],
        failed: Callable[[OSError], float],
    ) -> None:
        self.engine = engine
        self.listener = listener
        self.admit = admit
        self.failed = failed
        self.tag = 0
        self.stopped = False
        self.retry: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.retry = None
        proactor = self.engine.proactor
        if self.stopped or proactor.closing or self.listener.fileno() < 0:
            return
        self.tag = proactor.submit_direct(
            _OP_ACCEPT,
            self.listener,
            self.accepted,
            kind="accept",
            ioprio=_ACCEPT_MULTISHOT,
            op_flags=_ACCEPT_FLAGS,
        )

    def stop(self) -> None:
        self.stopped = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.tag and self.engine.proactor.cancel_direct(self.tag):
            self.tag = 0

    def accepted(self, res: int, flags: int) -> None:
        if not flags & _F_MORE:
            self.tag = 0
        if res >= 0:
            conn = socket.socket(self.listener.family, socket.SOCK_STREAM, fileno=res)
            if self.stopped:
                conn.close()
            else:
                conn.setblocking(False)  # as the descriptor already is (SOCK_NONBLOCK)
                try:
                    peer = conn.getpeername()
                except OSError as exc:  # reset while it waited in the backlog
                    conn.close()
                    self.failed(exc)
                else:
                    self.admit(conn, peer)
        elif res != -_ECANCELED and not self.stopped:
            delay = self.failed(_error(-res))
            if not self.tag and delay > 0:
                self.retry = self.engine.loop.call_later(delay, self.arm)
                return
        if not self.tag and not self.stopped:
            self.arm()  # the kernel ended the multishot accept: arm it again


class UringTransport(CompletionTransport):
    """A connection driven by its io_uring completions (see the module docstring)."""

    __slots__ = (
        "_calm",
        "_cork",
        "_cork_bids",
        "_engine",
        "_fill",
        "_lent_bid",
        "_recv_multishot",
        "_recv_started",
        "_recv_tag",
        "_send_anchor",
        "_send_rest",
        "_send_started",
        "_send_tag",
    )

    def __init__(self, engine: UringEngine, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(engine.loop, sock, *args, **kwargs)
        self._engine = engine
        self._recv_tag = 0
        self._recv_multishot = False  # the receive armed now is multishot
        self._calm = 0  # one-shot reads in a row that left the write side idle
        self._recv_started = 0.0
        self._send_tag = 0
        self._send_started = 0.0
        self._send_rest: bytes | None = None
        self._send_anchor: Any = None
        self._lent_bid = -1  # the provided buffer being delivered (LENT), or -1
        self._fill = False  # the read being delivered filled its buffer: more may follow
        self._cork: list[Any] | None = None  # writes held until the end of this batch
        self._cork_bids: list[int] | None = None

    def _start_reading(self) -> None:
        self._arm_recv()

    # -- reading ----------------------------------------------------------------------------

    def _arm_recv(self) -> None:
        engine = self._engine
        if engine.proactor.closing:
            return
        engine._pages_returned = False
        multishot = self._recv_multishot = engine.multishot and self._calm >= CALM_READS
        try:
            self._recv_tag = engine.proactor.submit_direct(
                _OP_RECV,
                self._sock,
                self._recv_done,
                kind="recv",
                nbytes=engine.read_size,
                ioprio=_MULTISHOT if multishot else 0,
                sqe_flags=_BUFFER_SELECT,
                buf_group=engine.group,
            )
        except OSError as exc:
            self._fatal_error(exc, "cannot submit a receive")
            return
        self._recv_started = time.monotonic()

    def _rearm_if_reading(self) -> None:
        if (
            not self._recv_tag
            and self._reading
            and not self._closing
            and not self._read_ended
            and self._backlog is None
        ):
            self._arm_recv()

    def _recv_done(self, res: int, flags: int) -> None:
        """A receive's CQE (one per arrival, while a multishot receive stays armed).

        The hot path: the bytes are lent (or handed) to the protocol straight from the
        provided buffer, which goes back to the kernel when the delivery returns, unless a
        corked write keeps it to the end of the batch.  Bytes the protocol cannot take now
        (paused, or others wait before them) are copied into the backlog."""
        if not flags & _F_MORE:
            self._recv_tag = 0
        if res <= 0:
            self._recv_other(res, flags)
            return
        # Before this read is answered: has the client acknowledged every earlier answer?
        # (Asked once per calm spell, for the read that would earn a multishot receive.)
        acknowledged = (
            self._recv_tag or self._calm != CALM_READS - 1 or _unacknowledged(self._sock) == 0
        )
        bid = flags >> _SHIFT
        engine = self._engine
        states = engine.states
        if states[bid]:
            engine.take(bid)  # raises BufferOwnershipError: the kernel gave a held buffer
        states[bid] = _LENT
        self.bytes_received += res
        view = engine.views[bid][:res]
        try:
            if self._reading and self._backlog is None and not self._closing:
                self._fill = res == engine.read_size
                self._lent_bid = bid
                try:
                    lend = self._lend
                    if lend is not None:
                        self._lent = view
                        lend(view)
                    else:
                        self._deliver(view)
                except (SystemExit, KeyboardInterrupt):
                    # Out of the loop it goes; the connection reads on if the loop runs again.
                    self._loop.call_soon(self._rearm_if_reading)
                    raise
                except BaseException as exc:
                    self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            elif not self._closing:
                self._hold(bytes(view))
        finally:
            self._lent = None
            self._lent_bid = -1
            self._fill = False
            if states[bid] == _LENT:
                engine.recycle(bid)
        if not self._recv_tag and self._reading and not self._closing:
            # A one-shot receive (or a multishot one the kernel ended): arm the next.
            if acknowledged and not self._sending and not self._queue:
                self._calm += 1
            else:
                self._calm = 0
            self._rearm_if_reading()

    def _stop_reading_ahead(self) -> None:
        """The connection is backing up: no multishot receive until it is calm again."""
        self._calm = 0
        # A multishot receive the kernel has seen ends with -ECANCELED, which re-arms; one it
        # never saw is gone at once: arm a one-shot receive in its place.
        if (
            self._recv_multishot
            and self._recv_tag
            and self._engine.proactor.cancel_direct(self._recv_tag)
        ):
            self._recv_tag = 0
            self._rearm_if_reading()

    def _recv_other(self, res: int, flags: int) -> None:
        """The rest of a receive's outcomes: EOF, errors, cancellation, an empty ring."""
        if flags & _F_BUFFER:  # a buffer picked for no data: give it straight back
            bid = flags >> _SHIFT
            self._engine.take(bid)
            self._engine.recycle(bid)
        if res == 0:
            self._arrived(END_OF_STREAM)
        elif res == -_ECANCELED:  # paused or closing (or resumed before the cancel landed)
            self._rearm_if_reading()
        elif res == -_ENOBUFS:  # the ring ran dry within this batch: read again after it
            if not self._closing:
                self._engine.starved.append(self)
                self._engine.at_batch_end()
        else:
            self._arrived(_error(-res))

    def _reading_paused(self) -> None:
        self._calm = 0  # a pause is pressure: no read-ahead until calm again
        self._stop_reading()

    def _reading_resumed(self) -> None:
        self._rearm_if_reading()

    def _stop_reading(self) -> None:
        if self._recv_tag and self._engine.proactor.cancel_direct(self._recv_tag):
            self._recv_tag = 0

    # -- sending ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        """The fast path: write side IDLE and open, the socket takes everything now.

        The send is written out here rather than calling :meth:`_start_send` (which does the
        same for queued data): it is one Python call per echo, a fifth of the engine's."""
        if (
            self._sending
            or self._queue
            or self._conn_lost
            or self._eof_pending
            or self._empty_waiter is not None
        ):
            CompletionTransport.write(self, data)
            return
        if self._eof_written:
            raise RuntimeError("write_eof() already called")
        if type(data) is memoryview and data.format != "B":
            data = _byte_view(data)
        if self._cork is not None or self._fill:
            self._cork_write(data)
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fatal_error(exc, "send failed")
            return
        self.bytes_sent += sent
        if sent != len(data):
            self._submit_send(bytes(data[sent:]))

    # A read that fills its buffer is usually followed, in the same batch of completions, by
    # the rest of the message (a 65,536-byte message is read as 65,535 + 1 with the default
    # max_read).  Writes made then are held (corked) until the end of the batch and go out in
    # one sendmsg(): one system call and one segment train instead of a tiny second send that
    # the peer must wake up for.  The provided buffers stay held (CORKED) until then: no copy.

    def _cork_write(self, data: bytes | bytearray | memoryview) -> None:
        if self._cork is None or self._cork_bids is None:
            self._cork = []
            self._cork_bids = []
            self._engine.corked.append(self)
            self._engine.at_batch_end()
        bid = self._lent_bid
        if bid >= 0 and data is self._lent:
            self._engine.states[bid] = _CORKED
            self._cork.append(data)
            self._cork_bids.append(bid)
        else:
            self._cork.append(bytes(data))
        self._queued += len(data)
        if self._queued > self._high_water:
            self._maybe_pause_protocol()

    def _flush_cork(self, *, resume: bool = True) -> None:
        """Send what was corked: one sendmsg(); a SEND of a copy for what the socket did not
        take.  Gives every corked buffer back (but the one being delivered right now).  From
        inside close() or write_eof() (*resume* false) a paused protocol is resumed by a loop
        callback, not before the method returns."""
        chunks, bids = self._cork, self._cork_bids
        self._cork = self._cork_bids = None
        if not chunks:
            return
        total = self._queued
        self._queued = 0
        sent = 0
        if not self._conn_lost:
            try:
                sent = self._sock.sendmsg(chunks)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._uncork(bids)
                self._fatal_error(exc, "send failed")
                return
            self.bytes_sent += sent
            if sent != total:
                self._submit_send(b"".join(chunks)[sent:])
        self._uncork(bids)
        if self._protocol_paused:
            if resume:
                self._maybe_resume_protocol()
            else:
                self._loop.call_soon(self._maybe_resume_protocol)

    def _uncork(self, bids: list[int] | None) -> None:
        """The cork no longer needs these buffers: each goes back once, except the one being
        delivered (it becomes LENT again; its delivery gives it back)."""
        if not bids:
            return
        engine = self._engine
        states = engine.states
        for bid in set(bids):
            if bid == self._lent_bid:
                states[bid] = _LENT
            elif states[bid] == _CORKED:
                engine.recycle(bid)

    def close(self) -> None:
        if self._cork is not None:
            self._flush_cork(resume=False)
        super().close()

    def write_eof(self) -> None:
        if self._cork is not None:
            self._flush_cork(resume=False)
        super().write_eof()

    def _start_send(self, data: bytes | bytearray | memoryview) -> None:
        """Write side IDLE: try the socket now; submit a SEND only for what it did not take."""
        if type(data) is memoryview and data.format != "B":
            data = _byte_view(data)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fatal_error(exc, "send failed")
            return
        self.bytes_sent += sent
        if sent != len(data):
            self._submit_send(bytes(data[sent:]))

    def _submit_send(self, rest: bytes) -> None:
        """SEND *rest* (a copy the transport owns); the write side is SENDING until it is
        all gone.  One send in flight at most: writes meanwhile queue behind it."""
        if self._send_tag or not rest:
            raise AssertionError(
                f"SEND of {len(rest)} bytes with another in flight ({self._send_tag})"
            )
        anchor, address, size = _pin_for_reading(rest)
        try:
            self._send_tag = self._engine.proactor.submit_direct(
                _OP_SEND,
                self._sock,
                self._send_done,
                kind="send",
                nbytes=size,
                addr=address,
                length=size,
                op_flags=_MSG_NOSIGNAL,
                anchor=anchor,
            )
        except (OSError, RuntimeError) as exc:
            self._fatal_error(OSError(errno.EBADF, str(exc)), "cannot submit a send")
            return
        self._send_rest = rest
        self._send_anchor = anchor
        self._sending = size
        self._send_started = time.monotonic()
        if self._calm or self._recv_multishot:
            self._stop_reading_ahead()
        self._maybe_pause_protocol()

    def _send_done(self, res: int, flags: int) -> None:
        self._send_tag = 0
        rest, self._send_rest = self._send_rest, None
        self._send_anchor = None
        if res < 0:
            self._sending = 0
            if not self._conn_lost:
                self._fatal_error(_error(-res), "send failed")
            return
        if res < self._sending and rest is not None:  # the kernel took part: SEND the rest
            self.bytes_sent += res
            self._sending = 0
            if not self._conn_lost:
                self._submit_send(rest[res:])
            return
        if self._conn_lost:
            return
        self._send_completed(res)

    def _cancel_all(self) -> None:
        proactor = self._engine.proactor
        if self._cork is not None:  # aborted: what was corked is dropped
            bids, self._cork, self._cork_bids = self._cork_bids, None, None
            self._queued = 0
            self._uncork(bids)
        if proactor.closing:
            return  # its close() cancels everything itself
        if self._recv_tag and proactor.cancel_direct(self._recv_tag):
            self._recv_tag = 0
        if self._send_tag and proactor.cancel_direct(self._send_tag):
            self._send_tag = 0
            self._send_rest = self._send_anchor = None

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        self._engine.transports.discard(self)
        super()._call_connection_lost(exc)

    # -- introspection ----------------------------------------------------------------------

    def operations(self) -> list[tuple[str, str, int, float]]:
        ops = []
        if self._recv_tag:
            state = "cancelling" if self._closing or not self._reading else "pending"
            ops.append(("recv", state, self._engine.read_size, self._recv_started))
        if self._send_tag:
            state = "cancelling" if self._conn_lost else "pending"
            ops.append(("send", state, self._sending, self._send_started))
        return ops


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on *sock* that its peer has not acknowledged yet (``SIOCOUTQ``)."""
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except OSError:
        return -1
    unacknowledged: int = struct.unpack("i", answer)[0]
    return unacknowledged


def _byte_view(data: memoryview) -> memoryview:
    """A view of *data*'s bytes (sizes and offsets count bytes, not items)."""
    if data.c_contiguous:
        return data.cast("B")
    return memoryview(data.tobytes())
