"""asyncio's proactor interface on an io_uring :class:`~.ring.Ring`, and the event loop on it.

Design note
-----------

*Tags.*  Every operation gets a ``user_data`` tag, a counter that is never reused, and one record
in ``UringProactor._ops`` under that tag.  A completion (CQE) carries the tag back; a CQE whose
tag has no record (a cancel's own outcome, a neutralized entry, an operation already forgotten)
is dropped.  Tags with bit 63 set are ours (``ASYNC_CANCEL`` requests, NOPs) and never records.

*Two kinds of record.*  Future operations (``recv``, ``send``, ``accept``... the interface
``BaseProactorEventLoop`` calls, as CPython's ``IocpProactor`` offers on Windows) resolve an
``asyncio.Future``, whose done-callbacks the loop runs later.  Direct operations
(:meth:`UringProactor.submit_direct`) call a handler ``handler(res, cqe_flags)`` inline, from
:meth:`UringProactor.select`, with no future and no ``call_soon``: the completion engine's hot
path.  A direct record is forgotten when a CQE without ``IORING_CQE_F_MORE`` arrives, so a
multishot operation (accept, recv) is one record for as long as the kernel keeps it armed.

*NOP-ing unsubmitted entries.*  An SQE is the program's until ``io_uring_enter`` hands it over:
the kernel's SQ head says which ones it has consumed, at the moment we look.  Cancelling an
operation the kernel has not consumed rewrites its SQE as a NOP and forgets the record at once
(nothing will complete for it; a read cancelled so leaves its bytes in the socket).  That
decision is taken from the SQ head, never from Python control flow: a signal (Ctrl-C) can
interrupt the code between ``io_uring_enter`` returning and the bookkeeping after it.  For the
same reason a cancelled operation the kernel *has* consumed is cancelled with ``ASYNC_CANCEL``,
and its record (and the buffer it pins) stays until its CQE arrives.  Before every enter, an
unsubmitted operation whose socket was closed is neutralized too and fails with EBADF: the SQE
holds a descriptor *number*, resolved at submission, which may by then name another socket.

*Accepts never fail for a client's doing.*  asyncio's proactor accept loop closes its listening
socket when one accept future fails (CPython gh-93821), so a client must not be able to fail
one.  A connection reset while it waited in the backlog is still returned by the kernel's
accept, but ``getpeername()`` on it fails with ENOTCONN: the ``ACCEPT`` is therefore given a
sockaddr buffer, which the kernel fills in whatever the connection's state (and which saves a
system call per accept).  The errors accept(2) documents for the pending connection alone
(ECONNABORTED, EPROTO, the network-down family), and a ``getpeername()`` fallback failing,
submit the accept again under a new tag, for the same future
(:attr:`UringProactor.accepts_retried` counts them).  asyncio's transports must then also be
able to close a reset connection's socket: see :class:`_AcceptedSocket`.

*Partial sends.*  A stream ``SEND`` may take part of the bytes.  The future completes only when
all are sent: the rest is resubmitted from the same pinned buffer under a new tag.

*Deferred completions.*  A full submission ring is entered mid-iteration (``_make_room``);
completions reaped then, to make room in a full completion ring, and the EBADF failures of
closed sockets' operations are kept in ``_deferred`` and delivered, in order, by the next
:meth:`~UringProactor.select`, never from inside a submission call.

*Deliberately abandoned buffers.*  :meth:`~UringProactor.close` cancels everything and waits,
bounded, for the kernel to give each operation back.  Whatever it did not return may still be
written when the ring is torn down (asynchronously, in the kernel): those records, their
buffers and any buffer rings are kept alive for the life of the process, never freed.

*Memory ordering of the rings.*  The SQ tail is stored, then ``io_uring_enter`` is called: the
kernel reads the tail (with acquire) in this same thread's system call, so program order is
enough on any architecture.  Reaping reads the CQ tail, copies the CQEs out (bytes slices of
the mapping), then stores the CQ head; each step is a separate C call made after the previous
one returned, so the compiler cannot reorder them.  On x86-64 (TSO) loads are not reordered
with loads, nor stores with earlier loads: the CQEs read are those the tail published, and the
kernel cannot see the head move before they are copied.  On arm64 the hardware may reorder
plain loads and stores; it is safe in the ``defer_taskrun`` mode, where every CQE is posted by
this thread inside ``io_uring_enter`` (program order again), and in practice in the others,
where CQEs posted by other CPUs are followed by a wake-up (a full barrier) before a waiting
enter returns.  A non-waiting reap on arm64 in the fallback modes has no formal acquire on the
tail (``ctypes`` offers no atomics to make one): one more reason ``defer_taskrun`` is tried
first.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from ..errors import UnsupportedPlatformError
from . import abi
from .ring import BufferRing, Ring

__all__ = [
    "DEFAULT_ENTRIES",
    "FEATURES",
    "OPS_USED",
    "UringCapabilities",
    "UringOperation",
    "UringProactor",
    "check_kernel",
]

#: Submission ring size of the loop's proactor (and of the start-up probe).
DEFAULT_ENTRIES: Final = 4096
#: Features a test can force off: ``UringProactor(disable={"multishot_recv"})``.
FEATURES: Final = ("multishot_accept", "buffer_ring", "multishot_recv")
#: Opcodes every proactor needs (the start-up probe names any that is missing).
OPS_USED: dict[str, int] = {
    "NOP": abi.IORING_OP_NOP,
    "POLL_ADD": abi.IORING_OP_POLL_ADD,
    "ACCEPT": abi.IORING_OP_ACCEPT,
    "ASYNC_CANCEL": abi.IORING_OP_ASYNC_CANCEL,
    "SEND": abi.IORING_OP_SEND,
    "RECV": abi.IORING_OP_RECV,
}

_POLLIN, _POLLOUT = 0x001, 0x004
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)  # a plain int: IntFlag arithmetic is slow
_OWN_TAG: Final = 1 << 63  # user_data of our ASYNC_CANCELs and NOPs: never a record
_F_MORE: Final = abi.IORING_CQE_F_MORE
_PROBE_GROUP: Final = 0xFFFF  # buffer group briefly registered to test buffer rings
_EXCEPTIONS: Final[dict[int, type[OSError]]] = {
    errno.ECONNRESET: ConnectionResetError,
    errno.EPIPE: BrokenPipeError,
    errno.ECONNABORTED: ConnectionAbortedError,
}
#: Accept errors about the one connection being accepted, never about the listener (see the
#: design note): the accept is submitted again.  Errors a listener causes itself (EINVAL,
#: EOPNOTSUPP, EBADF) and resource limits (EMFILE, ENOBUFS) are not here: retrying those at
#: once would spin, so they reach the caller.
_ACCEPT_AGAIN: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.ENOTCONN,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENONET,
    }
)
#: An accept's address buffer: a ``struct sockaddr_storage``, then the ``socklen_t`` the
#: kernel reads (its size) and writes (the address's length).
_SOCKADDR_SIZE: Final = 128
_SOCKLEN = ctypes.c_uint32

#: Operations the kernel never returned before their ring closed (kept alive for good).
_abandoned: list[object] = []


@dataclass(frozen=True)
class UringCapabilities:
    """What this kernel offers the completion engine, decided when the proactor is made."""

    multishot_accept: bool  # IORING_ACCEPT_MULTISHOT, 5.19
    buffer_ring: bool  # IORING_REGISTER_PBUF_RING, 5.19 (tried for real)
    multishot_recv: bool  # IORING_RECV_MULTISHOT, 6.0 (needs buffer_ring)
    setup_mode: str  # "defer_taskrun", "coop_taskrun" or "plain" (see ring.py)


class UringOperation(NamedTuple):
    """One operation in flight, as :meth:`UringProactor.operations` lists it."""

    future: asyncio.Future[Any] | None  # None for a direct operation
    sock: Any
    kind: str
    nbytes: int | None
    started: float  # time.monotonic()
    state: str  # "pending", "cancelling" (a cancel was issued) or "completing"


def kernel_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_kernel(ring: Ring) -> None:
    """Raise :class:`UnsupportedPlatformError` naming what this backend needs and *ring*'s
    kernel lacks: a feature or an opcode."""
    missing = [
        name
        for name, bit in (("NODROP", abi.IORING_FEAT_NODROP), ("EXT_ARG", abi.IORING_FEAT_EXT_ARG))
        if not ring.features & bit
    ]
    if missing:
        raise UnsupportedPlatformError(
            f"iocp_echo's Linux backend needs io_uring features {', '.join(missing)} "
            "(Linux 5.11 or later); this kernel lacks them"
        )
    supported = ring.probe_opcodes()
    absent = [name for name, op in OPS_USED.items() if op not in supported]
    if absent:
        raise UnsupportedPlatformError(
            f"iocp_echo's Linux backend needs io_uring operations {', '.join(absent)}; "
            "this kernel does not offer them (Linux 5.11 or later has them all)"
        )


class _UringFuture(asyncio.Future[Any]):
    """A future whose cancellation cancels the kernel operation (like ``_OverlappedFuture``)."""

    _proactor: UringProactor | None
    _user_data: int

    def cancel(self, msg: Any = None) -> bool:
        if not self.done() and self._proactor is not None:
            self._proactor._cancel(self._user_data)
        return super().cancel(msg=msg)


class _Operation:
    """A future operation's record."""

    __slots__ = (
        "addr",
        "buffer",
        "finish",
        "future",
        "handler",
        "kind",
        "length",
        "nbytes",
        "obj",
        "off",
        "op_flags",
        "opcode",
        "slot",
        "started",
    )
    opcode: int
    addr: int
    length: int
    off: int
    op_flags: int

    def __init__(
        self,
        future: _UringFuture,
        kind: str,
        obj: Any,
        nbytes: int | None,
        buffer: Any,
        finish: Callable[[int], Any] | None,
    ) -> None:
        self.future = future
        self.handler = None  # (the dispatch loop tells the two kinds apart by this)
        self.kind = kind
        self.obj = obj  # the socket: kept alive while the kernel works on it
        self.nbytes = nbytes
        self.buffer = buffer  # owned by the kernel until the completion is reaped
        self.finish = finish
        self.started = time.monotonic()
        self.slot = -1


class HasFileno(Protocol):
    """What a direct operation is issued on: a socket, or any owner of a descriptor (asked
    again before each submission: -1 means closed)."""

    def fileno(self) -> int: ...


class _Direct:
    """A direct operation's record: its handler is called inline with each CQE."""

    __slots__ = (
        "anchor",
        "buf_group",
        "cancelling",
        "handler",
        "kind",
        "nbytes",
        "obj",
        "slot",
        "started",
    )

    def __init__(
        self,
        kind: str,
        obj: HasFileno,
        nbytes: int,
        handler: Callable[[int, int], None],
        anchor: object,
        buf_group: int,
    ) -> None:
        self.buf_group = buf_group  # the provided-buffer group it selects from, or -1
        self.kind = kind
        self.obj = obj
        self.nbytes = nbytes
        self.handler = handler
        self.anchor = anchor  # e.g. the buffer the kernel writes: alive until the last CQE
        self.started = time.monotonic()
        self.cancelling = False
        self.slot = -1


def _pin_for_reading(buf: Any) -> tuple[Any, int, int]:
    """(an object keeping the memory alive, its address, its size), copying only a read-only
    buffer that is not ``bytes`` (whose memory ctypes can point at directly)."""
    if isinstance(buf, bytes):
        pointer = ctypes.c_char_p(buf)
        return (buf, pointer), ctypes.cast(pointer, ctypes.c_void_p).value or 0, len(buf)
    view = memoryview(buf).cast("B")
    try:
        anchor = (ctypes.c_char * len(view)).from_buffer(view)
        return (anchor, view), ctypes.addressof(anchor), len(view)
    except TypeError:  # read-only
        return _pin_for_reading(bytes(view))


class UringProactor:
    """The proactor ``BaseProactorEventLoop`` needs, on io_uring, plus direct operations.

    *entries* is the submission ring size; *setup_modes* forces the ring set-up modes tried
    (see :mod:`.ring`); *disable* turns features of :attr:`capabilities` off, as if the kernel
    lacked them (for tests of the fallbacks).
    """

    def __init__(
        self,
        entries: int = DEFAULT_ENTRIES,
        *,
        setup_modes: Iterable[str] | None = None,
        disable: Collection[str] = (),
    ) -> None:
        unknown = set(disable) - set(FEATURES)
        if unknown:
            raise ValueError(f"disable takes features from {FEATURES}, not {sorted(unknown)}")
        self._ring: Ring | None = Ring(entries, setup_modes=setup_modes)
        try:
            check_kernel(self._ring)
            self.capabilities = self._probe_capabilities(self._ring, disable)
        except BaseException:
            self._ring.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: dict[int, _Operation | _Direct] = {}
        # Records whose SQE the kernel may not have consumed yet, in submission order.
        self._unsubmitted: dict[int, _Operation | _Direct] = {}
        self._cancels: list[int] = []
        self._deferred: list[tuple[int, int, int]] = []
        self._next = 1
        self._closing = False
        #: Accepts submitted again because their connection was gone (see the design note).
        self.accepts_retried = 0

    @staticmethod
    def _probe_capabilities(ring: Ring, disable: Collection[str]) -> UringCapabilities:
        version = kernel_version()
        opcodes = ring.probe_opcodes()
        buffer_ring = False
        if "buffer_ring" not in disable:
            try:
                BufferRing(ring, _PROBE_GROUP, 1, 1).close()
                buffer_ring = True
            except OSError:
                pass
        return UringCapabilities(
            multishot_accept="multishot_accept" not in disable
            and version >= (5, 19)
            and abi.IORING_OP_ACCEPT in opcodes,
            buffer_ring=buffer_ring,
            multishot_recv="multishot_recv" not in disable
            and buffer_ring
            and version >= (6, 0)
            and abi.IORING_OP_RECV in opcodes,
            setup_mode=ring.setup_mode,
        )

    def __repr__(self) -> str:
        state = "closed" if self._ring is None else f"in-flight#={len(self._ops)}"
        return f"<UringProactor {state}>"

    def set_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def ring(self) -> Ring:
        """The ring (e.g. to make a :class:`~.ring.BufferRing` on it)."""
        if self._ring is None:
            raise RuntimeError("UringProactor is closed")
        return self._ring

    @property
    def closing(self) -> bool:
        """True from the start of :meth:`close`: no new operation may be submitted."""
        return self._closing

    # -- direct operations (the completion engine's interface) -----------------------------

    def submit_direct(
        self,
        opcode: int,
        fd_owner: HasFileno,
        handler: Callable[[int, int], None],
        *,
        kind: str,
        nbytes: int = 0,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buf_group: int = 0,
        anchor: object = None,
    ) -> int:
        """Queue one operation on *fd_owner*'s descriptor; return its ``user_data``.

        ``handler(res, cqe_flags)`` is called from :meth:`select` (or :meth:`close`) for each
        of its CQEs, inline; the record is forgotten before the call when the CQE lacks
        ``IORING_CQE_F_MORE``.  *anchor* is kept until then (a buffer the kernel writes).
        *kind* and *nbytes* are for :meth:`operations`.  A handler must not raise (an
        exception goes to the loop's exception handler) and must not submit once
        :attr:`closing` is true.  Raises ``OSError(EBADF)`` if the socket is closed.
        """
        ring = self._ring
        if ring is None or self._closing:
            raise RuntimeError("UringProactor is closed")
        fd = fd_owner.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "the socket is closed")
        if self._cancels:
            self._flush_cancels()
        if ring.space() < 1:
            self._make_room()
        user_data = self._next
        self._next = user_data + 1
        selects = sqe_flags & abi.IOSQE_BUFFER_SELECT
        record = _Direct(kind, fd_owner, nbytes, handler, anchor, buf_group if selects else -1)
        record.slot = ring.push(
            opcode,
            fd,
            addr=addr,
            length=length,
            off=off,
            op_flags=op_flags,
            user_data=user_data,
            flags=sqe_flags,
            ioprio=ioprio,
            buf_group=buf_group,
        )
        self._ops[user_data] = record
        self._unsubmitted[user_data] = record
        return user_data

    def completions_waiting(self) -> bool:
        """Were completions reaped that the next :meth:`select` has still to deliver?"""
        return bool(self._deferred)

    def selects_from(self, buf_group: int) -> bool:
        """Is any operation that may still pick a buffer of *buf_group* in flight?  (A
        buffer ring must outlive every such operation: see ``BufferRing.close``.)"""
        return any(
            isinstance(op, _Direct) and op.buf_group == buf_group for op in self._ops.values()
        )

    def cancel_direct(self, user_data: int) -> bool:
        """Cancel a direct operation.  True: it is gone now (the kernel never saw it; its
        handler will not be called).  False: an ``ASYNC_CANCEL`` is on its way and the
        handler will get the final CQE (``-ECANCELED``, or a result that won the race)."""
        record = self._ops.get(user_data)
        if record is None or self._ring is None:
            return True
        if not isinstance(record, _Direct):
            raise ValueError(f"operation {user_data} is not a direct operation")
        if not self._ring.consumed(record.slot):
            self._ring.neutralize(record.slot, _OWN_TAG)
            del self._ops[user_data]
            self._unsubmitted.pop(user_data, None)
            return True
        if not record.cancelling:
            record.cancelling = True
            self._cancels.append(user_data)
        return False

    # -- the interface BaseProactorEventLoop uses -----------------------------------------

    def recv(self, conn: socket.socket, nbytes: int, flags: int = 0) -> asyncio.Future[Any]:
        buffer = ctypes.create_string_buffer(nbytes)
        return self._submit(
            "recv",
            conn,
            nbytes,
            buffer,
            abi.IORING_OP_RECV,
            ctypes.addressof(buffer),
            nbytes,
            flags,
            finish=lambda n: buffer.raw[:n],
        )

    def recv_into(self, conn: socket.socket, buf: Any, flags: int = 0) -> asyncio.Future[Any]:
        view = memoryview(buf).cast("B")
        size = len(view)
        if size == 0:
            return self._done(0)
        anchor = (ctypes.c_char * size).from_buffer(view)  # pins buf: no resize in flight
        return self._submit(
            "recv",
            conn,
            size,
            (anchor, view),
            abi.IORING_OP_RECV,
            ctypes.addressof(anchor),
            size,
            flags,
            finish=lambda n: n,
        )

    def send(self, conn: socket.socket, buf: Any, flags: int = 0) -> asyncio.Future[Any]:
        """Complete only when every byte is sent: partial sends are resubmitted."""
        anchor, address, size = _pin_for_reading(buf)  # the caller's memory, not a copy
        if size == 0:
            return self._done(0)
        return self._submit(
            "send", conn, size, anchor, abi.IORING_OP_SEND, address, size, flags | _MSG_NOSIGNAL
        )

    def accept(self, listener: socket.socket) -> asyncio.Future[Any]:
        """Accept one connection: ``(socket, peer address)``.  The future fails only for the
        listener's own errors, never for a client's (see the design note): a connection reset
        in the backlog is returned, with its address, and its first read reports the reset; a
        connection the kernel cannot return is skipped and the next one accepted."""
        address = ctypes.create_string_buffer(_SOCKADDR_SIZE + ctypes.sizeof(_SOCKLEN))
        where = ctypes.addressof(address)

        def finish(fd: int) -> tuple[socket.socket, Any]:
            conn = _AcceptedSocket(listener.family, socket.SOCK_STREAM, fileno=fd)
            conn.setblocking(False)  # as the fd already is (SOCK_NONBLOCK): tell Python
            peer = _peer_address(address)
            if peer is None:  # a family decoded here only by Python (AF_UNIX...)
                try:
                    peer = conn.getpeername()
                except OSError:
                    conn.close()
                    raise
            return conn, peer

        flags = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        return self._submit(
            "accept",
            listener,
            0,
            address,
            abi.IORING_OP_ACCEPT,
            where,
            0,
            flags,
            finish=finish,
            off=where + _SOCKADDR_SIZE,
        )

    def connect(self, conn: socket.socket, address: Any) -> asyncio.Future[Any]:
        """Start a non-blocking connect, then wait for writability as a completion."""
        try:
            conn.connect(address)
            return self._done(None)
        except BlockingIOError:
            pass
        except OSError as exc:
            return self._failed(exc)

        def finish(_events: int) -> None:
            code = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))

        return self._submit(
            "connect", conn, None, None, abi.IORING_OP_POLL_ADD, 0, 0, _POLLOUT, finish=finish
        )

    def sendfile(self, sock: Any, file: Any, offset: int, count: int) -> asyncio.Future[Any]:
        """Send *count* bytes of *file* from *offset*: ``os.sendfile()`` (the kernel copies
        from the page cache, nothing passes through Python) whenever the socket can take more,
        as the selector loop's ``sock_sendfile`` does; io_uring has no sendfile operation.
        The future completes once all of them went (or the file ended), which is what
        asyncio's proactor loop expects of ``IocpProactor.sendfile`` (TransmitFile); the
        file's position follows what was sent, as with the selector loop."""
        out, source = sock.fileno(), file.fileno()
        position, left = offset, count

        def send_more() -> None:
            nonlocal position, left
            while left > 0:
                sent = os.sendfile(out, source, position, left)  # BlockingIOError: wait
                if sent == 0:
                    return  # the file is shorter than asked
                position += sent
                left -= sent
                # Where the file stands if the peer goes away before the rest (asyncio
                # positions it after the whole block only once the block completed).
                file.seek(position)

        return self._readiness("sendfile", sock, _POLLOUT, send_more)

    def _readiness(
        self, kind: str, sock: socket.socket, events: int, action: Callable[[], Any]
    ) -> asyncio.Future[Any]:
        """Datagram calls: a POLL_ADD completion, then the non-blocking call, again until it
        does not block.  Cancelling the returned future cancels whichever POLL_ADD is
        current; every POLL_ADD future's outcome is retrieved."""
        try:
            return self._done(action())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return self._failed(exc)
        outer: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        current: list[asyncio.Future[Any]] = []

        def ready(inner: asyncio.Future[Any]) -> None:
            if inner.cancelled():
                if not outer.done():
                    outer.cancel()
                return
            failure = inner.exception()  # retrieved in every case
            if outer.done():
                return
            if failure is not None:
                outer.set_exception(failure)
                return
            try:
                outer.set_result(action())
            except (BlockingIOError, InterruptedError):
                try:
                    again = self._submit(
                        kind, sock, None, None, abi.IORING_OP_POLL_ADD, 0, 0, events
                    )
                except (OSError, RuntimeError) as exc:
                    outer.set_exception(exc)
                    return
                current[0] = again
                again.add_done_callback(ready)
            except OSError as exc:
                outer.set_exception(exc)

        first = self._submit(kind, sock, None, None, abi.IORING_OP_POLL_ADD, 0, 0, events)
        current.append(first)
        first.add_done_callback(ready)
        outer.add_done_callback(lambda f: f.cancelled() and current[0].cancel())
        return outer

    def recvfrom(self, sock: socket.socket, nbytes: int, flags: int = 0) -> asyncio.Future[Any]:
        return self._readiness("recv", sock, _POLLIN, lambda: sock.recvfrom(nbytes, flags))

    def recvfrom_into(
        self, sock: socket.socket, buf: Any, nbytes: int = 0, flags: int = 0
    ) -> asyncio.Future[Any]:
        return self._readiness(
            "recv", sock, _POLLIN, lambda: sock.recvfrom_into(buf, nbytes, flags)
        )

    def sendto(
        self, sock: socket.socket, buf: Any, flags: int = 0, addr: Any = None
    ) -> asyncio.Future[Any]:
        return self._readiness("send", sock, _POLLOUT, lambda: sock.sendto(buf, flags, addr))

    def _stop_serving(self, obj: socket.socket) -> None:
        """The loop closes this listening socket next: cancel the accepts on it first, and
        stop it listening now.  An accept the kernel holds keeps its own reference to the
        socket, so closing the descriptor alone leaves it listening (connections still
        completing the handshake into its backlog) until the ``ASYNC_CANCEL`` is submitted at
        the next ``io_uring_enter``; ``shutdown`` on a listening socket takes it out of the
        listening state at once, and new connections are refused."""
        for operation in list(self._ops.values()):
            if (
                isinstance(operation, _Operation)
                and operation.obj is obj
                and operation.kind == "accept"
            ):
                operation.future.cancel()
        try:
            obj.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening (ENOTCONN), or already closed

    def select(self, timeout: float | None = None) -> list[Any]:
        """One loop iteration's system call: submit everything queued, wait up to *timeout*
        for a completion, deliver every completion (direct handlers inline)."""
        ring = self._ring
        if ring is None:
            raise RuntimeError("UringProactor is closed")
        if self._cancels:
            self._flush_cancels()
        if self._unsubmitted:
            self._drop_closed()
        ring.enter(True, timeout)
        self._complete(ring.reap())
        return []

    def close(self) -> None:
        """Cancel everything in flight and wait (bounded) for the kernel to give it back;
        direct handlers get what arrives.  Then free the buffer rings and the ring, or, if
        the kernel kept some operations, abandon their memory for good."""
        ring = self._ring
        if ring is None:
            return
        self._closing = True
        for user_data, operation in list(self._ops.items()):
            if isinstance(operation, _Direct):
                self.cancel_direct(user_data)
            elif not operation.future.done():
                operation.future.cancel()
        deadline = time.monotonic() + 10
        while (self._ops or self._deferred) and time.monotonic() < deadline:
            self._flush_cancels()
            try:
                ring.enter(True, 0.1)
            except OSError:
                break  # e.g. closed from a thread that is not the ring's issuer
            self._complete(ring.reap())
        abandoned = bool(self._ops)
        if abandoned:
            # The kernel may still write into these buffers while it tears the ring down:
            # they must never be freed.
            _abandoned.extend(self._ops.values())
            self._ops.clear()
        for buffer_ring in list(ring.buffer_rings.values()):
            if abandoned:
                buffer_ring.abandon()
            else:
                try:
                    buffer_ring.close()
                except OSError:
                    pass  # close() abandoned it
        self._unsubmitted.clear()
        self._deferred.clear()
        ring.close()
        self._ring = None

    # -- introspection ----------------------------------------------------------------------

    def operations(self) -> list[UringOperation]:
        """The operations in flight, direct ones included (their ``future`` is None)."""
        listed = []
        for op in self._ops.values():
            if isinstance(op, _Direct):
                state = "cancelling" if op.cancelling else "pending"
                listed.append(UringOperation(None, op.obj, op.kind, op.nbytes, op.started, state))
            else:
                future = op.future
                if future.cancelled():
                    state = "cancelling"
                elif future.done():
                    state = "completing"
                else:
                    state = "pending"
                listed.append(UringOperation(future, op.obj, op.kind, op.nbytes, op.started, state))
        return listed

    @property
    def enter_calls(self) -> int:
        return self.ring.enter_calls

    # -- machinery --------------------------------------------------------------------------

    def _done(self, value: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        future.set_result(value)
        return future

    def _failed(self, exc: BaseException) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        future.set_exception(exc)
        return future

    def _make_room(self) -> None:
        """A full submission ring is handed to the kernel at once, mid-iteration."""
        ring = self.ring
        for _attempt in range(1000):
            if ring.space() >= 1:
                return
            if self._unsubmitted:
                self._drop_closed()
            ring.enter(False, None)
            self._mark_consumed()
            if ring.space() < 1:
                # The kernel took nothing (its completion backlog is full): make room there
                # by reaping; the completions are delivered at the next select().
                self._deferred.extend(ring.reap())
        raise OSError(errno.EBUSY, "io_uring: the kernel accepts no more submissions")

    def _submit(
        self,
        kind: str,
        obj: Any,
        nbytes: int | None,
        buffer: Any,
        opcode: int,
        addr: int,
        length: int,
        op_flags: int,
        finish: Callable[[int], Any] | None = None,
        off: int = 0,
    ) -> _UringFuture:
        ring = self._ring
        if ring is None or self._closing:
            raise RuntimeError("UringProactor is closed")
        fd = obj.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "the socket is closed")
        future = _UringFuture(loop=self._loop)
        user_data = self._next
        self._next += 1
        future._proactor = self
        future._user_data = user_data
        operation = _Operation(future, kind, obj, nbytes, buffer, finish)
        operation.opcode, operation.addr = opcode, addr
        operation.length, operation.op_flags, operation.off = length, op_flags, off
        if off:
            _SOCKLEN.from_buffer(buffer, _SOCKADDR_SIZE).value = _SOCKADDR_SIZE
        if self._cancels:
            self._flush_cancels()
        if ring.space() < 1:
            self._make_room()
        operation.slot = ring.push(
            opcode, fd, addr=addr, length=length, off=off, op_flags=op_flags, user_data=user_data
        )
        self._ops[user_data] = operation
        self._unsubmitted[user_data] = operation
        return future

    def _mark_consumed(self) -> None:
        """Forget, from the unsubmitted list, the SQEs the kernel has consumed."""
        unsubmitted = self._unsubmitted
        if not unsubmitted:
            return
        ring = self.ring
        if ring.pending() == 0:
            unsubmitted.clear()
            return
        consumed = []
        for user_data, operation in unsubmitted.items():
            if not ring.consumed(operation.slot):
                break  # this one (and every later one) is still in the ring
            consumed.append(user_data)
        for user_data in consumed:
            del unsubmitted[user_data]

    def _drop_closed(self) -> None:
        """Before an enter: an unsubmitted operation whose socket was closed must not reach
        the kernel (its descriptor number may name another socket by now).  Its SQE becomes
        a NOP and it fails with EBADF at the next delivery."""
        self._mark_consumed()
        closed = [
            user_data
            for user_data, operation in self._unsubmitted.items()
            if operation.obj.fileno() == -1
        ]
        for user_data in closed:
            operation = self._unsubmitted.pop(user_data)
            self.ring.neutralize(operation.slot, _OWN_TAG)
            self._deferred.append((user_data, -errno.EBADF, 0))

    def _send_rest(self, operation: _Operation, sent: int) -> None:
        """A stream SEND that took part of the bytes: submit the rest under a new tag."""
        operation.addr += sent
        operation.length -= sent
        fd = operation.obj.fileno()
        if fd < 0:
            operation.future.set_exception(OSError(errno.EBADF, "the socket was closed"))
            return
        self._resubmit(operation, fd)

    def _accept_again(self, operation: _Operation) -> bool:
        """An accept whose connection was gone: submit it again under a new tag, for the same
        future.  False when it cannot be (the listener is closed, the proactor closing)."""
        fd = operation.obj.fileno()
        if fd < 0 or self._closing:
            return False
        self.accepts_retried += 1
        _SOCKLEN.from_buffer(operation.buffer, _SOCKADDR_SIZE).value = _SOCKADDR_SIZE
        self._resubmit(operation, fd)
        return True

    def _resubmit(self, operation: _Operation, fd: int) -> None:
        """Queue *operation* again (its SQE as it now stands) under a new tag, same future."""
        user_data = self._next
        self._next += 1
        operation.future._user_data = user_data
        ring = self.ring
        if ring.space() < 1:
            self._make_room()
        operation.slot = ring.push(
            operation.opcode,
            fd,
            addr=operation.addr,
            length=operation.length,
            off=operation.off,
            op_flags=operation.op_flags,
            user_data=user_data,
        )
        self._ops[user_data] = operation
        self._unsubmitted[user_data] = operation

    def _cancel(self, user_data: int) -> None:
        """A future operation's cancellation (see the design note)."""
        operation = self._ops.get(user_data)
        ring = self._ring
        if operation is None or ring is None:
            return
        if not ring.consumed(operation.slot):
            # Never seen by the kernel: make its SQE a no-op; nothing will complete for it.
            ring.neutralize(operation.slot, _OWN_TAG)
            self._unsubmitted.pop(user_data, None)
            del self._ops[user_data]
            return
        self._cancels.append(user_data)

    def _flush_cancels(self) -> None:
        ring = self.ring
        while self._cancels:
            target = self._cancels.pop()
            if ring.space() < 1:
                self._make_room()
            ring.push(abi.IORING_OP_ASYNC_CANCEL, -1, addr=target, user_data=_OWN_TAG | target)

    def _complete(self, completions: list[tuple[int, int, int]]) -> None:
        """Deliver completions: direct handlers inline, futures resolved.  The hot path."""
        if self._deferred:
            completions = self._deferred + completions
            self._deferred = []
        self._mark_consumed()
        ops = self._ops
        remaining = iter(completions)
        try:
            for user_data, result, flags in remaining:
                operation = ops.get(user_data)
                if operation is None:
                    continue  # a cancel's outcome, a NOP, a forgotten operation
                handler = operation.handler
                if handler is not None:
                    if not flags & _F_MORE:
                        del ops[user_data]
                    try:
                        handler(result, flags)
                    except Exception as exc:
                        self._handler_failed(operation, exc)
                    continue
                del ops[user_data]
                self._complete_future(operation, result)  # type: ignore[arg-type]
        except BaseException:
            self._deferred[:0] = list(remaining)  # e.g. KeyboardInterrupt: deliver later
            raise
        if self._cancels:
            self._flush_cancels()

    def _handler_failed(self, operation: _Operation | _Direct, exc: Exception) -> None:
        context = {
            "message": f"io_uring completion handler for a {operation.kind} failed",
            "exception": exc,
            "socket": operation.obj,
        }
        if self._loop is not None:
            self._loop.call_exception_handler(context)
        else:
            raise exc

    def _complete_future(self, operation: _Operation, result: int) -> None:
        future = operation.future
        if future.done():
            if operation.kind == "accept" and result >= 0:
                os.close(result)  # accepted after the accept was cancelled
            return
        if result < 0:
            code = -result
            if code == errno.ECANCELED:
                future.cancel()
            elif not (
                operation.kind == "accept"
                and code in _ACCEPT_AGAIN
                and self._accept_again(operation)
            ):
                future.set_exception(_EXCEPTIONS.get(code, OSError)(code, os.strerror(code)))
            return
        if operation.opcode == abi.IORING_OP_SEND:
            if result < operation.length:
                self._send_rest(operation, result)  # complete only when all is sent
            else:
                future.set_result(operation.nbytes)
            return
        try:
            value = operation.finish(result) if operation.finish else result
        except OSError as exc:
            if not (
                operation.kind == "accept"
                and exc.errno in _ACCEPT_AGAIN
                and self._accept_again(operation)
            ):
                future.set_exception(exc)
        else:
            future.set_result(value)


class _AcceptedSocket(socket.socket):
    """An accepted connection, whose full shutdown succeeds when the peer has reset it.

    asyncio's proactor transports call ``shutdown(SHUT_RDWR)`` before closing their socket,
    unguarded.  Linux fails it with ENOTCONN for a connection the peer reset (Windows does
    not), and the exception skips the rest: the socket stays open, the loop's exception
    handler gets an error, and (3.12+) ``Server.wait_closed()`` waits for it for ever, for
    every client that resets.  A connection the peer reset has
    nothing left to shut down, so that one error is not raised; any other error, and any
    other kind of shutdown (``SHUT_WR`` for ``write_eof()``), is.
    """

    __slots__ = ()

    def shutdown(self, how: int) -> None:
        try:
            super().shutdown(how)
        except OSError as exc:
            if how != socket.SHUT_RDWR or exc.errno != errno.ENOTCONN:
                raise


def _peer_address(address: ctypes.Array[ctypes.c_char]) -> Any:
    """The peer address an ``ACCEPT`` wrote into *address*, as ``getpeername()`` gives it
    (``(host, port)``; ``(host, port, flowinfo, scope_id)`` for IPv6), or None for a family
    other than those two."""
    raw = address.raw
    length = int.from_bytes(raw[_SOCKADDR_SIZE : _SOCKADDR_SIZE + 4], sys.byteorder)
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and length >= 16:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and length >= 28:
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope_id = int.from_bytes(raw[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id
    return None
