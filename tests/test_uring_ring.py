"""The io_uring layers below asyncio: the kernel ABI transcription, the ring's set-up fallbacks,
thread binding, reaping with CQE flags, and provided-buffer rings with multishot operations."""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
import sys
import threading
from collections.abc import Iterator

import pytest

from iocp_echo.errors import BufferOwnershipError

pytestmark = [pytest.mark.backend, pytest.mark.uring]

if sys.platform.startswith("linux"):
    from iocp_echo._uring import abi
    from iocp_echo._uring.ring import (
        DEFAULT_SETUP_MODES,
        IN_KERNEL,
        SETUP_MODES,
        BufferRing,
        Ring,
    )


@pytest.fixture(params=["defer_taskrun", "coop_taskrun", "plain"])
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    """A 16-entry ring in each set-up mode (this kernel has them all: the fallbacks are forced)."""
    made = Ring(16, setup_modes=[request.param])
    assert made.setup_mode == request.param
    yield made
    made.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _complete(ring: Ring, count: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
    """Enter and reap until *count* completions arrived (bounded)."""
    got: list[tuple[int, int, int]] = []
    for _ in range(100):
        ring.enter(True, timeout / 100)
        got += ring.reap()
        if len(got) >= count:
            return got
    raise AssertionError(f"only {len(got)} of {count} completions arrived: {got}")


def test_structures_match_the_kernel_header() -> None:
    """Sizes and offsets from include/uapi/linux/io_uring.h."""
    assert ctypes.sizeof(abi.io_uring_params) == 120
    assert abi.io_uring_params.sq_off.offset == 40
    assert abi.io_uring_params.cq_off.offset == 80
    assert ctypes.sizeof(abi.io_sqring_offsets) == ctypes.sizeof(abi.io_cqring_offsets) == 40
    assert ctypes.sizeof(abi.io_uring_getevents_arg) == 24
    assert ctypes.sizeof(abi.__kernel_timespec) == 16
    assert ctypes.sizeof(abi.io_uring_probe) == 16
    assert ctypes.sizeof(abi.io_uring_probe_op) == 8
    assert ctypes.sizeof(abi.io_uring_buf) == 16
    assert ctypes.sizeof(abi.io_uring_buf_reg) == 40
    assert abi.IO_URING_BUF_RING_TAIL_OFFSET == 14
    assert abi.SQE.size == 64 and abi.CQE.size == 16
    assert (abi.IORING_OFF_CQ_RING, abi.IORING_OFF_SQES) == (0x8000000, 0x10000000)
    assert (abi.IORING_REGISTER_PBUF_RING, abi.IORING_UNREGISTER_PBUF_RING) == (22, 23)


def test_push_writes_the_same_sqe_as_the_keyword_helper() -> None:
    """Ring.push packs SQEs inline for speed; abi.write_sqe names every field.  Both must put
    each field where the kernel reads it."""
    ring = Ring(4, setup_modes=["plain"])
    try:
        fields = {
            "opcode": abi.IORING_OP_RECV,
            "fd": 7,
            "flags": abi.IOSQE_BUFFER_SELECT,
            "ioprio": abi.IORING_RECV_MULTISHOT,
            "off": 11,
            "addr": 0x1234_5678_9ABC,
            "len": 1000,
            "op_flags": 0x40,
            "user_data": (1 << 63) | 99,
            "buf_index": 5,
        }
        position = ring.push(
            fields["opcode"],
            fields["fd"],
            addr=fields["addr"],
            length=fields["len"],
            off=fields["off"],
            op_flags=fields["op_flags"],
            user_data=fields["user_data"],
            flags=fields["flags"],
            ioprio=fields["ioprio"],
            buf_group=fields["buf_index"],
        )
        slot = position & (ring.sq_entries - 1)
        pushed = bytes(ring._sqes[slot * 64 : slot * 64 + 64])
        written = bytearray(64)
        abi.write_sqe(written, 0, **fields)
        assert pushed == bytes(written)
        by_name = dict(zip(abi.SQE_FIELDS, abi.SQE.unpack(pushed), strict=True))
        assert {name: by_name[name] for name in fields} == fields
        # The kernel's own offsets: user_data at 32, buf_group at 40, ioprio at 2.
        assert int.from_bytes(pushed[32:40], "little") == fields["user_data"]
        assert int.from_bytes(pushed[40:42], "little") == 5
        assert int.from_bytes(pushed[2:4], "little") == abi.IORING_RECV_MULTISHOT
    finally:
        ring.close()


def test_features_and_opcodes(ring: Ring) -> None:
    assert ring.features & abi.IORING_FEAT_NODROP and ring.features & abi.IORING_FEAT_EXT_ARG
    opcodes = ring.probe_opcodes()
    assert {abi.IORING_OP_NOP, abi.IORING_OP_RECV, abi.IORING_OP_ACCEPT} <= opcodes
    assert ring.sq_entries == 16 and ring.cq_entries == 64


def test_setup_falls_back_on_einval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that answers EINVAL to DEFER_TASKRUN (before 6.1), then to COOP_TASKRUN (before
    5.19), gets the next mode; the flags tried are exactly the documented ones."""
    real = abi.io_uring_setup
    tried: list[int] = []
    refused = abi.IORING_SETUP_DEFER_TASKRUN

    def old_kernel(entries: int, address: int) -> int:
        flags = abi.io_uring_params.from_address(address).flags
        tried.append(flags)
        if flags & refused:
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real(entries, address)

    monkeypatch.setattr(abi, "io_uring_setup", old_kernel)
    base = abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_CLAMP
    ring = Ring(8)
    assert ring.setup_mode == "coop_taskrun"
    ring.close()
    assert tried == [base | SETUP_MODES["defer_taskrun"], base | SETUP_MODES["coop_taskrun"]]
    tried.clear()
    refused = abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_COOP_TASKRUN
    ring = Ring(8)
    assert ring.setup_mode == "plain"
    ring.push(abi.IORING_OP_NOP, -1, user_data=3)
    assert _complete(ring, 1) == [(3, 0, 0)]
    ring.close()
    assert len(tried) == 3 and tried[-1] == base
    # Anything but EINVAL is not a missing feature: it is raised at once.
    refused = 0

    def forbidden(entries: int, address: int) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(abi, "io_uring_setup", forbidden)
    with pytest.raises(PermissionError):
        Ring(8)
    assert DEFAULT_SETUP_MODES == ("defer_taskrun", "coop_taskrun", "plain")


def test_every_enter_lets_the_kernel_post_completions(ring: Ring) -> None:
    """A non-waiting enter still reaps: under DEFER_TASKRUN a completion is posted only inside
    io_uring_enter with GETEVENTS, so enter(wait=False) must pass it too."""
    a, b = _pair()
    buffer = ctypes.create_string_buffer(64)
    ring.push(abi.IORING_OP_RECV, a.fileno(), addr=ctypes.addressof(buffer), length=64, user_data=9)
    ring.enter(False, None)
    b.send(b"ping")
    completions: list[tuple[int, int, int]] = []
    for _ in range(200):
        ring.enter(False, None)  # never waits
        completions += ring.reap()
        if completions:
            break
        threading.Event().wait(0.01)
    assert completions == [(9, 4, 0)]
    assert buffer.raw[:4] == b"ping"
    a.close()
    b.close()


def test_single_issuer_ring_is_enabled_by_the_thread_that_runs_it() -> None:
    """The ring is made in this thread and used in another (as a loop made in one thread and
    run in another): that works because the ring starts disabled and the first enter enables
    it; afterwards only that thread may enter."""
    ring = Ring(8, setup_modes=["defer_taskrun"])
    try:
        results: list[object] = []

        def run() -> None:
            ring.push(abi.IORING_OP_NOP, -1, user_data=1)
            results.extend(_complete(ring, 1))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(10)
        assert results == [(1, 0, 0)]
        assert ring.issuer == worker.ident
        with pytest.raises(OSError, match="thread that first ran it") as raised:
            ring.enter(False, None)
        assert raised.value.errno == errno.EEXIST
    finally:
        ring.close()


def test_neutralize_turns_an_unsubmitted_sqe_into_a_nop(ring: Ring) -> None:
    a, b = _pair()
    b.send(b"stays")
    buffer = ctypes.create_string_buffer(64)
    position = ring.push(
        abi.IORING_OP_RECV, a.fileno(), addr=ctypes.addressof(buffer), length=64, user_data=4
    )
    assert not ring.consumed(position) and ring.pending() == 1
    ring.neutralize(position, user_data=5)
    assert _complete(ring, 1) == [(5, 0, 0)]
    assert ring.consumed(position) and ring.pending() == 0
    assert a.recv(64) == b"stays"
    a.close()
    b.close()


def test_reap_keeps_order_across_the_ring_wrap_and_overflow() -> None:
    """200 NOPs through a 4-entry ring with a 16-entry completion ring: every completion comes
    back once, in order, across wraps and the kernel's overflow list."""
    ring = Ring(4, setup_modes=["plain"])
    try:
        got: list[tuple[int, int, int]] = []
        for index in range(200):
            if ring.space() == 0:
                ring.enter(False, None)  # no reaping: completions pile up and overflow
            ring.push(abi.IORING_OP_NOP, -1, user_data=index)
        got = _complete(ring, 200)
        assert got == [(index, 0, 0) for index in range(200)]
    finally:
        ring.close()


# -- provided buffers ---------------------------------------------------------------------


def _resident_pages(address: int, size: int) -> int:
    """How many pages of [address, address + size) are in memory (/proc/self/pagemap: one
    u64 per page, bit 63 "present"; exact even where the kernel merged adjacent mappings)."""
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // page * 8)
        entries = pagemap.read(size // page * 8)
    return sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)


def test_buffer_ring_receive_recycle_and_length(ring: Ring) -> None:
    """Receives pick buffers from the group, the CQE names the buffer, a recycled buffer is
    picked again; no receive exceeds the length given to the kernel."""
    buffers = BufferRing(ring, 1, 2, 4096, length=1000)
    assert buffers.buffer_length == 1000 and ring.buffer_rings == {1: buffers}
    a, b = _pair()
    seen = []
    for round_ in range(5):  # 5 receives through 2 buffers: the tail wraps the ring
        payload = bytes([65 + round_]) * 3000
        b.send(payload)
        ring.push(
            abi.IORING_OP_RECV,
            a.fileno(),
            user_data=round_,
            flags=abi.IOSQE_BUFFER_SELECT,
            buf_group=1,
        )
        [(user_data, res, flags)] = _complete(ring, 1)
        assert (user_data, res) == (round_, 1000)
        assert flags & abi.IORING_CQE_F_BUFFER
        bid = flags >> abi.IORING_CQE_BUFFER_SHIFT
        assert bytes(buffers.view(bid)[:res]) == payload[:1000]
        assert len(buffers.view(bid)) == 4096
        seen.append(bid)
        buffers.take(bid)
        buffers.recycle(bid)
        a.recv(4096)  # drop the rest
    assert set(seen) == {0, 1}
    buffers.close()
    assert ring.buffer_rings == {} and buffers.closed
    # Unregistered: the same group id can be registered again.
    BufferRing(ring, 1, 2, 64).close()
    a.close()
    b.close()


def test_buffer_ring_exhaustion_and_registration_errors(ring: Ring) -> None:
    buffers = BufferRing(ring, 2, 1, 64)
    with pytest.raises(OSError, match="PBUF_RING, group 2") as taken:
        BufferRing(ring, 2, 1, 64)
    assert taken.value.errno == errno.EEXIST
    with pytest.raises(ValueError, match="power of two"):
        BufferRing(ring, 3, 3, 64)
    with pytest.raises(ValueError, match="length"):
        BufferRing(ring, 3, 2, 64, length=65)
    a, b = _pair()
    b.send(b"one")
    ring.push(
        abi.IORING_OP_RECV, a.fileno(), user_data=1, flags=abi.IOSQE_BUFFER_SELECT, buf_group=2
    )
    [(_, res, flags)] = _complete(ring, 1)
    assert res == 3
    b.send(b"two")  # the only buffer is the program's now
    ring.push(
        abi.IORING_OP_RECV, a.fileno(), user_data=2, flags=abi.IOSQE_BUFFER_SELECT, buf_group=2
    )
    assert _complete(ring, 1) == [(2, -errno.ENOBUFS, 0)]
    buffers.take(flags >> abi.IORING_CQE_BUFFER_SHIFT)
    buffers.recycle(flags >> abi.IORING_CQE_BUFFER_SHIFT)
    ring.push(
        abi.IORING_OP_RECV, a.fileno(), user_data=3, flags=abi.IOSQE_BUFFER_SELECT, buf_group=2
    )
    [(_, res, flags)] = _complete(ring, 1)
    assert bytes(buffers.view(flags >> abi.IORING_CQE_BUFFER_SHIFT)[:res]) == b"two"
    buffers.close()
    a.close()
    b.close()


def test_untouched_buffers_take_no_memory() -> None:
    """A 64 MiB pool is one anonymous mapping whose pages exist only once written: the
    idle cost of a big pool is nothing."""
    ring = Ring(8, setup_modes=["plain"])
    try:
        buffers = BufferRing(ring, 1, 1024, 65536)
        assert _resident_pages(buffers._base, 1024 * 65536) == 0
        buffers.view(7)[:] = b"x" * 65536
        # 64 KiB; at most one 2 MiB huge page where transparent huge pages are "always".
        resident = _resident_pages(buffers._base, 1024 * 65536)
        assert 65536 // mmap.PAGESIZE <= resident <= (2 << 20) // mmap.PAGESIZE
        buffers.close()
    finally:
        ring.close()


def test_closing_the_ring_abandons_open_buffer_rings() -> None:
    """A ring closed while a buffer ring is still registered must not free that memory (the
    kernel tears the ring down asynchronously): the buffer ring is let go, not unmapped."""
    ring = Ring(8, setup_modes=["plain"])
    buffers = BufferRing(ring, 1, 2, 64)
    view = buffers.view(0)
    ring.close()
    assert buffers.closed
    view[:4] = b"safe"  # still mapped (a freed mapping would fault or raise)
    assert bytes(buffers.view(0)[:4]) == b"safe"


def test_multishot_recv_and_accept(ring: Ring) -> None:
    """One multishot RECV gives a CQE per arrival with IORING_CQE_F_MORE while armed; one
    multishot ACCEPT a CQE per connection.  The final CQE of a cancelled one lacks F_MORE."""
    buffers = BufferRing(ring, 4, 8, 256)
    a, b = _pair()
    ring.push(
        abi.IORING_OP_RECV,
        a.fileno(),
        user_data=1,
        flags=abi.IOSQE_BUFFER_SELECT,
        ioprio=abi.IORING_RECV_MULTISHOT,
        buf_group=4,
    )
    ring.enter(False, None)
    received = []
    for message in (b"first", b"second", b"third"):
        b.send(message)
        [(user_data, res, flags)] = _complete(ring, 1)
        assert user_data == 1 and flags & abi.IORING_CQE_F_MORE
        bid = flags >> abi.IORING_CQE_BUFFER_SHIFT
        received.append(bytes(buffers.view(bid)[:res]))
        buffers.take(bid)
        buffers.recycle(bid)
    assert received == [b"first", b"second", b"third"]
    ring.push(abi.IORING_OP_ASYNC_CANCEL, -1, addr=1, user_data=2)
    final = {user_data: (res, flags) for user_data, res, flags in _complete(ring, 2)}
    assert final[2] == (0, 0)
    assert final[1][0] == -errno.ECANCELED and not final[1][1] & abi.IORING_CQE_F_MORE

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    ring.push(
        abi.IORING_OP_ACCEPT,
        listener.fileno(),
        user_data=3,
        ioprio=abi.IORING_ACCEPT_MULTISHOT,
        op_flags=socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
    )
    ring.enter(False, None)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    accepted = _complete(ring, 3)
    assert [
        (user_data, bool(flags & abi.IORING_CQE_F_MORE)) for user_data, _, flags in accepted
    ] == [(3, True)] * 3
    for _, fd, _ in accepted:
        socket.socket(fileno=fd).close()
    for client in clients:
        client.close()
    ring.push(abi.IORING_OP_ASYNC_CANCEL, -1, addr=3, user_data=4)
    final = {user_data: (res, flags) for user_data, res, flags in _complete(ring, 2)}
    assert final[3] == (-errno.ECANCELED, 0)
    listener.close()
    buffers.close()
    a.close()
    b.close()


def test_a_buffer_is_given_back_once_and_handed_out_once() -> None:
    """The ownership ledger: recycling a buffer the kernel has, or taking one the program
    holds, raises and leaves the ring as it was (finding 2 corrupted it silently)."""
    ring = Ring(8)
    try:
        buffers = BufferRing(ring, 3, 4, 4096)
        tail = buffers._tail
        with pytest.raises(BufferOwnershipError, match="given back twice"):
            buffers.recycle(1)
        assert buffers._tail == tail  # nothing published
        buffers.take(1)
        with pytest.raises(BufferOwnershipError, match="still holds"):
            buffers.take(1)
        buffers.recycle(1)
        assert buffers._tail == (tail + 1) & 0xFFFF
        assert list(buffers.states) == [IN_KERNEL] * 4
        buffers.close()
    finally:
        ring.close()
