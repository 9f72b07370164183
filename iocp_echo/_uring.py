"""The Linux backend: io_uring, driven from the standard library (``ctypes`` and ``mmap``).

The OS model.  io_uring is Linux's completion port.  The kernel and the program share two
rings in memory: the program writes submission entries (SQEs: "receive up to N bytes from
socket S into buffer B, and tag it with number U") into the submission ring, and one
``io_uring_enter`` system call hands all of them to the kernel; as operations finish, the
kernel writes completion entries (CQEs: "operation U finished with result R") into the
completion ring, where the program reaps them.  One ``io_uring_enter`` both submits every
queued operation and waits, with a timeout, for the next completion: that is this proactor's
``select()``, so an event-loop iteration costs one system call however many operations it
issues and completes.  As with IOCP, a buffer given to the kernel belongs to the kernel until
its completion is reaped, and a cancellation is itself an operation (``ASYNC_CANCEL``) whose
outcome arrives as a completion.

:class:`UringProactor` gives asyncio's ``BaseProactorEventLoop`` the interface CPython's
``IocpProactor`` gives it on Windows, so the stock proactor transports, ``sock_*`` methods and
iocp_echo's server run unchanged.  :class:`UringEventLoop` starts the self-pipe reader as
CPython's Windows loop does, so ``call_soon_threadsafe``, executors and Ctrl-C wake it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import socket
import struct
import time
from asyncio import proactor_events
from collections.abc import Callable
from typing import Any

from .errors import UnsupportedPlatformError

NAME = "io_uring (asyncio BaseProactorEventLoop)"

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427  # same on x86-64 and arm64
_ENTER_GETEVENTS, _ENTER_EXT_ARG = 1, 8
_FEAT_SINGLE_MMAP, _FEAT_NODROP, _FEAT_EXT_ARG = 1 << 0, 1 << 1, 1 << 8
_SETUP_CQSIZE, _SETUP_CLAMP = 1 << 3, 1 << 4
_SQ_CQ_OVERFLOW = 1 << 1
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000
_REGISTER_PROBE, _OP_SUPPORTED = 8, 1

OP_NOP, OP_POLL_ADD, OP_ACCEPT, OP_ASYNC_CANCEL = 0, 6, 13, 14
OP_SEND, OP_RECV = 26, 27
_OPS_USED = {
    "NOP": OP_NOP,
    "POLL_ADD": OP_POLL_ADD,
    "ACCEPT": OP_ACCEPT,
    "ASYNC_CANCEL": OP_ASYNC_CANCEL,
    "SEND": OP_SEND,
    "RECV": OP_RECV,
}

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe, 16 bytes
_POLLIN, _POLLOUT = 0x001, 0x004
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)  # a plain int: IntFlag arithmetic is slow
_CANCEL_TAG = 1 << 63  # user_data of our ASYNC_CANCEL operations

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        # struct io_sqring_offsets
        ("sq_head", ctypes.c_uint32),
        ("sq_tail", ctypes.c_uint32),
        ("sq_ring_mask", ctypes.c_uint32),
        ("sq_ring_entries", ctypes.c_uint32),
        ("sq_flags", ctypes.c_uint32),
        ("sq_dropped", ctypes.c_uint32),
        ("sq_array", ctypes.c_uint32),
        ("sq_resv1", ctypes.c_uint32),
        ("sq_user_addr", ctypes.c_uint64),
        # struct io_cqring_offsets
        ("cq_head", ctypes.c_uint32),
        ("cq_tail", ctypes.c_uint32),
        ("cq_ring_mask", ctypes.c_uint32),
        ("cq_ring_entries", ctypes.c_uint32),
        ("cq_overflow", ctypes.c_uint32),
        ("cq_cqes", ctypes.c_uint32),
        ("cq_flags", ctypes.c_uint32),
        ("cq_resv1", ctypes.c_uint32),
        ("cq_user_addr", ctypes.c_uint64),
    ]


class _GeteventsArg(ctypes.Structure):
    _fields_ = [
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


def _raw_syscall(number: int, *args: int) -> int:
    """``syscall(2)`` with every argument passed as a C long (pointers as addresses)."""
    return int(_libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))


def _syscall(number: int, *args: int) -> int:
    result = _raw_syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def probe(entries: int = 8) -> None:
    """Check that io_uring works here with every feature and opcode this backend uses.

    Raises :class:`UnsupportedPlatformError` saying exactly what is missing: the syscall
    (kernel too old, or ``kernel.io_uring_disabled``, or a seccomp filter returning EPERM),
    a feature, or an opcode.
    """
    try:
        ring = _Ring(entries)
    except OSError as exc:
        reason = {
            errno.ENOSYS: "the kernel has no io_uring (needs Linux 5.11 or later)",
            errno.EPERM: "io_uring is forbidden here (sysctl kernel.io_uring_disabled, or a "
            "seccomp filter such as a container runtime's default profile)",
            errno.EACCES: "io_uring is restricted to a group this user is not in "
            "(kernel.io_uring_group)",
        }.get(exc.errno or 0, f"io_uring_setup failed: {exc}")
        raise UnsupportedPlatformError(
            f"iocp_echo's Linux backend cannot start: {reason}. Run it on Windows, or under "
            "Wine with Windows CPython: python tools/winpy.py --python 3.13 examples/echo.py"
        ) from None
    try:
        ring.check_capabilities()
    finally:
        ring.close()


class _Ring:
    """The two shared rings and the system calls around them; no asyncio here."""

    def __init__(self, entries: int) -> None:
        params = _Params()
        params.flags = _SETUP_CQSIZE | _SETUP_CLAMP
        params.cq_entries = entries * 4
        self.fd = _syscall(_SYS_SETUP, entries, ctypes.addressof(params))
        self.params = params
        try:
            size_sq = params.sq_array + params.sq_entries * 4
            size_cq = params.cq_cqes + params.cq_entries * _CQE.size
            if params.features & _FEAT_SINGLE_MMAP:
                size_sq = size_cq = max(size_sq, size_cq)
            self._sq_map = mmap.mmap(self.fd, size_sq, offset=_OFF_SQ_RING)
            self._cq_map = (
                self._sq_map
                if params.features & _FEAT_SINGLE_MMAP
                else mmap.mmap(self.fd, size_cq, offset=0x8000000)
            )
            self._sqes = mmap.mmap(self.fd, params.sq_entries * _SQE.size, offset=_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        u32 = ctypes.c_uint32
        self._sq_head = u32.from_buffer(self._sq_map, params.sq_head)
        self._sq_tail = u32.from_buffer(self._sq_map, params.sq_tail)
        self._sq_flags = u32.from_buffer(self._sq_map, params.sq_flags)
        self._sq_mask = u32.from_buffer(self._sq_map, params.sq_ring_mask).value
        self.sq_entries = params.sq_entries
        self._cq_head = u32.from_buffer(self._cq_map, params.cq_head)
        self._cq_tail = u32.from_buffer(self._cq_map, params.cq_tail)
        self._cq_mask = u32.from_buffer(self._cq_map, params.cq_ring_mask).value
        self._cq_base = params.cq_cqes
        # Identity-map the index array once: slot i of the ring always names SQE i.
        array = (u32 * params.sq_entries).from_buffer(self._sq_map, params.sq_array)
        for index in range(params.sq_entries):
            array[index] = index
        del array
        self._tail = self._sq_tail.value  # our private tail, published by submit()
        self._arg = _GeteventsArg()
        self._ts = _Timespec()
        self.enter_calls = 0

    def check_capabilities(self) -> None:
        features = self.params.features
        missing = [
            name
            for name, bit in (("NODROP", _FEAT_NODROP), ("EXT_ARG", _FEAT_EXT_ARG))
            if not features & bit
        ]
        if missing:
            raise UnsupportedPlatformError(
                f"iocp_echo's Linux backend needs io_uring features {', '.join(missing)} "
                "(Linux 5.11 or later); this kernel lacks them"
            )
        count = 64
        buffer = ctypes.create_string_buffer(16 + 8 * count)
        _syscall(_SYS_REGISTER, self.fd, _REGISTER_PROBE, ctypes.addressof(buffer), count)
        last_op = buffer.raw[0]
        supported = {
            op
            for op in range(min(last_op + 1, count))
            if buffer.raw[16 + 8 * op + 2] & _OP_SUPPORTED
        }
        absent = [name for name, op in _OPS_USED.items() if op not in supported]
        if absent:
            raise UnsupportedPlatformError(
                f"iocp_echo's Linux backend needs io_uring operations {', '.join(absent)}; "
                "this kernel does not offer them (Linux 5.11 or later has them all)"
            )

    def space(self) -> int:
        return int(self.sq_entries - (self._tail - self._sq_head.value) % (1 << 32))

    def head(self) -> int:
        """How far the kernel has consumed the submission ring (a free-running counter)."""
        return int(self._sq_head.value)

    def push(
        self,
        opcode: int,
        fd: int,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        user_data: int = 0,
    ) -> int:
        """Write one SQE; the caller made sure there is space.  Returns its position (a
        free-running counter, compared with :meth:`head` to know when the kernel took it)."""
        position = self._tail
        slot = position & self._sq_mask
        _SQE.pack_into(
            self._sqes,
            slot * _SQE.size,
            opcode,
            0,
            0,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            0,
            0,
            0,
            0,
            0,
        )
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        return position

    def neutralize(self, position: int) -> None:
        """Turn a written, not yet submitted SQE into a NOP (its socket may be closing)."""
        slot = position & self._sq_mask
        _SQE.pack_into(
            self._sqes, slot * _SQE.size, OP_NOP, 0, 0, -1, 0, 0, 0, 0, _CANCEL_TAG, 0, 0, 0, 0, 0
        )

    def enter(self, wait: bool, timeout: float | None) -> None:
        """Submit everything queued and, if *wait*, wait for a completion or *timeout*."""
        self._sq_tail.value = self._tail  # publish (x86-64/arm64: the syscall orders it)
        # Everything the kernel has not consumed yet, including any it left last time.
        to_submit = (self._tail - self._sq_head.value) & 0xFFFFFFFF
        flags, arg, arg_size = 0, 0, 0
        if wait:
            flags |= _ENTER_GETEVENTS
            if timeout is not None:
                flags |= _ENTER_EXT_ARG
                self._ts.tv_sec = int(timeout)
                self._ts.tv_nsec = int((timeout - int(timeout)) * 1e9)
                self._arg.ts = ctypes.addressof(self._ts)
                arg, arg_size = ctypes.addressof(self._arg), ctypes.sizeof(self._arg)
        while True:
            self.enter_calls += 1
            result = _raw_syscall(
                _SYS_ENTER, self.fd, to_submit, 1 if wait else 0, flags, arg, arg_size
            )
            if result >= 0:
                return  # anything not consumed (a full completion backlog) goes next time
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue  # a signal (e.g. Ctrl-C): the loop's self-pipe will tell
            if code in (errno.ETIME, errno.EAGAIN, errno.EBUSY):
                return  # timed out, or completions must be reaped before more can go in
            raise OSError(code, f"io_uring_enter: {os.strerror(code)}")

    def reap(self) -> list[tuple[int, int]]:
        """Take every completion from the ring: ``(user_data, result)`` pairs."""
        completions = []
        while True:
            head, tail = self._cq_head.value, self._cq_tail.value
            while head != tail:
                offset = self._cq_base + (head & self._cq_mask) * _CQE.size
                user_data, result, _flags = _CQE.unpack_from(self._cq_map, offset)
                completions.append((user_data, result))
                head = (head + 1) & 0xFFFFFFFF
            self._cq_head.value = head
            if not self._sq_flags.value & _SQ_CQ_OVERFLOW:
                return completions
            # The kernel kept completions that did not fit (FEAT_NODROP): flush them in.
            _raw_syscall(_SYS_ENTER, self.fd, 0, 0, _ENTER_GETEVENTS, 0, 0)

    def close(self) -> None:
        del self._sq_head, self._sq_tail, self._sq_flags, self._cq_head, self._cq_tail
        for area in {id(m): m for m in (self._sq_map, self._cq_map, self._sqes)}.values():
            area.close()
        os.close(self.fd)


class _UringFuture(asyncio.Future[Any]):
    """A future whose cancellation cancels the kernel operation (like ``_OverlappedFuture``)."""

    _proactor: UringProactor | None
    _user_data: int

    def cancel(self, msg: Any = None) -> bool:
        if not self.done() and self._proactor is not None:
            self._proactor._cancel(self._user_data)
        return super().cancel(msg=msg)


class _Operation:
    __slots__ = (
        "addr",
        "buffer",
        "finish",
        "future",
        "kind",
        "length",
        "nbytes",
        "obj",
        "op_flags",
        "opcode",
        "slot",
        "started",
        "submitted",
    )
    opcode: int
    addr: int
    length: int
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
        self.kind = kind
        self.obj = obj  # the socket: kept alive while the kernel works on it
        self.nbytes = nbytes
        self.buffer = buffer  # owned by the kernel until the completion is reaped
        self.finish = finish
        self.started = time.monotonic()
        self.slot = -1
        self.submitted = False


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


#: Operations the kernel never returned before their ring closed (kept alive for good).
_abandoned: list[_Operation] = []


class UringProactor:
    """The proactor ``BaseProactorEventLoop`` needs, on io_uring."""

    def __init__(self, entries: int = 4096) -> None:
        self._ring = _Ring(entries)
        self._ring.check_capabilities()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: dict[int, _Operation] = {}
        self._unsubmitted: dict[int, _Operation] = {}
        self._cancels: list[int] = []
        self._deferred: list[tuple[int, int]] = []
        self._next = 1
        self._stopped_serving: set[int] = set()

    def __repr__(self) -> str:
        state = "closed" if self._ring is None else f"in-flight#={len(self._ops)}"
        return f"<UringProactor {state}>"

    def set_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- the interface BaseProactorEventLoop uses -----------------------------------------

    def recv(self, conn: socket.socket, nbytes: int, flags: int = 0) -> asyncio.Future[Any]:
        buffer = ctypes.create_string_buffer(nbytes)
        return self._submit(
            "recv",
            conn,
            nbytes,
            buffer,
            OP_RECV,
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
            OP_RECV,
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
            "send", conn, size, anchor, OP_SEND, address, size, flags | _MSG_NOSIGNAL
        )

    def accept(self, listener: socket.socket) -> asyncio.Future[Any]:
        def finish(fd: int) -> tuple[socket.socket, Any]:
            conn = socket.socket(listener.family, socket.SOCK_STREAM, fileno=fd)
            conn.setblocking(False)  # as the fd already is (SOCK_NONBLOCK): tell Python
            try:
                return conn, conn.getpeername()
            except OSError:
                conn.close()
                raise

        flags = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        return self._submit("accept", listener, 0, None, OP_ACCEPT, 0, 0, flags, finish=finish)

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

        return self._submit("connect", conn, None, None, OP_POLL_ADD, 0, 0, _POLLOUT, finish=finish)

    def sendfile(self, sock: Any, file: Any, offset: int, count: int) -> asyncio.Future[Any]:
        # asyncio falls back to reading and sending when the proactor says so.
        raise asyncio.exceptions.SendfileNotAvailableError("io_uring sendfile is not offered")

    def _readiness(
        self, kind: str, sock: socket.socket, events: int, action: Callable[[], Any]
    ) -> asyncio.Future[Any]:
        """Datagram calls: a POLL_ADD completion, then the non-blocking call."""
        try:
            return self._done(action())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return self._failed(exc)
        outer: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]

        def ready(inner: asyncio.Future[Any]) -> None:
            if outer.done():
                return
            if inner.cancelled():
                outer.cancel()
                return
            try:
                outer.set_result(action())
            except (BlockingIOError, InterruptedError):
                again = self._submit(kind, sock, None, None, OP_POLL_ADD, 0, 0, events)
                again.add_done_callback(ready)
            except OSError as exc:
                outer.set_exception(exc)

        first = self._submit(kind, sock, None, None, OP_POLL_ADD, 0, 0, events)
        first.add_done_callback(ready)
        outer.add_done_callback(lambda f: f.cancelled() and first.cancel())
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
        """The loop closes this listening socket next: cancel the accepts on it first."""
        for operation in list(self._ops.values()):
            if operation.obj is obj and operation.kind == "accept":
                operation.future.cancel()

    def select(self, timeout: float | None = None) -> list[Any]:
        ring = self._ring
        ring.enter(wait=True, timeout=timeout)
        self._complete(ring.reap())
        return []

    def close(self) -> None:
        """Cancel everything in flight and wait (bounded) for the kernel to give it back."""
        if self._ring is None:
            return
        for operation in list(self._ops.values()):
            if not operation.future.done():
                operation.future.cancel()
        deadline = time.monotonic() + 10
        while self._ops and time.monotonic() < deadline:
            self._flush_cancels()
            self._ring.enter(wait=True, timeout=0.1)
            self._complete(self._ring.reap())
        if self._ops:
            # The kernel may still write into these buffers while it tears the ring down:
            # they must never be freed.
            _abandoned.extend(self._ops.values())
            self._ops.clear()
        self._ring.close()
        self._ring = None  # type: ignore[assignment]

    # -- introspection ----------------------------------------------------------------------

    def operations(self) -> list[tuple[asyncio.Future[Any], Any, str, int | None, float]]:
        """The operations in flight: ``(future, socket, kind, nbytes, started)``."""
        return [(op.future, op.obj, op.kind, op.nbytes, op.started) for op in self._ops.values()]

    @property
    def enter_calls(self) -> int:
        return self._ring.enter_calls

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
        ring = self._ring
        for _attempt in range(1000):
            if ring.space() >= 1:
                return
            ring.enter(wait=False, timeout=None)
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
    ) -> _UringFuture:
        if self._ring is None:
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
        operation.length, operation.op_flags = length, op_flags
        self._flush_cancels()
        self._make_room()
        operation.slot = self._ring.push(opcode, fd, addr, length, 0, op_flags, user_data)
        self._ops[user_data] = operation
        self._unsubmitted[user_data] = operation
        return future

    def _mark_consumed(self) -> None:
        """Operations whose SQE the kernel has taken can no longer be made NOPs."""
        head = self._ring.head()
        while self._unsubmitted:
            user_data, operation = next(iter(self._unsubmitted.items()))
            if not 0 < (head - operation.slot) & 0xFFFFFFFF <= 1 << 31:
                return  # this one (and every later one) is still in the ring
            operation.submitted = True
            del self._unsubmitted[user_data]

    def _send_rest(self, operation: _Operation, sent: int) -> None:
        """A stream SEND that took part of the bytes: submit the rest under a new tag."""
        operation.addr += sent
        operation.length -= sent
        fd = operation.obj.fileno()
        if fd < 0:
            operation.future.set_exception(OSError(errno.EBADF, "the socket was closed"))
            return
        user_data = self._next
        self._next += 1
        operation.future._user_data = user_data
        operation.submitted = False
        self._make_room()
        operation.slot = self._ring.push(
            OP_SEND, fd, operation.addr, operation.length, 0, operation.op_flags, user_data
        )
        self._ops[user_data] = operation
        self._unsubmitted[user_data] = operation

    def _cancel(self, user_data: int) -> None:
        operation = self._ops.get(user_data)
        if operation is None:
            return
        if not operation.submitted and user_data in self._unsubmitted:
            # Never seen by the kernel: make its SQE a no-op; nothing will complete for it.
            self._ring.neutralize(operation.slot)
            del self._unsubmitted[user_data]
            self._finish_operation(user_data)
            return
        self._cancels.append(user_data)

    def _flush_cancels(self) -> None:
        while self._cancels:
            target = self._cancels.pop()
            self._make_room()
            self._ring.push(OP_ASYNC_CANCEL, -1, target, 0, 0, 0, _CANCEL_TAG | target)

    def _finish_operation(self, user_data: int) -> _Operation | None:
        # Popped from the table, the operation (and the buffer it pins) lives on only while
        # the caller holds it: a partial send resubmits it with the same buffer.
        return self._ops.pop(user_data, None)

    def _complete(self, completions: list[tuple[int, int]]) -> None:
        if self._deferred:
            completions = self._deferred + completions
            self._deferred = []
        self._mark_consumed()
        self._flush_cancels()
        for user_data, result in completions:
            if user_data & _CANCEL_TAG:
                continue  # the outcome of a cancel; its target completes on its own
            finished = self._finish_operation(user_data)
            if finished is None:
                continue
            operation = finished
            future = operation.future
            if future.done():
                if operation.kind == "accept" and result >= 0:
                    os.close(result)  # accepted after the accept was cancelled
                continue
            if result < 0:
                code = -result
                if code == errno.ECANCELED:
                    future.cancel()
                else:
                    exc_type = {
                        errno.ECONNRESET: ConnectionResetError,
                        errno.EPIPE: BrokenPipeError,
                        errno.ECONNABORTED: ConnectionAbortedError,
                    }.get(code, OSError)
                    future.set_exception(exc_type(code, os.strerror(code)))
                continue
            if operation.opcode == OP_SEND and result < operation.length:
                self._send_rest(operation, result)  # complete only when all is sent
                continue
            if operation.opcode == OP_SEND:
                future.set_result(operation.nbytes)
                continue
            try:
                value = operation.finish(result) if operation.finish else result
            except OSError as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)


class UringEventLoop(proactor_events.BaseProactorEventLoop):
    """asyncio's proactor event loop on io_uring."""

    def __init__(self, proactor: UringProactor | None = None) -> None:
        super().__init__(proactor if proactor is not None else UringProactor())

    if hasattr(asyncio.BaseEventLoop, "_run_forever_setup"):  # 3.13+

        def _run_forever_setup(self) -> None:
            assert self._self_reading_future is None  # type: ignore[has-type]
            self.call_soon(self._loop_self_reading)  # type: ignore[attr-defined]
            super()._run_forever_setup()  # type: ignore[misc]

        def _run_forever_cleanup(self) -> None:
            super()._run_forever_cleanup()  # type: ignore[misc]
            self._stop_self_reading()

    else:

        def run_forever(self) -> None:
            try:
                assert self._self_reading_future is None  # type: ignore[has-type]
                self.call_soon(self._loop_self_reading)  # type: ignore[attr-defined]
                super().run_forever()
            finally:
                self._stop_self_reading()

    def _stop_self_reading(self) -> None:
        future = self._self_reading_future  # type: ignore[has-type]
        if future is not None:
            future.cancel()
            self._self_reading_future = None


# -- the backend interface (see _platform.Backend) --------------------------------------------

TRANSIENT_ACCEPT_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ENOTCONN,
        errno.ECONNRESET,
    }
)


def new_event_loop() -> asyncio.AbstractEventLoop:
    return UringEventLoop()


def prepare_listener(sock: socket.socket) -> None:
    """POSIX servers set SO_REUSEADDR so a restart is not refused by TIME_WAIT connections."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def is_transient_accept_error(exc: OSError) -> bool:
    return isinstance(exc, ConnectionError) or exc.errno in TRANSIENT_ACCEPT_ERRORS


def accept(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> asyncio.Future[tuple[socket.socket, Any]]:
    return loop._proactor.accept(listener)  # type: ignore[attr-defined,no-any-return]


def operations(
    loop: asyncio.AbstractEventLoop,
) -> list[tuple[Any, Any, str | None, int | None, float | None, str]]:
    proactor = getattr(loop, "_proactor", None)
    if not isinstance(proactor, UringProactor):
        raise LookupError(f"{type(loop).__name__} does not run on the io_uring proactor")
    self_pipe = getattr(loop, "_ssock", None)
    return [
        (future, obj, "wakeup" if obj is self_pipe else kind, nbytes, started, "")
        for future, obj, kind, nbytes, started in proactor.operations()
    ]
