"""The completion engine on io_uring: connections driven by their completions.

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
``SEND`` submitted for the rest, from the same provided buffer, which then returns to the ring
when that send completes.  A later write never overtakes a send in flight: it queues behind it
(see :class:`~iocp_echo._transport.CompletionTransport`).

Completions reach the connection through :meth:`~.proactor.UringProactor.submit_direct`: the
proactor calls the handler inline from its ``select()``, with no Future and no ``call_soon``.
A kernel without multishot receive gets a one-shot ``RECV`` with buffer selection, re-armed
after each completion; a kernel without provided-buffer rings gets no engine at all (the
server then uses asyncio's own transports).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .._transport import CompletionTransport, ConnectionOwner
from . import abi
from .proactor import UringProactor, _pin_for_reading
from .ring import BufferRing

__all__ = ["UringEngine", "UringTransport"]

#: Provided buffers per server: reads in flight at once, across all its connections.
BUFFER_COUNT = 1024
#: Each buffer's size (the per-read limit is ``min(max_read, this)``).
BUFFER_SIZE = 64 * 1024

_F_MORE = abi.IORING_CQE_F_MORE
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

    needs_sweep = False

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
        self.recycle = self.buffers.recycle
        self.read_size = self.buffers.buffer_length
        self.starved: list[UringTransport] = []
        self.corked: list[UringTransport] = []
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
        pass  # nothing to reclaim: idle connections hold no buffer

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

    def flush_corked(self) -> None:
        """End of a batch of completions: send every connection's corked writes."""
        corked, self.corked = self.corked, []
        for transport in corked:
            transport._flush_cork()

    def rearm_starved(self) -> None:
        """A buffer came back: connections whose receive ran out of buffers read again."""
        starved, self.starved = self.starved, []
        for transport in starved:
            if transport._reading and not transport._closing and not transport._recv_tag:
                transport._arm_recv()

    def close(self) -> None:
        """Free the buffers, unless an operation may still select one (then they are kept
        until the loop's proactor closes, which abandons or frees them safely)."""
        if self.proactor.closing or self.buffers.closed:
            return
        if any(t._recv_tag or t._send_tag for t in self.transports):
            return
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
        "_cork",
        "_cork_bids",
        "_engine",
        "_fill",
        "_held",
        "_lent_bid",
        "_recv_started",
        "_recv_tag",
        "_send_anchor",
        "_send_rest",
        "_send_started",
        "_send_tag",
        "_stash",
    )

    def __init__(self, engine: UringEngine, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(engine.loop, sock, *args, **kwargs)
        self._engine = engine
        self._recv_tag = 0
        self._recv_started = 0.0
        self._send_tag = 0
        self._send_started = 0.0
        self._send_rest: Any = None
        self._send_anchor: Any = None
        self._held = -1  # the provided buffer a send in flight is sending from
        self._lent_bid = -1
        self._stash: list[tuple[int, int]] | None = None
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
        try:
            self._recv_tag = engine.proactor.submit_direct(
                _OP_RECV,
                self._sock,
                self._recv_done,
                kind="recv",
                nbytes=engine.read_size,
                ioprio=_MULTISHOT if engine.multishot else 0,
                sqe_flags=_BUFFER_SELECT,
                buf_group=engine.group,
            )
        except OSError as exc:
            self._fatal_error(exc, "cannot submit a receive")
            return
        self._recv_started = time.monotonic()

    def _recv_done(self, res: int, flags: int) -> None:
        """A receive's CQE (one per arrival, while a multishot receive stays armed).

        The hot path: the bytes are lent (or handed) to the protocol straight from the
        provided buffer, which goes back to the kernel at once unless a send kept it."""
        if not flags & _F_MORE:
            self._recv_tag = 0
        if res > 0 and self._reading and not self._closing:
            bid = flags >> _SHIFT
            self.bytes_received += res
            engine = self._engine
            view = engine.views[bid][:res]
            self._fill = res == engine.read_size
            try:
                lend = self._lend
                if lend is not None:
                    self._lent = view
                    self._lent_bid = bid
                    lend(view)
                else:
                    self._deliver(view)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            self._lent = None
            self._fill = False
            if self._held != bid and (self._cork_bids is None or bid not in self._cork_bids):
                engine.recycle(bid)
                if engine.starved:
                    engine.rearm_starved()
            if not self._recv_tag and self._reading and not self._closing:
                self._arm_recv()
            return
        self._recv_other(res, flags)

    def _recv_other(self, res: int, flags: int) -> None:
        """The rest of a receive's outcomes: data while paused or closing, EOF, errors."""
        if res > 0:
            bid = flags >> _SHIFT
            self.bytes_received += res
            if self._closing:
                self._engine.recycle(bid)
            else:
                if self._stash is None:
                    self._stash = []
                self._stash.append((bid, res))  # delivered by resume_reading()
            return
        if res == 0:
            if not self._closing:
                self._eof_received()
            return
        if self._closing:
            return
        if res == -_ECANCELED:  # paused (or resumed again before the cancel landed)
            if self._reading and not self._recv_tag:
                self._arm_recv()
            return
        if res == -_ENOBUFS:
            self._engine.starved.append(self)
            return
        self._fatal_error(_error(-res), "receive failed")

    def _deliver_from(self, bid: int, nbytes: int) -> None:
        """Deliver a stashed receive (after resume_reading)."""
        engine = self._engine
        view = engine.views[bid][:nbytes]
        self._lent_bid = bid
        try:
            if self._lend is not None:
                self._lent = view
                self._lend(view)
            else:
                self._deliver(view)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
        finally:
            self._lent = None
            if self._held != bid:
                engine.recycle(bid)
                if engine.starved:
                    engine.rearm_starved()

    def _reading_paused(self) -> None:
        if self._recv_tag and self._engine.proactor.cancel_direct(self._recv_tag):
            self._recv_tag = 0

    def _reading_resumed(self) -> None:
        stash = self._stash
        while stash and self._reading and not self._closing:
            bid, nbytes = stash.pop(0)
            self._deliver_from(bid, nbytes)
        if not stash:
            self._stash = None
        if self._reading and not self._closing and not self._recv_tag:
            self._arm_recv()

    def _stop_reading(self) -> None:
        stash, self._stash = self._stash, None
        for bid, _nbytes in stash or ():
            self._engine.recycle(bid)
        if self._recv_tag and self._engine.proactor.cancel_direct(self._recv_tag):
            self._recv_tag = 0

    # -- sending ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        """The fast path: write side IDLE and open, the socket takes everything now.

        The send is written out here rather than calling :meth:`_start_send` (which does the
        same for queued data): it is one Python call per echo, a fifth of the engine's."""
        if self._sending or self._queue or self._conn_lost or self._eof_pending:
            CompletionTransport.write(self, data)
            return
        if self._eof_written:
            raise RuntimeError("write_eof() already called")
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
            self._send_remainder(data, sent)

    # A read that fills its buffer is usually followed, in the same batch of completions, by
    # the rest of the message (a 65,536-byte message is read as 65,535 + 1 with the default
    # max_read).  Writes made then are held (corked) until the end of the batch and go out in
    # one sendmsg(): one system call and one segment train instead of a tiny second send that
    # the peer must wake up for.  The provided buffers stay held until then: no copy.

    def _cork_write(self, data: bytes | bytearray | memoryview) -> None:
        if self._cork is None:
            self._cork = []
            self._cork_bids = []
            self._engine.corked.append(self)
            if len(self._engine.corked) == 1:
                self._loop.call_soon(self._engine.flush_corked)  # once per batch
        if data is self._lent:
            self._cork.append(data)
            self._cork_bids.append(self._lent_bid)  # type: ignore[union-attr]
        else:
            self._cork.append(bytes(data))
            self._cork_bids.append(-1)  # type: ignore[union-attr]
        self._queued += len(data)
        if self._queued > self._high_water:
            self._maybe_pause_protocol()

    def _flush_cork(self) -> None:
        """Send what was corked: one sendmsg(); a SEND for what the socket did not take."""
        chunks, bids = self._cork, self._cork_bids
        self._cork = self._cork_bids = None
        if not chunks or bids is None:
            return
        total = self._queued
        self._queued = 0
        if self._conn_lost:
            self._recycle_all(bids)
            return
        try:
            sent = self._sock.sendmsg(chunks)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._recycle_all(bids)
            self._fatal_error(exc, "send failed")
            return
        self.bytes_sent += sent
        if sent == total:
            self._recycle_all(bids)
            if self._protocol_paused:
                self._maybe_resume_protocol()
            return
        # The rest goes in one SEND: straight from its provided buffer when it is one piece
        # of one (the usual case: the socket is full), else copied together.
        pieces: list[tuple[Any, int]] = []
        for chunk, bid in zip(chunks, bids, strict=True):
            if sent >= len(chunk):
                sent -= len(chunk)
                if bid >= 0:
                    self._engine.recycle(bid)
                continue
            pieces.append((chunk[sent:], bid))
            sent = 0
        if len(pieces) == 1 and pieces[0][1] >= 0:
            rest, self._held = pieces[0]
        else:
            rest = b"".join(piece for piece, _bid in pieces)
            self._recycle_all([bid for _piece, bid in pieces])
        self._submit_send(rest)

    def _recycle_all(self, bids: list[int] | None) -> None:
        engine = self._engine
        for bid in bids or ():
            if bid >= 0:
                engine.recycle(bid)
        if engine.starved:
            engine.rearm_starved()

    def close(self) -> None:
        if self._cork is not None:
            self._flush_cork()
        super().close()

    def write_eof(self) -> None:
        if self._cork is not None:
            self._flush_cork()
        super().write_eof()

    def _start_send(self, data: bytes | bytearray | memoryview) -> None:
        """Write side IDLE: try the socket now; submit a SEND only for what it did not take."""
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fatal_error(exc, "send failed")
            return
        self.bytes_sent += sent
        if sent != len(data):
            self._send_remainder(data, sent)

    def _send_remainder(self, data: bytes | bytearray | memoryview, sent: int) -> None:
        """The socket took part (or none): SEND the rest, from the provided buffer if lent."""
        if not data:
            return
        if data is self._lent:
            self._held = self._lent_bid  # the provided buffer goes with the send
            rest: Any = data[sent:]
        else:
            rest = bytes(data[sent:])
        self._submit_send(rest)

    def _submit_send(self, rest: Any) -> None:
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
            self._release_held()
            self._fatal_error(OSError(errno.EBADF, str(exc)), "cannot submit a send")
            return
        self._send_rest = rest
        self._send_anchor = anchor
        self._sending = size
        self._send_started = time.monotonic()
        self._maybe_pause_protocol()

    def _send_done(self, res: int, flags: int) -> None:
        self._send_tag = 0
        rest, self._send_rest = self._send_rest, None
        self._send_anchor = None
        if res < 0:
            self._release_held()
            self._sending = 0
            if not self._conn_lost:
                self._fatal_error(_error(-res), "send failed")
            return
        if res < self._sending:  # the kernel took part: send the rest from the same buffer
            self.bytes_sent += res
            self._sending = 0
            if self._conn_lost:
                self._release_held()
                return
            self._submit_send(rest[res:])
            return
        self._release_held()
        if self._conn_lost:
            return
        self._send_completed(res)

    def _release_held(self) -> None:
        bid = self._held
        if bid >= 0:
            self._held = -1
            engine = self._engine
            engine.recycle(bid)
            if engine.starved:
                engine.rearm_starved()

    def _cancel_all(self) -> None:
        proactor = self._engine.proactor
        if proactor.closing:
            return  # its close() cancels everything itself
        if self._recv_tag and proactor.cancel_direct(self._recv_tag):
            self._recv_tag = 0
        if self._send_tag and proactor.cancel_direct(self._send_tag):
            self._send_tag = 0
            self._send_rest = self._send_anchor = None
            self._release_held()
        stash, self._stash = self._stash, None
        for bid, _nbytes in stash or ():
            self._engine.recycle(bid)
        if self._cork is not None:  # aborted: what was corked is dropped
            bids, self._cork, self._cork_bids = self._cork_bids, None, None
            self._queued = 0
            self._recycle_all(bids)

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
