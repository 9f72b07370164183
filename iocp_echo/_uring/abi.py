"""The io_uring kernel interface: constants, structures and system calls, under the kernel's names.

Everything here is transcribed from ``include/uapi/linux/io_uring.h`` (the names, the values, the
field order) so that a reader can check each line against the header.  Nothing here decides
anything: :mod:`.ring` builds the rings from these pieces and :mod:`.proactor` drives them.

The system calls go through libc's ``syscall(2)`` with a ``ctypes`` prototype built once per
call (fixed ``argtypes``, ``restype``, ``use_errno``): the argument conversion then happens in C,
which matters on the hot path (``io_uring_enter`` runs once per event-loop iteration).  Each
wrapper returns the raw result: ``-1`` with ``ctypes.get_errno()`` set on failure.  The syscall
numbers 425-427 are the same on every architecture Linux gives io_uring to, except alpha
(535-537) and mips (4425/5425/6425 and up), which iocp_echo does not support.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct
from collections.abc import Callable
from typing import Final

# -- system calls ----------------------------------------------------------------------------

__NR_io_uring_setup: Final = 425
__NR_io_uring_enter: Final = 426
__NR_io_uring_register: Final = 427

_libc = ctypes.CDLL(None, use_errno=True)
_long = ctypes.c_long
# syscall(2) is variadic and reads every argument as a long: declare them all as longs so each
# register is filled entirely, whatever the kernel-side type (pointers travel as addresses).
_SYSCALL2 = ctypes.CFUNCTYPE(_long, _long, _long, _long, use_errno=True)
_SYSCALL4 = ctypes.CFUNCTYPE(_long, _long, _long, _long, _long, _long, use_errno=True)
_SYSCALL6 = ctypes.CFUNCTYPE(_long, _long, _long, _long, _long, _long, _long, _long, use_errno=True)

#: ``io_uring_setup(entries, struct io_uring_params *p)``
io_uring_setup: Callable[[int, int], int] = functools.partial(
    _SYSCALL2(("syscall", _libc)), __NR_io_uring_setup
)
#: ``io_uring_enter(fd, to_submit, min_complete, flags, const void *arg, size_t argsz)``
io_uring_enter: Callable[[int, int, int, int, int, int], int] = functools.partial(
    _SYSCALL6(("syscall", _libc)), __NR_io_uring_enter
)
#: ``io_uring_register(fd, opcode, void *arg, nr_args)``
io_uring_register: Callable[[int, int, int, int], int] = functools.partial(
    _SYSCALL4(("syscall", _libc)), __NR_io_uring_register
)

# -- io_uring_setup(2): flags in, features out -----------------------------------------------

IORING_SETUP_IOPOLL: Final = 1 << 0
IORING_SETUP_SQPOLL: Final = 1 << 1
IORING_SETUP_SQ_AFF: Final = 1 << 2
IORING_SETUP_CQSIZE: Final = 1 << 3  # cq_entries is given (we ask 4x the SQ size)
IORING_SETUP_CLAMP: Final = 1 << 4  # clamp both sizes to the maximum instead of EINVAL
IORING_SETUP_ATTACH_WQ: Final = 1 << 5
IORING_SETUP_R_DISABLED: Final = 1 << 6  # created disabled: IORING_REGISTER_ENABLE_RINGS
IORING_SETUP_SUBMIT_ALL: Final = 1 << 7  # 5.18: keep submitting after an SQE fails
IORING_SETUP_COOP_TASKRUN: Final = 1 << 8  # 5.19: no IPI to run completion work
IORING_SETUP_TASKRUN_FLAG: Final = 1 << 9  # 5.19: IORING_SQ_TASKRUN says work is waiting
IORING_SETUP_SQE128: Final = 1 << 10
IORING_SETUP_CQE32: Final = 1 << 11
IORING_SETUP_SINGLE_ISSUER: Final = 1 << 12  # 6.0: one task submits (and, with R_DISABLED,
# that task is the one that enables the ring)
IORING_SETUP_DEFER_TASKRUN: Final = 1 << 13  # 6.1: completion work runs only in
# io_uring_enter(GETEVENTS) of the issuer: needs SINGLE_ISSUER

IORING_FEAT_SINGLE_MMAP: Final = 1 << 0
IORING_FEAT_NODROP: Final = 1 << 1
IORING_FEAT_SUBMIT_STABLE: Final = 1 << 2
IORING_FEAT_RW_CUR_POS: Final = 1 << 3
IORING_FEAT_CUR_PERSONALITY: Final = 1 << 4
IORING_FEAT_FAST_POLL: Final = 1 << 5
IORING_FEAT_POLL_32BITS: Final = 1 << 6
IORING_FEAT_SQPOLL_NONFIXED: Final = 1 << 7
IORING_FEAT_EXT_ARG: Final = 1 << 8
IORING_FEAT_NATIVE_WORKERS: Final = 1 << 9
IORING_FEAT_RSRC_TAGS: Final = 1 << 10
IORING_FEAT_CQE_SKIP: Final = 1 << 11
IORING_FEAT_LINKED_FILE: Final = 1 << 12

# mmap(2) offsets of the three shared areas
IORING_OFF_SQ_RING: Final = 0
IORING_OFF_CQ_RING: Final = 0x8000000
IORING_OFF_SQES: Final = 0x10000000

# sq_ring->flags (written by the kernel)
IORING_SQ_NEED_WAKEUP: Final = 1 << 0
IORING_SQ_CQ_OVERFLOW: Final = 1 << 1  # completions wait in the kernel's overflow list
IORING_SQ_TASKRUN: Final = 1 << 2  # completion work waits for an io_uring_enter

# -- io_uring_enter(2) -------------------------------------------------------------------------

IORING_ENTER_GETEVENTS: Final = 1 << 0
IORING_ENTER_SQ_WAKEUP: Final = 1 << 1
IORING_ENTER_SQ_WAIT: Final = 1 << 2
IORING_ENTER_EXT_ARG: Final = 1 << 3  # arg is a struct io_uring_getevents_arg (a timeout)
IORING_ENTER_REGISTERED_RING: Final = 1 << 4

# -- io_uring_register(2) opcodes --------------------------------------------------------------

IORING_REGISTER_PROBE: Final = 8
IORING_REGISTER_ENABLE_RINGS: Final = 12
IORING_REGISTER_PBUF_RING: Final = 22  # 5.19
IORING_UNREGISTER_PBUF_RING: Final = 23

IO_URING_OP_SUPPORTED: Final = 1 << 0  # io_uring_probe_op.flags

# -- opcodes (enum io_uring_op), SQE flags, per-opcode flags --------------------------------

IORING_OP_NOP: Final = 0
IORING_OP_READV: Final = 1
IORING_OP_WRITEV: Final = 2
IORING_OP_POLL_ADD: Final = 6
IORING_OP_POLL_REMOVE: Final = 7
IORING_OP_SENDMSG: Final = 9
IORING_OP_RECVMSG: Final = 10
IORING_OP_TIMEOUT: Final = 11
IORING_OP_ACCEPT: Final = 13
IORING_OP_ASYNC_CANCEL: Final = 14
IORING_OP_LINK_TIMEOUT: Final = 15
IORING_OP_CONNECT: Final = 16
IORING_OP_CLOSE: Final = 19
IORING_OP_READ: Final = 22
IORING_OP_WRITE: Final = 23
IORING_OP_SEND: Final = 26
IORING_OP_RECV: Final = 27
IORING_OP_PROVIDE_BUFFERS: Final = 31
IORING_OP_SHUTDOWN: Final = 34
IORING_OP_SEND_ZC: Final = 47

IOSQE_FIXED_FILE: Final = 1 << 0
IOSQE_IO_DRAIN: Final = 1 << 1
IOSQE_IO_LINK: Final = 1 << 2
IOSQE_IO_HARDLINK: Final = 1 << 3
IOSQE_ASYNC: Final = 1 << 4
IOSQE_BUFFER_SELECT: Final = 1 << 5  # take a buffer from group sqe.buf_group
IOSQE_CQE_SKIP_SUCCESS: Final = 1 << 6

IORING_RECVSEND_POLL_FIRST: Final = 1 << 0  # in sqe.ioprio of SEND/RECV
IORING_RECV_MULTISHOT: Final = 1 << 1  # 6.0, in sqe.ioprio of RECV (with IOSQE_BUFFER_SELECT)
IORING_ACCEPT_MULTISHOT: Final = 1 << 0  # 5.19, in sqe.ioprio of ACCEPT

IORING_CQE_F_BUFFER: Final = 1 << 0  # the upper 16 bits of cqe.flags are the buffer id
IORING_CQE_F_MORE: Final = 1 << 1  # the request stays armed: more CQEs will follow
IORING_CQE_F_SOCK_NONEMPTY: Final = 1 << 2
IORING_CQE_F_NOTIF: Final = 1 << 3
IORING_CQE_BUFFER_SHIFT: Final = 16

# -- structures ------------------------------------------------------------------------------

_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


# The structures keep the kernel's names (lower case on purpose) and field order.


class io_sqring_offsets(ctypes.Structure):
    _fields_ = [
        ("head", _u32),
        ("tail", _u32),
        ("ring_mask", _u32),
        ("ring_entries", _u32),
        ("flags", _u32),
        ("dropped", _u32),
        ("array", _u32),
        ("resv1", _u32),
        ("user_addr", _u64),
    ]


class io_cqring_offsets(ctypes.Structure):
    _fields_ = [
        ("head", _u32),
        ("tail", _u32),
        ("ring_mask", _u32),
        ("ring_entries", _u32),
        ("overflow", _u32),
        ("cqes", _u32),
        ("flags", _u32),
        ("resv1", _u32),
        ("user_addr", _u64),
    ]


class io_uring_params(ctypes.Structure):
    """Passed to io_uring_setup(2), copied back with the sizes, features and mmap offsets."""

    _fields_ = [
        ("sq_entries", _u32),
        ("cq_entries", _u32),
        ("flags", _u32),
        ("sq_thread_cpu", _u32),
        ("sq_thread_idle", _u32),
        ("features", _u32),
        ("wq_fd", _u32),
        ("resv", _u32 * 3),
        ("sq_off", io_sqring_offsets),
        ("cq_off", io_cqring_offsets),
    ]


class __kernel_timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


class io_uring_getevents_arg(ctypes.Structure):
    """io_uring_enter's *arg* with IORING_ENTER_EXT_ARG: ``ts`` is a __kernel_timespec address."""

    _fields_ = [("sigmask", _u64), ("sigmask_sz", _u32), ("pad", _u32), ("ts", _u64)]


class io_uring_probe_op(ctypes.Structure):
    _fields_ = [("op", _u8), ("resv", _u8), ("flags", _u16), ("resv2", _u32)]


class io_uring_probe(ctypes.Structure):
    """IORING_REGISTER_PROBE's argument; followed in memory by ``ops_len`` io_uring_probe_op."""

    _fields_ = [("last_op", _u8), ("ops_len", _u8), ("resv", _u16), ("resv2", _u32 * 3)]


class io_uring_buf(ctypes.Structure):
    """One entry of a provided-buffer ring.  In entry 0, ``resv`` is the ring's tail."""

    _fields_ = [("addr", _u64), ("len", _u32), ("bid", _u16), ("resv", _u16)]


class io_uring_buf_reg(ctypes.Structure):
    """IORING_(UN)REGISTER_PBUF_RING's argument (``pad`` is ``flags`` in newer headers)."""

    _fields_ = [
        ("ring_addr", _u64),
        ("ring_entries", _u32),
        ("bgid", _u16),
        ("flags", _u16),
        ("resv", _u64 * 3),
    ]


#: Byte offset of the tail (a u16) in a provided-buffer ring: ``resv`` of entry 0.
IO_URING_BUF_RING_TAIL_OFFSET: Final = io_uring_buf.resv.offset
#: An io_uring_buf without its ``resv`` (so that writing entry 0 never touches the tail):
#: addr, len, bid.
IO_URING_BUF_HEAD = struct.Struct("<QIH")

# struct io_uring_sqe (64 bytes) as a struct.Struct: packing one is a single C call, where a
# ctypes Structure would cost one attribute store per field.  The field order, by kernel name
# (unions named by the member this backend uses):
SQE_FIELDS: Final = (
    "opcode",  # u8
    "flags",  # u8: IOSQE_*
    "ioprio",  # u16: also IORING_RECV_MULTISHOT / IORING_ACCEPT_MULTISHOT
    "fd",  # s32
    "off",  # u64 (union: addr2)
    "addr",  # u64 (union: splice_off_in)
    "len",  # u32
    "op_flags",  # u32 union: msg_flags, accept_flags, poll32_events, cancel_flags, ...
    "user_data",  # u64: comes back in the CQE
    "buf_index",  # u16 union: buf_group (with IOSQE_BUFFER_SELECT)
    "personality",  # u16
    "splice_fd_in",  # s32 union: file_index, addr_len
    "addr3",  # u64
    "__pad2",  # u64
)
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe (16 bytes): user_data u64, res s32, flags u32 (IORING_CQE_F_*).
CQE = struct.Struct("<QiI")

assert SQE.size == 64 and CQE.size == 16 and len(SQE_FIELDS) == len(SQE.format) - 1
assert ctypes.sizeof(io_uring_params) == 120 and ctypes.sizeof(io_uring_buf_reg) == 40


def write_sqe(
    buffer: bytearray | memoryview | mmap.mmap,
    offset: int,
    *,
    opcode: int,
    fd: int,
    flags: int = 0,
    ioprio: int = 0,
    off: int = 0,
    addr: int = 0,
    len: int = 0,  # the kernel's field name
    op_flags: int = 0,
    user_data: int = 0,
    buf_index: int = 0,
    personality: int = 0,
    splice_fd_in: int = 0,
    addr3: int = 0,
) -> None:
    """Write one SQE at *offset* of *buffer*, its fields given by kernel name.

    :meth:`.ring.Ring.push` inlines the same pack for speed (a Python call per SQE saved);
    the tests check that both write identical bytes.
    """
    SQE.pack_into(
        buffer,
        offset,
        opcode,
        flags,
        ioprio,
        fd,
        off,
        addr,
        len,
        op_flags,
        user_data,
        buf_index,
        personality,
        splice_fd_in,
        addr3,
        0,
    )
