"""The Windows backend: I/O completion ports through asyncio's ``ProactorEventLoop``.

The OS model.  A completion port is a kernel queue of finished I/O.  A socket is associated
with the port once; after that, every overlapped operation started on it (``AcceptEx``,
``WSARecv``, ``WSASend``) returns at once with ``ERROR_IO_PENDING`` and, when the kernel has
done the work, posts a completion packet naming the operation's ``OVERLAPPED`` structure.  The
program's one thread sleeps in ``GetQueuedCompletionStatus`` and wakes only for finished work,
so it never blocks on any single client.  The ``OVERLAPPED`` structure and the buffer it names
belong to the kernel until that packet is dequeued: they must outlive cancellation.

asyncio implements this in ``IocpProactor`` (``_overlapped`` is its C binding): every
operation becomes an ``_OverlappedFuture`` kept in the proactor's cache until its packet
arrives, and ``ProactorEventLoop`` runs the port's wait as its ``select()``.  This module adds
what the stock loop gets wrong for a server: an ``AcceptEx`` whose failure (a client that resets
before the accept completes: ``ERROR_NETNAME_DELETED``, or ``WSAENETDOWN`` under Wine) is one
lost connection, not a dead listener (CPython gh-93821).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from typing import Any

from .. import _private
from .._backend import BackendOperation
from ..errors import os_error_code

logger = logging.getLogger("iocp_echo.iocp")

NAME = "IOCP (asyncio ProactorEventLoop)"

#: Errors of one pending accept that say nothing about the listener: the client went away
#: (reset, abort, timeout) between its SYN and the accept's completion.  59 is what Wine
#: reports where Windows reports 64; 995 is an aborted operation.
TRANSIENT_ACCEPT_ERRORS = frozenset(
    {
        59,  # ERROR_UNEXP_NET_ERR (Wine, for a reset during accept)
        64,  # ERROR_NETNAME_DELETED
        121,  # ERROR_SEM_TIMEOUT
        995,  # ERROR_OPERATION_ABORTED
        1236,  # ERROR_CONNECTION_ABORTED
        10053,  # WSAECONNABORTED
        10054,  # WSAECONNRESET
        10057,  # WSAENOTCONN: getpeername() on a connection reset before the accept finished
        10060,  # WSAETIMEDOUT
    }
)

_warned_fallback = False
_warned_stock_loop = False


def loop_class() -> type[asyncio.AbstractEventLoop]:
    from .loop import IocpEventLoop

    return IocpEventLoop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """iocp_echo's :class:`~.loop.IocpEventLoop`; a plain ``ProactorEventLoop`` (said once in
    the log) where CPython's ``IocpProactor`` is not the one its dequeue replaces."""
    global _warned_stock_loop
    if sys.platform != "win32":
        raise RuntimeError("the IOCP backend exists only on Windows")
    from .loop import IocpDequeue, IocpEventLoop

    loop: asyncio.AbstractEventLoop
    try:
        loop = IocpEventLoop(IocpDequeue())
    except _private.InternalsUnavailable as exc:
        if not _warned_stock_loop:
            _warned_stock_loop = True
            logger.warning("iocp_echo's event loop is unavailable (%s): using asyncio's", exc)
        loop = asyncio.ProactorEventLoop()
    if threading.current_thread() is threading.main_thread():
        # The loop made its self-pipe the signal wakeup fd.  A wakeup byte that cannot be
        # written means one is already queued, so the loop wakes anyway; without this CPython
        # prints "Exception ignored when trying to write to the signal wakeup fd" (seen under
        # Wine when Ctrl-C lands while the loop itself writes to the pipe).
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
    return loop


def prepare_listener(sock: socket.socket) -> None:
    """Refuse to share the port.

    On Windows ``SO_REUSEADDR`` lets a second socket steal a port that is in use; asyncio
    therefore never sets it there.  ``SO_EXCLUSIVEADDRUSE`` goes further and keeps other
    programs from binding the same port on a more specific address.
    """
    option = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    if option is not None:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)


def is_transient_accept_error(exc: OSError) -> bool:
    return isinstance(exc, ConnectionError) or os_error_code(exc) in TRANSIENT_ACCEPT_ERRORS


def accept(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> asyncio.Future[tuple[socket.socket, Any]]:
    """Start one ``AcceptEx``; the future gives ``(connection, peer address)``."""
    global _warned_fallback
    try:
        return _private.accept_with_iocp(loop, listener)
    except _private.InternalsUnavailable as exc:
        if not _warned_fallback:
            _warned_fallback = True
            logger.warning(
                "accepting through loop.sock_accept(): %s; asyncio may also report failed "
                "accepts as 'Task exception was never retrieved'",
                exc,
            )
        return asyncio.ensure_future(loop.sock_accept(listener))


def make_engine(loop: asyncio.AbstractEventLoop, *, max_read: int) -> Any:
    """The IOCP completion engine (``engine.py``); InternalsUnavailable when CPython's
    ``IocpProactor`` is not the one it was checked against."""
    from .engine import IocpEngine

    return IocpEngine(loop, max_read=max_read)


def operations(loop: asyncio.AbstractEventLoop) -> list[BackendOperation]:
    """The proactor's in-flight operations.  IOCP records no kind, size or start for its
    own; the engine's entries are described from the connection that issued them."""
    from .engine import describe_entry

    listed = []
    for future, ov, obj, callback in _private.overlapped_cache(loop):
        known = describe_entry(future, ov)
        if known is not None:
            kind, state, nbytes, started = known
            listed.append(BackendOperation(None, obj, kind, nbytes, started, state, callback))
        else:
            listed.append(BackendOperation(future, obj, None, None, None, None, callback))
    return listed
