"""Subprocesses for the io_uring loop: ``subprocess_exec``/``subprocess_shell``.

The OS model.  A child that exits stays a zombie until its parent collects its status with
``waitpid``; the parent learns of the exit through SIGCHLD (one signal for any number of
children, which any other part of the program may also be waiting on) or, since Linux 5.3,
through a *pidfd*: a descriptor naming one process, which polls readable once that process
has exited.  The loop opens a pidfd for each child it starts and watches it with a
``POLL_ADD`` (:mod:`.readiness`); when it is ready, ``waitpid`` returns at once, for that
child only, and no signal handler or thread is involved.  Where ``pidfd_open`` is refused
(ENOSYS under an old seccomp profile, EPERM...), a thread per child blocks in ``waitpid``
and hands the status to the loop with ``call_soon_threadsafe``.

asyncio's Unix loop instead asks the policy's child watcher (deprecated in 3.12, removed in
3.14).  An application that installed one (``set_child_watcher``) gets it here too, so the
two never compete for the same child's status; otherwise the loop watches its own children.

The transport itself is asyncio's (``subprocess.Popen`` with pipes connected through the
loop's ``connect_read_pipe``/``connect_write_pipe``): see
:func:`iocp_echo._private.unix_subprocess_transport`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .. import _private
from .readiness import EVENT_READ, FdWatcher

__all__ = ["ChildWatcher", "make_subprocess_transport"]

logger = logging.getLogger("iocp_echo")

#: ``os.pidfd_open``, or None where this CPython has none (a test may replace it to take the
#: thread path).
pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)


def _exit_code(status: int) -> int:
    try:
        return os.waitstatus_to_exitcode(status)
    except ValueError:  # a status waitpid should not give for an exited child
        return status


def _reap(pid: int) -> int:
    """Collect *pid*'s status (it has exited, or this blocks until it does)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        # Someone else collected it (a SIGCHLD handler calling waitpid(-1)...).
        logger.warning(
            "child process %d: its exit status was already collected; reporting returncode 255", pid
        )
        return 255
    return _exit_code(status)


class ChildWatcher:
    """The loop's own children: a pidfd watch each, or a waiting thread each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, watcher: FdWatcher) -> None:
        self._loop = loop
        self._watcher = watcher
        self._pidfds: dict[int, int] = {}  # pid -> pidfd, while watched

    def watch(self, pid: int, exited: Callable[[int], object]) -> None:
        """Call ``exited(returncode)`` on the loop once *pid* has exited and been reaped."""
        if pidfd_open is not None:
            try:
                pidfd = pidfd_open(pid)
            except OSError:
                pass  # refused here: wait in a thread
            else:
                os.set_inheritable(pidfd, False)
                self._pidfds[pid] = pidfd
                try:
                    self._watcher.add(pidfd, EVENT_READ, self._exited, (pid, exited))
                except BaseException:
                    del self._pidfds[pid]
                    os.close(pidfd)
                    raise
                return
        threading.Thread(
            target=self._wait_in_thread, args=(pid, exited), name=f"waitpid-{pid}", daemon=True
        ).start()

    @property
    def watched(self) -> int:
        """How many children are watched through a pidfd now."""
        return len(self._pidfds)

    def _exited(self, pid: int, exited: Callable[[int], object]) -> None:
        pidfd = self._pidfds.pop(pid)
        self._watcher.remove(pidfd, EVENT_READ)
        os.close(pidfd)
        exited(_reap(pid))

    def _wait_in_thread(self, pid: int, exited: Callable[[int], object]) -> None:
        returncode = _reap(pid)
        try:
            self._loop.call_soon_threadsafe(exited, returncode)
        except RuntimeError:
            pass  # the loop closed first: nobody is waiting for this child any more

    def close(self) -> None:
        """The loop closes with children still running: stop watching them, and reap each
        in a thread when it exits, so none is left a zombie."""
        for pid, pidfd in list(self._pidfds.items()):
            self._watcher.remove(pidfd, EVENT_READ)
            os.close(pidfd)
            threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()
        self._pidfds.clear()


async def make_subprocess_transport(
    loop: asyncio.AbstractEventLoop,
    children: ChildWatcher,
    protocol: asyncio.SubprocessProtocol,
    args: Any,
    shell: bool,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    bufsize: int,
    extra: dict[str, Any] | None,
    **kwargs: Any,
) -> asyncio.SubprocessTransport:
    """Start the child, watch it, and return its transport once its pipes are connected."""
    transport_class = _private.unix_subprocess_transport()

    def spawn(waiter: asyncio.Future[Any]) -> Any:
        return transport_class(
            loop,
            protocol,
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            waiter=waiter,
            extra=extra,
            **kwargs,
        )

    installed = _private.installed_child_watcher(asyncio.get_event_loop_policy())
    if installed is not None:
        return await _with_installed_watcher(loop, installed, spawn)
    waiter = loop.create_future()
    transport = spawn(waiter)
    children.watch(transport.get_pid(), transport._process_exited)
    await _connected(transport, waiter)
    return transport  # type: ignore[no-any-return]


async def _with_installed_watcher(
    loop: asyncio.AbstractEventLoop,
    watcher: Any,
    spawn: Callable[[asyncio.Future[Any]], Any],
) -> asyncio.SubprocessTransport:
    """As asyncio's Unix loop does with the policy's watcher."""
    with watcher as entered:
        if sys.version_info < (3, 12):
            watcher = entered  # 3.11 uses what __enter__ returns (the same object, unmocked)
        if not watcher.is_active():
            # Refused before the child exists: nothing would ever report its exit.
            raise RuntimeError(
                "the installed child watcher is not active (asyncio.set_child_watcher()): "
                "subprocesses cannot be watched"
            )
        waiter = loop.create_future()
        transport = spawn(waiter)

        def exited(pid: int, returncode: int, transport: Any) -> None:
            loop.call_soon_threadsafe(transport._process_exited, returncode)

        watcher.add_child_handler(transport.get_pid(), exited, transport)
        await _connected(transport, waiter)
    return transport  # type: ignore[no-any-return]


async def _connected(transport: asyncio.SubprocessTransport, waiter: asyncio.Future[Any]) -> None:
    try:
        await waiter
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        # The pipes could not be connected (or the caller was cancelled): the child must not
        # outlive its transport.
        transport.close()
        await transport._wait()  # type: ignore[attr-defined]
        raise
