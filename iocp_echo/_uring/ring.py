"""One io_uring instance: the set-up, the three shared memory areas, submitting and reaping.

No asyncio here.  :class:`Ring` owns the ring's descriptor and maps; it writes SQEs at a private
tail, publishes them and calls ``io_uring_enter``, and reaps CQEs as ``(user_data, res, flags)``
tuples.  It decides nothing about what an operation means: that is :mod:`.proactor`'s job.
:class:`BufferRing` is a ring of provided buffers (kernel 5.19+) from which the kernel picks a
buffer when a receive completes, so that an idle connection holds no buffer of its own.

Set-up modes, tried in order until the kernel accepts one (older kernels answer EINVAL to flags
they do not know):

``"defer_taskrun"`` (6.1+)
    ``IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED``.  The
    kernel finishes completions only when the issuing thread calls ``io_uring_enter`` with
    ``IORING_ENTER_GETEVENTS``: no interrupt of the running thread, completions batched.  A
    single-issuer ring belongs to the thread that first submits to it, and an event loop may be
    created in one thread and run in another, so the ring starts disabled and is enabled by the
    first :meth:`Ring.enter` (``IORING_REGISTER_ENABLE_RINGS``), from the thread that runs the
    loop.  Every other thread's ``io_uring_enter`` then fails with EEXIST.
``"coop_taskrun"`` (5.19+)
    ``IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG``: completion work waits for the
    thread's next entry into the kernel instead of interrupting it.
``"plain"``
    No flags: the kernel interrupts the thread to finish completions.

All three add ``IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP``: a completion ring four times the
submission ring, clamped to the kernel's maximum.  In every mode :meth:`Ring.enter` passes
``IORING_ENTER_GETEVENTS`` (with ``min_complete`` 0 when not waiting), so that an enter always
lets the kernel post what has finished.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterable
from typing import Final, NoReturn

from ..errors import BufferOwnershipError
from . import abi

__all__ = [
    "DEFAULT_SETUP_MODES",
    "IN_KERNEL",
    "SETUP_MODES",
    "BufferRing",
    "Ring",
]

SETUP_MODES: Final[dict[str, int]] = {
    "defer_taskrun": abi.IORING_SETUP_SINGLE_ISSUER
    | abi.IORING_SETUP_DEFER_TASKRUN
    | abi.IORING_SETUP_R_DISABLED,
    "coop_taskrun": abi.IORING_SETUP_COOP_TASKRUN | abi.IORING_SETUP_TASKRUN_FLAG,
    "plain": 0,
}
DEFAULT_SETUP_MODES: Final = ("defer_taskrun", "coop_taskrun", "plain")

_MASK32: Final = 0xFFFFFFFF
_HALF: Final = 1 << 31
_Timespec = abi.__kernel_timespec  # (bound here: inside a class body the name would mangle)

#: Buffer rings whose memory the kernel might still write when they were let go (their ring was
#: closed with operations outstanding): kept alive for the life of the process, never unmapped.
_abandoned: list[object] = []


#: A provided buffer's state in :attr:`BufferRing.states` while the kernel may pick it.  Any
#: other value means the program holds it (what each value means is the user's business).
IN_KERNEL: Final = 0


def _fail(what: str, code: int | None = None) -> NoReturn:
    code = ctypes.get_errno() if code is None else code
    raise OSError(code, f"{what}: {os.strerror(code)}")


def _address(area: mmap.mmap) -> int:
    """The address of an mmap's memory (the temporary ctypes view is released at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


class Ring:
    """An io_uring instance: ``io_uring_setup``, the mmaps, ``io_uring_enter``, reaping.

    Submission positions are free-running 32-bit counters: :meth:`push` returns the position it
    wrote, and the kernel has consumed that SQE once its head (:meth:`head`) is past it
    (:meth:`consumed`).  Nothing is visible to the kernel until :meth:`enter` publishes the
    tail, so an SQE written but not yet entered can still be rewritten (:meth:`neutralize`).
    """

    def __init__(self, entries: int, *, setup_modes: Iterable[str] | None = None) -> None:
        modes = tuple(DEFAULT_SETUP_MODES if setup_modes is None else setup_modes)
        unknown = [mode for mode in modes if mode not in SETUP_MODES]
        if unknown or not modes:
            raise ValueError(f"setup_modes must be taken from {list(SETUP_MODES)}: {modes!r}")
        base = abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_CLAMP
        for index, mode in enumerate(modes):
            params = abi.io_uring_params()
            params.flags = base | SETUP_MODES[mode]
            params.cq_entries = entries * 4
            fd = abi.io_uring_setup(entries, ctypes.addressof(params))
            if fd >= 0:
                break
            code = ctypes.get_errno()
            if code != errno.EINVAL or index == len(modes) - 1:
                _fail(f"io_uring_setup ({', '.join(modes[: index + 1])})", code)
        self.fd: int = fd
        self.setup_mode: str = mode
        self.params = params
        self.features: int = params.features
        self.sq_entries: int = params.sq_entries
        self.cq_entries: int = params.cq_entries
        self.enter_calls = 0
        #: Buffer rings registered on this ring, by group id (see :class:`BufferRing`).
        self.buffer_rings: dict[int, BufferRing] = {}
        #: The thread that enabled a disabled (single-issuer) ring; None until then.
        self.issuer: int | None = None
        self._enabled = not params.flags & abi.IORING_SETUP_R_DISABLED
        self._opcodes: set[int] | None = None
        self._closed = False
        try:
            self._map(params)
        except BaseException:
            os.close(fd)
            raise
        self._arg = abi.io_uring_getevents_arg()
        self._ts = _Timespec()
        self._arg.ts = ctypes.addressof(self._ts)
        self._arg_address = ctypes.addressof(self._arg)
        self._arg_size = ctypes.sizeof(self._arg)
        self._enter = abi.io_uring_enter  # looked up once (tests may replace it before)
        self._pack = abi.SQE.pack_into
        self._iter_cqes = abi.CQE.iter_unpack

    def _map(self, params: abi.io_uring_params) -> None:
        sq, cq = params.sq_off, params.cq_off
        size_sq = sq.array + params.sq_entries * 4
        size_cq = cq.cqes + params.cq_entries * abi.CQE.size
        single = bool(params.features & abi.IORING_FEAT_SINGLE_MMAP)
        if single:
            size_sq = size_cq = max(size_sq, size_cq)
        self._sq_map = mmap.mmap(self.fd, size_sq, offset=abi.IORING_OFF_SQ_RING)
        self._cq_map = (
            self._sq_map if single else mmap.mmap(self.fd, size_cq, offset=abi.IORING_OFF_CQ_RING)
        )
        self._sqes = mmap.mmap(
            self.fd, params.sq_entries * abi.SQE.size, offset=abi.IORING_OFF_SQES
        )
        u32 = ctypes.c_uint32
        self._sq_head = u32.from_buffer(self._sq_map, sq.head)
        self._sq_tail = u32.from_buffer(self._sq_map, sq.tail)
        self._sq_flags = u32.from_buffer(self._sq_map, sq.flags)
        self._sq_mask: int = u32.from_buffer(self._sq_map, sq.ring_mask).value
        self._cq_head = u32.from_buffer(self._cq_map, cq.head)
        self._cq_tail = u32.from_buffer(self._cq_map, cq.tail)
        self._cq_mask: int = u32.from_buffer(self._cq_map, cq.ring_mask).value
        self._cq_base: int = cq.cqes
        # Identity-map the index array once: slot i of the ring always names SQE i.
        array = (u32 * params.sq_entries).from_buffer(self._sq_map, sq.array)
        for index in range(params.sq_entries):
            array[index] = index
        del array
        self._tail: int = self._sq_tail.value  # private; published by enter()

    # -- facts ------------------------------------------------------------------------------

    def probe_opcodes(self) -> set[int]:
        """The opcodes this kernel supports (``IORING_REGISTER_PROBE``), asked once."""
        if self._opcodes is None:
            count = 256
            buffer = ctypes.create_string_buffer(
                ctypes.sizeof(abi.io_uring_probe) + count * ctypes.sizeof(abi.io_uring_probe_op)
            )
            if (
                abi.io_uring_register(
                    self.fd, abi.IORING_REGISTER_PROBE, ctypes.addressof(buffer), count
                )
                < 0
            ):
                _fail("io_uring_register(IORING_REGISTER_PROBE)")
            header = abi.io_uring_probe.from_buffer(buffer)
            ops = (abi.io_uring_probe_op * count).from_buffer(
                buffer, ctypes.sizeof(abi.io_uring_probe)
            )
            self._opcodes = {
                ops[i].op
                for i in range(min(header.ops_len, count))
                if ops[i].flags & abi.IO_URING_OP_SUPPORTED
            }
            del header, ops
        return set(self._opcodes)

    def space(self) -> int:
        """Free submission slots (those the kernel has consumed count as free)."""
        return self.sq_entries - ((self._tail - self._sq_head.value) & _MASK32)

    def head(self) -> int:
        """How far the kernel has consumed the submission ring (a free-running counter)."""
        return self._sq_head.value

    def pending(self) -> int:
        """SQEs written and not yet consumed by the kernel."""
        return (self._tail - self._sq_head.value) & _MASK32

    def consumed(self, position: int) -> bool:
        """Has the kernel taken the SQE written at *position*?  Read from the kernel's head
        now, so the answer holds whatever happened since (e.g. an interrupted enter)."""
        return 0 < ((self._sq_head.value - position) & _MASK32) <= _HALF

    # -- submitting -------------------------------------------------------------------------

    def push(
        self,
        opcode: int,
        fd: int,
        *,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        op_flags: int = 0,
        user_data: int = 0,
        flags: int = 0,
        ioprio: int = 0,
        buf_group: int = 0,
    ) -> int:
        """Write one SQE (the caller made sure :meth:`space` allows it) and return its
        position.  ``op_flags`` is the opcode's flags word (``msg_flags``, ``accept_flags``,
        ``poll32_events``...), ``flags`` the ``IOSQE_*`` bits, ``buf_group`` the provided-buffer
        group (with ``IOSQE_BUFFER_SELECT``)."""
        position = self._tail
        # The same fields, in the same order, as abi.write_sqe (see abi.SQE_FIELDS), packed
        # here directly to save a call per SQE.
        self._pack(
            self._sqes,
            (position & self._sq_mask) << 6,
            opcode,
            flags,
            ioprio,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            buf_group,  # buf_index / buf_group
            0,  # personality
            0,  # splice_fd_in
            0,  # addr3
            0,  # __pad2
        )
        self._tail = (position + 1) & _MASK32
        return position

    def neutralize(self, position: int, user_data: int = 0) -> None:
        """Turn a written, not yet consumed SQE into a NOP tagged *user_data* (the caller
        checked :meth:`consumed`): its socket may be closing, its buffer about to be freed."""
        abi.write_sqe(
            self._sqes,
            (position & self._sq_mask) * abi.SQE.size,
            opcode=abi.IORING_OP_NOP,
            fd=-1,
            user_data=user_data,
        )

    def enter(self, wait: bool, timeout: float | None) -> None:
        """Submit everything written and let the kernel post completions; if *wait*, wait
        for one completion or *timeout* seconds (None: no limit).

        EINTR is retried; ETIME (the timeout), EAGAIN and EBUSY (the kernel wants completions
        reaped first) return: whatever the kernel did not take stays written, for next time.
        """
        if not self._enabled:
            self._enable()
        tail = self._tail
        self._sq_tail.value = tail  # publish (the kernel reads it in this thread's syscall)
        if wait and timeout != 0:
            min_complete = 1
            if timeout is None:
                flags, arg, size = abi.IORING_ENTER_GETEVENTS, 0, 0
            else:
                flags = abi.IORING_ENTER_GETEVENTS | abi.IORING_ENTER_EXT_ARG
                seconds = int(timeout)
                self._ts.tv_sec = seconds
                self._ts.tv_nsec = int((timeout - seconds) * 1e9)
                arg, size = self._arg_address, self._arg_size
        else:
            min_complete, flags, arg, size = 0, abi.IORING_ENTER_GETEVENTS, 0, 0
        sq_head = self._sq_head
        while True:
            self.enter_calls += 1
            to_submit = (tail - sq_head.value) & _MASK32
            if self._enter(self.fd, to_submit, min_complete, flags, arg, size) >= 0:
                return
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue  # a signal (e.g. Ctrl-C): the loop's self-pipe will tell
            if code in (errno.ETIME, errno.EAGAIN, errno.EBUSY):
                return
            if code == errno.EEXIST:
                _fail(
                    "io_uring_enter: this single-issuer ring belongs to the thread that first "
                    "ran it; use the event loop from that thread",
                    code,
                )
            _fail("io_uring_enter", code)

    def _enable(self) -> None:
        """Enable a ring made with IORING_SETUP_R_DISABLED: this thread becomes its issuer."""
        if abi.io_uring_register(self.fd, abi.IORING_REGISTER_ENABLE_RINGS, 0, 0) < 0:
            _fail("io_uring_register(IORING_REGISTER_ENABLE_RINGS)")
        self._enabled = True
        self.issuer = threading.get_ident()

    # -- reaping ----------------------------------------------------------------------------

    def reap(self) -> list[tuple[int, int, int]]:
        """Take every completion from the ring: ``(user_data, res, flags)`` tuples.

        Memory order (see the proactor's design note): the tail is read first, the CQEs are
        copied out (one bytes slice per contiguous run), and only then is the head stored,
        which gives their slots back to the kernel.
        """
        completions: list[tuple[int, int, int]] = []
        cq_head = self._cq_head
        area, base = self._cq_map, self._cq_base
        while True:
            head = cq_head.value
            count = (self._cq_tail.value - head) & _MASK32
            if count:
                start = head & self._cq_mask
                first = min(count, self._cq_mask + 1 - start)
                completions += self._iter_cqes(
                    area[base + start * 16 : base + (start + first) * 16]
                )
                if first < count:
                    completions += self._iter_cqes(area[base : base + (count - first) * 16])
                cq_head.value = (head + count) & _MASK32
            if not self._sq_flags.value & abi.IORING_SQ_CQ_OVERFLOW:
                return completions
            # The kernel kept completions that did not fit (FEAT_NODROP): flush them in.
            flushed = self._enter(self.fd, 0, 0, abi.IORING_ENTER_GETEVENTS, 0, 0)
            if flushed < 0 or (self._cq_tail.value - cq_head.value) & _MASK32 == 0:
                return completions  # e.g. EEXIST (another thread): the issuer flushes later

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close.  Buffer rings still registered are abandoned, not freed: with the
        ring's teardown running asynchronously in the kernel, they may still be written."""
        if self._closed:
            return
        self._closed = True
        for buffer_ring in list(self.buffer_rings.values()):
            buffer_ring.abandon()
        del self._sq_head, self._sq_tail, self._sq_flags, self._cq_head, self._cq_tail
        for area in {id(m): m for m in (self._sq_map, self._cq_map, self._sqes)}.values():
            try:
                area.close()
            except BufferError:
                pass  # a ctypes view lives on (in a traceback's frame): unmapped with it
        os.close(self.fd)

    @property
    def closed(self) -> bool:
        return self._closed


class BufferRing:
    """A ring of provided buffers (``IORING_REGISTER_PBUF_RING``, kernel 5.19+), group *group_id*.

    *count* (a power of two, at most 32,768) buffers of *size* bytes live in one anonymous
    mapping: pages nobody has written are not allocated, so a large pool costs memory only as
    far as it is used.  The kernel is given at most *length* bytes (default *size*) of each,
    so a receive never returns more than that.  The ring of ``io_uring_buf`` entries is a
    separate page-aligned anonymous mapping; its tail is the u16 at byte 14 of entry 0.

    Every buffer is in the ring at start.  The kernel takes one for each receive that selects
    from this group (``IOSQE_BUFFER_SELECT``, ``buf_group``) and reports its id in the CQE
    (``flags >> IORING_CQE_BUFFER_SHIFT``); the buffer is the program's until it gives it back
    with :meth:`recycle`.  Giving back a buffer that is not the program's would corrupt the
    ring (one entry too many: a buffer lost, another handed out twice), so ownership is kept
    in :attr:`states`, one byte per buffer: :data:`IN_KERNEL`, or a nonzero state of the
    program's choosing set by :meth:`take`.  :meth:`take` of a buffer the program holds and
    :meth:`recycle` of one the kernel holds raise :class:`BufferOwnershipError` and change
    nothing.

    Ordering: the entry is written before the tail that publishes it.  On x86-64 stores are
    not reordered; on arm64 the kernel reads the tail (with acquire) in this thread's own task
    context (receives pick their buffer while the issuing task runs their completion work), so
    program order is enough.

    Freeing: :meth:`close` unregisters the group, then unmaps.  The *caller* guarantees that no
    operation that may select from this group is still in flight (every one of them has posted
    its final CQE, the one without ``IORING_CQE_F_MORE``): a buffer already picked is written
    by the kernel whatever the group's registration.  :class:`Ring` abandons (never frees) the
    buffer rings still open when it closes, and the proactor closes them only after its
    operations drained.

    Registration failure (an old kernel, a taken group id) raises ``OSError`` so that a caller
    can fall back to plain receives.  A ``defer_taskrun`` ring, once enabled, refuses
    registration from any thread but its issuer (EEXIST): make buffer rings before the loop
    first runs, or on the loop's thread.
    """

    def __init__(
        self, ring: Ring, group_id: int, count: int, size: int, *, length: int | None = None
    ) -> None:
        if count < 1 or count & (count - 1) or count > 32768:
            raise ValueError(f"count must be a power of two from 1 to 32768, not {count}")
        if size < 1:
            raise ValueError(f"size must be positive, not {size}")
        length = size if length is None else length
        if not 0 < length <= min(size, _MASK32):
            raise ValueError(f"length must be from 1 to size ({size}), not {length}")
        if not 0 <= group_id <= 0xFFFF:
            raise ValueError(f"group_id must be a u16, not {group_id}")
        self.group_id = group_id
        self.count = count
        self.size = size
        self.buffer_length = length
        self._ring: Ring | None = ring
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self._entries = mmap.mmap(-1, max(count * 16, mmap.PAGESIZE), flags=private)
        self._memory = mmap.mmap(-1, count * size, flags=private)
        self._base = _address(self._memory)
        reg = abi.io_uring_buf_reg(
            ring_addr=_address(self._entries), ring_entries=count, bgid=group_id
        )
        if (
            abi.io_uring_register(ring.fd, abi.IORING_REGISTER_PBUF_RING, ctypes.addressof(reg), 1)
            < 0
        ):
            code = ctypes.get_errno()
            self._entries.close()
            self._memory.close()
            self._ring = None
            _fail(f"io_uring_register(IORING_REGISTER_PBUF_RING, group {group_id})", code)
        self._mask = count - 1
        self._pack_entry = abi.IO_URING_BUF_HEAD.pack_into
        self._tail_word = ctypes.c_uint16.from_buffer(
            self._entries, abi.IO_URING_BUF_RING_TAIL_OFFSET
        )
        for bid in range(count):
            self._pack_entry(self._entries, bid * 16, self._base + bid * size, length, bid)
        self._tail = count & 0xFFFF
        self._tail_word.value = self._tail
        whole = memoryview(self._memory)
        self._views = [whole[bid * size : (bid + 1) * size] for bid in range(count)]
        whole.release()
        #: Who holds each buffer: IN_KERNEL, or the program's own nonzero state.
        self.states = bytearray(count)
        ring.buffer_rings[group_id] = self

    def view(self, bid: int) -> memoryview:
        """The whole buffer *bid* (``size`` bytes; the kernel wrote ``res`` of them)."""
        return self._views[bid]

    def take(self, bid: int, state: int = 1) -> None:
        """The kernel handed buffer *bid* out (a CQE named it): the program holds it now, in
        *state* (nonzero)."""
        if self.states[bid] != IN_KERNEL:
            raise BufferOwnershipError(
                f"the kernel handed out provided buffer {bid} of group {self.group_id}, "
                f"which the program still holds (state {self.states[bid]})"
            )
        self.states[bid] = state

    def recycle(self, bid: int) -> None:
        """Give buffer *bid* back to the kernel: write it at the tail, publish the new tail."""
        states = self.states
        if states[bid] == IN_KERNEL:
            raise BufferOwnershipError(
                f"provided buffer {bid} of group {self.group_id} given back twice "
                "(the kernel already has it)"
            )
        states[bid] = IN_KERNEL
        tail = self._tail
        self._pack_entry(
            self._entries,
            (tail & self._mask) << 4,
            self._base + bid * self.size,
            self.buffer_length,
            bid,
        )
        tail = (tail + 1) & 0xFFFF
        self._tail = tail
        self._tail_word.value = tail

    def release_pages(self) -> None:
        """Drop the buffers' pages (``MADV_DONTNEED``): the memory reads as zeros and costs
        nothing until written again.  Only while no operation can select a buffer of this
        group and the program holds none: their contents would be lost."""
        if any(self.states):
            raise BufferOwnershipError(
                f"release_pages() of group {self.group_id} while the program holds buffers"
            )
        self._memory.madvise(mmap.MADV_DONTNEED)

    @property
    def closed(self) -> bool:
        return self._ring is None

    def close(self) -> None:
        """Unregister the group, then free the memory (see the class note on who guarantees
        the kernel no longer writes it)."""
        ring = self._ring
        if ring is None:
            return
        reg = abi.io_uring_buf_reg(bgid=self.group_id)
        if (
            abi.io_uring_register(
                ring.fd, abi.IORING_UNREGISTER_PBUF_RING, ctypes.addressof(reg), 1
            )
            < 0
        ):
            code = ctypes.get_errno()
            self.abandon()
            _fail(f"io_uring_register(IORING_UNREGISTER_PBUF_RING, group {self.group_id})", code)
        ring.buffer_rings.pop(self.group_id, None)
        self._ring = None
        del self._tail_word
        for view in self._views:
            view.release()
        self._views = []
        for area in (self._entries, self._memory):
            try:
                area.close()
            except BufferError:
                pass  # someone still holds a view: the memory goes when that view does

    def abandon(self) -> None:
        """Let go without freeing: the memory stays mapped for the life of the process."""
        if self._ring is not None:
            self._ring.buffer_rings.pop(self.group_id, None)
            self._ring = None
            _abandoned.append(self)
