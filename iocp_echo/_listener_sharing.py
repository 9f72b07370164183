"""How the listening sockets and the connections of ``run_workers()`` reach the workers, per OS.

The supervisor opens every listening socket itself, before any worker starts, so that a bad or
busy port is reported once.  How a worker then gets to serve that port differs by OS, and this
module is the one place the worker pool makes that choice: both the supervisor
(``workers.py``) and the worker (``_workers_child.py``) ask it.

- Windows (:data:`HANDS_OUT`): the supervisor accepts (``AcceptEx`` on its own completion
  port, :class:`HandOut`) and hands each connection to the next ready worker in turn, as a
  handle duplicated for that worker (:func:`share`, Winsock's ``WSADuplicateSocket``) sent down
  its control pipe; the worker rebuilds it (:func:`receive_connection`) and serves it on its
  own completion port.  Workers cannot all accept on the one listener: a socket joins one
  completion port only, and with a blocking ``accept()`` per worker nothing spreads the
  connections (measured under Wine: one worker took 100 of 100 connections in about one run
  in five).  Handing them out in turn spreads them exactly.  A worker is still given the
  first listener (shared the same way) so that its server has an address.
- Linux: one set of listeners per worker, all on the port in a ``SO_REUSEPORT`` group, each
  inherited by its worker as file descriptors; the kernel's reuseport hash spreads the
  connections.  (One inherited socket accepted on by every worker's io_uring gave the first
  worker every connection, measured.)
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from ._accepting import ACCEPT_ERROR_BACKOFF, ACCEPTS_IN_FLIGHT
from ._backend import Backend
from ._logflood import LogLimiter
from ._worker_protocol import ListenerSpec
from .errors import os_error_code
from .listeners import format_address, open_listeners

__all__ = [
    "HANDS_OUT",
    "HandOut",
    "close_listener_sets",
    "inherited_fds",
    "listener_specs",
    "open_listener_sets",
    "receive_connection",
    "receive_listener",
    "share",
    "worker_listeners",
]

#: Windows: the supervisor accepts every connection and hands each to a worker; workers
#: never accept.  Elsewhere each worker accepts on its own listeners.
HANDS_OUT = sys.platform == "win32"


def open_listener_sets(
    backend: Backend, workers: int, host: str, port: int, backlog: int
) -> dict[int, list[socket.socket]]:
    """The listening sockets of workers 1..*workers*, opened now so errors are reported once.

    Windows: one set of listeners, on which the supervisor accepts for every worker.  Linux:
    one set per worker in a ``SO_REUSEPORT`` group on the same port, each inherited by its
    worker, because measured on this project's kernel one inherited socket gave io_uring's
    accepts in the first worker every connection (500 of 500) while the reuseport group's
    hash spreads them.  The supervisor keeps every set open, so the connections the kernel
    queues for a worker being restarted wait for it instead of being reset.
    """
    reuseport = getattr(socket, "SO_REUSEPORT", None) if sys.platform != "win32" else None

    def prepare(sock: socket.socket) -> None:
        backend.prepare_listener(sock)
        if reuseport is not None:
            sock.setsockopt(socket.SOL_SOCKET, reuseport, 1)

    sets: dict[int, list[socket.socket]] = {}
    try:
        for index in range(1, workers + 1):
            if reuseport is None and sets:
                sets[index] = sets[1]
                continue
            opened = open_listeners(host, port, backlog, prepare)
            sets[index] = opened
            port = opened[0].getsockname()[1]  # port 0: the one the OS chose, for all
    except BaseException:
        close_listener_sets(sets)
        raise
    return sets


def close_listener_sets(sets: dict[int, list[socket.socket]]) -> None:
    for listeners in sets.values():
        for listener in listeners:
            listener.close()


def worker_listeners(sets: dict[int, list[socket.socket]], index: int) -> list[socket.socket]:
    """What worker *index* is given.  When the supervisor hands connections out, the worker
    never accepts, but its server still needs a listener to be (its address, in logs and
    snapshots): the first one."""
    listeners = sets[index]
    return listeners[:1] if HANDS_OUT else listeners


def inherited_fds(listeners: list[socket.socket]) -> list[int]:
    """The descriptors a new worker process must inherit (``Popen(pass_fds=...)``)."""
    return [] if sys.platform == "win32" else [s.fileno() for s in listeners]


def listener_specs(listeners: list[socket.socket], pid: int) -> list[ListenerSpec]:
    """*listeners* described for the worker process *pid*, which received them as above."""
    if sys.platform == "win32":
        return [ListenerSpec(share=share(s, pid)) for s in listeners]
    return [ListenerSpec(fd=s.fileno()) for s in listeners]


def share(conn: socket.socket, pid: int) -> str:
    """*conn* duplicated for process *pid* (``socket.share``), as text for the control pipe."""
    if sys.platform != "win32":
        raise OSError(f"sockets are handed to workers on Windows only, not {sys.platform}")
    return base64.b64encode(conn.share(pid)).decode()


def receive_listener(spec: ListenerSpec) -> socket.socket:
    """In a worker: the listening socket the supervisor described in *spec*."""
    if sys.platform == "win32":
        return socket.fromshare(base64.b64decode(spec["share"]))
    return socket.socket(fileno=int(spec["fd"]))


def receive_connection(shared: str) -> socket.socket:
    """In a worker, on Windows: a connection the supervisor accepted and duplicated for it."""
    if sys.platform != "win32":
        raise OSError(f"connections are handed to workers on Windows only, not {sys.platform}")
    return socket.fromshare(base64.b64decode(shared))


class HandOut:
    """Windows: the supervisor's accepts, each connection given to *give* (which chooses the
    worker).  Accepting runs only while some worker is ready to take a connection
    (:meth:`resume` / :meth:`pause`): while none is (all being restarted), clients wait in
    the listen backlog instead of being accepted and dropped."""

    def __init__(
        self, backend: Backend, log: LogLimiter, give: Callable[[socket.socket, Any], None]
    ) -> None:
        self._backend = backend
        self._log = log
        self._give = give
        self._some_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def start(self, listeners: list[socket.socket]) -> None:
        """Keep ACCEPTS_IN_FLIGHT accepts on each of *listeners* (on the running loop)."""
        for listener in listeners:
            for _ in range(ACCEPTS_IN_FLIGHT):
                self._tasks.append(asyncio.create_task(self._accept(listener)))

    def resume(self) -> None:
        """A worker is ready: accept."""
        self._some_ready.set()

    def pause(self) -> None:
        """No worker is ready: leave connections in the backlog."""
        self._some_ready.clear()

    def stop(self) -> None:
        """Accept no more (see :meth:`wait_stopped`)."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        self._some_ready.clear()

    async def wait_stopped(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._some_ready.wait()
            future = self._backend.accept(loop, listener)
            try:
                conn, address = await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled() and future.exception() is None:
                    future.result()[0].close()  # accepted just as we were cancelled
                elif not future.done():
                    future.cancel()
                raise
            except OSError as exc:
                if self._stopped:
                    return
                transient = self._backend.is_transient_accept_error(exc)
                self._log.log(
                    "accept failed",
                    logging.WARNING if transient else logging.ERROR,
                    "accept on %s failed: %s (OS error %s); %s",
                    format_address(listener.getsockname()),
                    exc,
                    os_error_code(exc),
                    "still accepting" if transient else f"retrying in {ACCEPT_ERROR_BACKOFF:.1f} s",
                    error_class=type(exc).__name__,
                )
                if not transient:
                    await asyncio.sleep(ACCEPT_ERROR_BACKOFF)
                continue
            self._give(conn, address)
