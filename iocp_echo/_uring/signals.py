"""Signal handlers for the io_uring loop: ``add_signal_handler``/``remove_signal_handler``.

The OS model.  A POSIX signal interrupts whatever the thread is doing; the only safe thing a
handler can do is note the signal.  CPython's C-level handler does that and, when a wake-up
descriptor is set (``signal.set_wakeup_fd``), writes the signal number there as one byte;
its Python-level handler runs later, between two bytecodes of the main thread.  The loop
spends its idle time inside ``io_uring_enter``, which a signal ends with EINTR; the ring
enters again at once (see ``Ring.enter``), but by then the byte is waiting in the loop's
self-pipe socket, on which a ``RECV`` is always in flight (``_loop_self_reading``): that
receive completes and the enter returns.  ``BaseProactorEventLoop`` already makes the
self-pipe's write end the wake-up descriptor (main thread only) and reads it; here the bytes
it reads are taken as signal numbers and each registered handler is queued on the loop.  The
zero bytes ``call_soon_threadsafe`` writes to wake the loop are not signals and are skipped.

The wake-up descriptor is one per process.  ``BaseProactorEventLoop`` takes it for every loop
it makes in the main thread and gives it up (to none) when any such loop closes; a loop made
and closed beside a running one would so silence the running loop's signals.  Here, as on
asyncio's Unix loop, it belongs to the loop that last added a signal handler: a new loop does
not take it from another, and a closing loop gives back one that is not its own
(:func:`current_wakeup_fd`, :func:`restore_wakeup_fd`).

A handled signal's Python-level handler is a no-op: the work is done on the loop, in order,
where it may touch the application's state.  Removing the last handler of a signal restores
the default disposition (``default_int_handler`` for SIGINT, as Python starts with), and a
closing loop removes every handler it installed.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["SignalHandlers", "current_wakeup_fd", "restore_wakeup_fd"]


def _noop(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler of a signal the loop handles: the byte in the wake-up
    descriptor is what counts."""


class SignalHandlers:
    """The signals one loop handles, and the handles that run for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wakeup_fd: Callable[[], int]) -> None:
        self._loop = loop
        self._wakeup_fd = wakeup_fd  # the self-pipe's write end, asked when needed
        self._handlers: dict[int, asyncio.Handle] = {}

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def add(self, sig: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Run ``callback(*args)`` on the loop each time *sig* arrives.

        TypeError for a coroutine function; ValueError for a number that is not a signal;
        RuntimeError outside the main thread or for a signal that cannot be caught (SIGKILL,
        SIGSTOP).
        """
        if asyncio.iscoroutine(callback) or inspect.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        _check_signal(sig)
        try:
            # Raises ValueError outside the main thread, before anything is changed.
            signal.set_wakeup_fd(self._wakeup_fd())
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        previous = self._handlers.get(sig)
        self._handlers[sig] = asyncio.Handle(callback, args, self._loop)
        try:
            signal.signal(sig, _noop)
            # SA_RESTART: a handled signal should not fail the program's other system calls
            # with EINTR.
            signal.siginterrupt(sig, False)
        except OSError as exc:
            if previous is None:
                del self._handlers[sig]
            else:
                self._handlers[sig] = previous
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught") from None
            raise

    def remove(self, sig: int) -> bool:
        """Stop handling *sig* and restore its default; False if the loop did not handle it."""
        _check_signal(sig)
        handle = self._handlers.pop(sig, None)
        if handle is None:
            return False
        handle.cancel()
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, default)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig} cannot be caught") from None
            raise
        return True

    def deliver(self, data: bytes) -> None:
        """The self-pipe's bytes, read on the loop: queue the handler of each signal."""
        for sig in data:
            if not sig:
                continue  # a wake-up from call_soon_threadsafe
            handle = self._handlers.get(sig)
            if handle is None:
                continue  # removed since the signal came
            self._loop._add_callback(handle)  # type: ignore[attr-defined]

    def close(self) -> None:
        """The loop closes: restore every signal it handled."""
        if sys.is_finalizing():
            if self._handlers:
                warnings.warn(
                    f"closing {self._loop!r} while the interpreter shuts down: its signal "
                    "handlers are left installed",
                    ResourceWarning,
                    source=self._loop,
                    stacklevel=2,
                )
            self._handlers.clear()
            return
        for sig in list(self._handlers):
            self.remove(sig)


def current_wakeup_fd() -> int | None:
    """The process's signal wake-up descriptor (-1: none), or None outside the main thread,
    where it cannot be set.  (Python has no getter: it is swapped out and back, two calls in
    which a signal would find none.)"""
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.set_wakeup_fd(-1)
    if current != -1:
        try:
            signal.set_wakeup_fd(current)
        except (OSError, ValueError):
            return -1  # a descriptor closed since (a loop collected unclosed): nobody's
    return current


def restore_wakeup_fd(previous: int | None, own: int) -> None:
    """After asyncio took or cleared the wake-up descriptor: give back *previous* if it was
    another's (another loop's, another library's)."""
    if previous is not None and previous not in (-1, own):
        try:
            signal.set_wakeup_fd(previous)
        except (OSError, ValueError):
            pass  # closed meanwhile: there is nothing to give back


def _check_signal(sig: object) -> None:
    if not isinstance(sig, int):
        raise TypeError(f"sig must be an int, not {sig!r}")
    if sig not in signal.valid_signals():
        raise ValueError(f"invalid signal number {sig}")
