"""Readiness on io_uring: ``add_reader``/``add_writer`` for descriptors the loop does not own.

The OS model.  io_uring answers readiness with ``IORING_OP_POLL_ADD``: the kernel checks the
file's poll mask when the entry is submitted and, if nothing is ready, hooks the file's wait
queue; a wake-up that makes the asked events true posts one CQE whose result is the mask.  A
poll is therefore a *completion* ("this descriptor became ready"), not a state the loop can
ask about, and it holds its own reference to the file: closing the descriptor does not end it.

asyncio's ``add_reader`` contract is level-triggered: the selector loop calls the callback in
every iteration in which the descriptor is ready, so a callback may read part of what is
waiting and be called again for the rest.  A *multishot* poll (``IORING_POLL_ADD_MULTI``,
5.13) does not give that: it posts a CQE per wake-up, and no wake-up comes for data that is
already waiting (tried on 6.18: one pipe byte left unread gives one CQE across four waiting
``io_uring_enter`` calls; ``IORING_POLL_ADD_LEVEL`` with it is refused, EINVAL).  So each
watch is a *one-shot* poll, submitted again from its own completion.  The new entry is only
written to the submission ring there; the kernel sees it at the next ``io_uring_enter``,
after this iteration has run the callback, and checks the mask then: a descriptor still ready
completes at once, which is the selector loop's level-triggered behaviour at no extra system
call (the entry rides with the loop's one ``io_uring_enter`` per iteration).

Callbacks are :class:`asyncio.Handle` objects queued on the loop's ready queue, as the
selector loop queues them, so removing a watch cancels a callback already queued.
"""

from __future__ import annotations

import asyncio
import errno
import selectors
from collections.abc import Callable
from typing import Any, Final

from . import abi
from .proactor import UringProactor

__all__ = ["EVENT_READ", "EVENT_WRITE", "FdWatcher", "fileobj_to_fd"]

EVENT_READ: Final = selectors.EVENT_READ
EVENT_WRITE: Final = selectors.EVENT_WRITE
_POLLIN: Final = 0x001
_POLLOUT: Final = 0x004


def fileobj_to_fd(fileobj: Any) -> int:
    """The descriptor of an ``int`` or of an object with ``fileno()``, as selectors take it."""
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class _Watch:
    """One descriptor watched in one direction: its handle and its poll in flight."""

    __slots__ = ("armed", "events", "fd", "handle")

    def __init__(self, fd: int, events: int, handle: asyncio.Handle) -> None:
        self.fd = fd
        self.events = events  # EVENT_READ or EVENT_WRITE
        self.handle = handle
        self.armed: int | None = None  # the user_data of the poll in flight

    def fileno(self) -> int:
        """The proactor asks the operation's owner for its descriptor (-1: gone)."""
        return self.fd


class FdWatcher:
    """The loop's readiness watches: at most one reader and one writer per descriptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proactor: UringProactor) -> None:
        self._loop = loop
        self._proactor = proactor
        self._watches: dict[int, dict[int, _Watch]] = {EVENT_READ: {}, EVENT_WRITE: {}}

    def add(
        self, fd: int, events: int, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> asyncio.Handle:
        """Watch *fd* for *events* (one direction); a watch already there is replaced and its
        queued callback, if any, cancelled (as the selector loop does)."""
        handle = asyncio.Handle(callback, args, self._loop)
        watches = self._watches[events]
        watch = watches.get(fd)
        if watch is not None:
            watch.handle.cancel()
            watch.handle = handle
            if watch.armed is not None:
                return handle  # the poll in flight serves the new callback
        else:
            watch = watches[fd] = _Watch(fd, events, handle)
        try:
            self._arm(watch)
        except BaseException:
            del watches[fd]
            raise
        return handle

    def remove(self, fd: int, events: int) -> bool:
        """Stop watching; True if there was a watch.  Its queued callback is cancelled."""
        watch = self._watches[events].pop(fd, None)
        if watch is None:
            return False
        watch.handle.cancel()
        armed, watch.armed = watch.armed, None
        if armed is not None and not self._proactor.closing:
            self._proactor.cancel_direct(armed)
        return True

    def watching(self, fd: int, events: int) -> bool:
        """Is *fd* watched for *events* (a callback registered, not removed)?"""
        return fd in self._watches[events]

    def close(self) -> None:
        """Forget every watch (the proactor's close cancels the polls in flight)."""
        for events in (EVENT_READ, EVENT_WRITE):
            for fd in list(self._watches[events]):
                self.remove(fd, events)

    def _arm(self, watch: _Watch) -> None:
        mask = _POLLIN if watch.events == EVENT_READ else _POLLOUT

        def ready(res: int, _flags: int) -> None:
            if watch.armed != user_data:
                return  # removed, or replaced by a newer poll
            watch.armed = None
            if res < 0:
                if res == -errno.ECANCELED:
                    return
                # The descriptor is not pollable any more (closed under the watch, EBADF):
                # the callback runs once and finds out; the watch stays, unarmed, for
                # remove_reader/remove_writer to find.
                self._queue(watch)
                return
            if not self._proactor.closing:
                self._arm(watch)  # checked by the kernel after this iteration's callbacks
            self._queue(watch)

        user_data = self._proactor.submit_direct(
            abi.IORING_OP_POLL_ADD,
            watch,
            ready,
            kind="reader" if watch.events == EVENT_READ else "writer",
            op_flags=mask,
        )
        watch.armed = user_data

    def _queue(self, watch: _Watch) -> None:
        handle = watch.handle
        if handle.cancelled():
            self.remove(watch.fd, watch.events)
        else:
            self._loop._add_callback(handle)  # type: ignore[attr-defined]
