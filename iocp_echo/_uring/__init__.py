"""The Linux backend: io_uring, driven from the standard library (``ctypes`` and ``mmap``).

The OS model.  io_uring is Linux's completion port.  The kernel and the program share two
rings in memory: the program writes submission entries (SQEs: "receive up to N bytes from
socket S into buffer B, and tag it with number U") into the submission ring, and one
``io_uring_enter`` system call hands all of them to the kernel; as operations finish, the
kernel writes completion entries (CQEs: "operation U finished with result R, flags F") into
the completion ring, where the program reaps them.  One ``io_uring_enter`` both submits every
queued operation and waits, with a timeout, for the next completion: that is the proactor's
``select()``, so an event-loop iteration costs one system call however many operations it
issues and completes.  As with IOCP, a buffer given to the kernel belongs to the kernel until
its completion is reaped, and a cancellation is itself an operation (``ASYNC_CANCEL``) whose
outcome arrives as a completion.  Unlike IOCP, an operation can stay armed and complete many
times (multishot accept and receive, ``IORING_CQE_F_MORE``), and the kernel can pick the
receive buffer itself, from a ring of buffers the program provides, when data arrives.

The layers, one module each:

- :mod:`.abi`: the kernel interface under the kernel's names: constants, structures, the three
  system calls;
- :mod:`.ring`: one ring (set-up with fallbacks, mmaps, push, enter, reap) and provided-buffer
  rings; no asyncio;
- :mod:`.proactor`: :class:`UringProactor`, asyncio's proactor interface with futures plus
  direct (handler-called) operations;
- :mod:`.loop`: :class:`UringEventLoop`, the asyncio loop on that proactor;
- :mod:`.engine`: the completion engine that serves connections on the same proactor;
- this module: the backend functions :mod:`iocp_echo._platform` calls.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from .._backend import BackendOperation
from ..errors import UnsupportedPlatformError
from . import abi
from .loop import UringEventLoop
from .proactor import DEFAULT_ENTRIES, UringProactor, check_kernel
from .ring import Ring

__all__ = [
    "NAME",
    "TRANSIENT_ACCEPT_ERRORS",
    "UringEventLoop",
    "UringProactor",
    "accept",
    "is_transient_accept_error",
    "loop_class",
    "make_engine",
    "new_event_loop",
    "operations",
    "prepare_listener",
    "probe",
]

NAME = "io_uring (asyncio BaseProactorEventLoop)"

_WHAT_TO_DO = (
    "Run it on Windows, or under Wine with Windows CPython: "
    "python tools/winpy.py --python 3.13 examples/echo.py"
)


def _setup_failure(exc: OSError, entries: int) -> UnsupportedPlatformError:
    """The UnsupportedPlatformError for a ring that could not be set up or used."""
    reason = {
        errno.ENOSYS: "the kernel has no io_uring (needs Linux 5.11 or later)",
        errno.EPERM: "io_uring is forbidden here (sysctl kernel.io_uring_disabled, or a "
        "seccomp filter such as a container runtime's default profile)",
        errno.EACCES: "io_uring is restricted to a group this user is not in "
        "(kernel.io_uring_group)",
        errno.ENOMEM: f"the kernel could not allocate a {entries:,}-entry ring: the "
        "locked-memory limit is too low (kernels before 5.12 charge rings to RLIMIT_MEMLOCK: "
        "raise it with 'ulimit -l', or LimitMEMLOCK= in a systemd unit) or memory is short",
        errno.EMFILE: "this process has no descriptor left for the ring (raise 'ulimit -n')",
        errno.ENFILE: "the system has no descriptor left for the ring",
    }.get(exc.errno or 0, f"setting up io_uring failed: {exc}")
    return UnsupportedPlatformError(
        f"iocp_echo's Linux backend cannot start: {reason}. {_WHAT_TO_DO}"
    )


def probe(entries: int = DEFAULT_ENTRIES) -> None:
    """Check that io_uring works here as the loop will use it: a ring of the same size, set up
    with the same flags, with every feature and opcode the backend needs, and one NOP taken
    through ``io_uring_enter`` and back.

    Raises :class:`UnsupportedPlatformError` saying what is missing or refused (the syscall,
    a memory limit, a feature, an opcode) and what to do.
    """
    try:
        ring = Ring(entries)
    except OSError as exc:
        raise _setup_failure(exc, entries) from None
    try:
        check_kernel(ring)
        ring.push(abi.IORING_OP_NOP, -1, user_data=1)
        ring.enter(True, 5.0)
        if (1, 0, 0) not in ring.reap():
            raise UnsupportedPlatformError(
                "iocp_echo's Linux backend cannot start: io_uring did not complete a test "
                f"operation within 5 seconds. {_WHAT_TO_DO}"
            )
    except OSError as exc:
        raise _setup_failure(exc, entries) from None
    finally:
        ring.close()


def loop_class() -> type[UringEventLoop]:
    return UringEventLoop


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        proactor = UringProactor()
    except OSError as exc:
        raise _setup_failure(exc, DEFAULT_ENTRIES) from None
    return UringEventLoop(proactor)


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


def prepare_listener(sock: socket.socket) -> None:
    """POSIX servers set SO_REUSEADDR so a restart is not refused by TIME_WAIT connections."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def is_transient_accept_error(exc: OSError) -> bool:
    return isinstance(exc, ConnectionError) or exc.errno in TRANSIENT_ACCEPT_ERRORS


def accept(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> asyncio.Future[tuple[socket.socket, Any]]:
    return loop._proactor.accept(listener)  # type: ignore[attr-defined,no-any-return]


def make_engine(loop: asyncio.AbstractEventLoop, *, max_read: int) -> Any:
    """The io_uring completion engine (``engine.py``); OSError when this kernel lacks what it
    needs (the server then uses asyncio's own transports)."""
    from .engine import UringEngine

    return UringEngine(loop, max_read=max_read)


def operations(loop: asyncio.AbstractEventLoop) -> list[BackendOperation]:
    proactor = getattr(loop, "_proactor", None)
    if not isinstance(proactor, UringProactor):
        raise LookupError(f"{type(loop).__name__} does not run on the io_uring proactor")
    self_pipe = getattr(loop, "_ssock", None)
    return [
        BackendOperation(
            op.future,
            op.sock,
            "wakeup" if op.sock is self_pipe else op.kind,
            op.nbytes,
            op.started,
            op.state,
            "",
        )
        for op in proactor.operations()
    ]
