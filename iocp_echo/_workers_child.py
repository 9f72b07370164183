"""One worker process of :func:`iocp_echo.run_workers`: an echo server on a listener it was given.

The OS model.  The parent opened the listening sockets; a worker only ever receives them.

Windows: the parent accepts every connection itself and hands each one to a worker in turn
(``_listener_sharing.py`` says why, and does both ends of it): it calls ``socket.share(pid)``
(Winsock's ``WSADuplicateSocket``) on the connection for this worker's pid and sends the
result down the control pipe; the worker rebuilds it with ``socket.fromshare()`` and gives it
to its server (``EchoServer.adopt()``, on the loop), where the completion engine serves it
(the connection is a new socket, free to join this worker's completion port).  The worker
never accepts: it is given one listener (shared the same way) only so that its server has an
address, and runs with ``serve(..., accept=False)``.

Linux: the parent opened one set of listeners per worker in a ``SO_REUSEPORT`` group, and this
worker's arrive as inherited file descriptors; its io_uring accepts on them, and the kernel's
reuseport hash spreads the connections over the group.

One server per worker, whatever the number of listeners (a host such as ``None`` or
``localhost`` gives one per address family): ``max_connections`` is this worker's share of the
whole server's limit, and one server (``serve(sock=[...])``) holds it over all the listeners.

The control channel is the worker's stdin and stdout (``_worker_protocol.py`` has its
messages), read by a plain thread.

End of file on stdin means the parent is gone: the worker shuts down gracefully, so a
supervisor killed outright does not leave workers serving behind it.  Ctrl-C and Ctrl-Break
are ignored here (a console or terminal delivers them to every process in it): the parent
decides when workers stop, which is what lets a second Ctrl-C force the shutdown.  SIGTERM
(POSIX) stops the worker gracefully, as the parent's ``stop`` does: a service manager that
signals every process of the service (systemd's ``KillMode=control-group``) gets the same
drain as one that signals the parent only.  (On Windows there is no SIGTERM to catch:
``os.kill`` and service managers end a process with ``TerminateProcess``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, TextIO

from . import loops
from ._listener_sharing import HANDS_OUT, receive_connection, receive_listener
from ._transport import DEFAULT_WRITE_HIGH_WATER
from ._worker_protocol import (
    Ready,
    SnapshotReply,
    ToSupervisor,
    address_from_json,
    decode,
    encode,
    snapshot_of,
)
from .protocol import DEFAULT_MAX_READ, EchoProtocol
from .proxy_protocol import DEFAULT_HEADER_TIMEOUT, DEFAULT_TRUSTED
from .server import DEFAULT_SHUTDOWN_TIMEOUT, EchoServer, serve

__all__ = ["main"]

logger = logging.getLogger("iocp_echo.workers")


class _Channel:
    """Lines to the parent, written whole from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: ToSupervisor) -> None:
        line = encode(message)
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # the parent is gone: the stdin reader sees EOF and stops the worker


async def _serve(
    config: dict[str, Any],
    listeners: list[socket.socket],
    out: _Channel,
    stopped: asyncio.Event,
    terminated: asyncio.Event,
) -> None:
    """Serve until *stopped* is set (by the parent's ``stop`` or its end), or, after
    *terminated* (this worker's own SIGTERM), for ``drain_seconds`` more while not ready."""
    loop = asyncio.get_running_loop()
    options = dict(config["options"])
    handed = HANDS_OUT  # the parent accepts and hands connections over
    max_read = int(options.get("max_read", DEFAULT_MAX_READ))
    try:
        server = await serve(
            lambda: EchoProtocol(max_read=max_read),
            max_read=max_read,
            max_connections=options.get("max_connections"),
            idle_timeout=options.get("idle_timeout"),
            write_high_water=int(options.get("write_high_water", DEFAULT_WRITE_HIGH_WATER)),
            shutdown_timeout=float(options.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)),
            proxy_protocol=bool(options.get("proxy_protocol", False)),
            proxy_from=options.get("proxy_from", DEFAULT_TRUSTED),
            proxy_header_timeout=float(options.get("proxy_header_timeout", DEFAULT_HEADER_TIMEOUT)),
            # Linux: all this worker's listeners (one per address family), one server, one
            # share of max_connections.  Windows: the parent accepts; the first listener
            # only names the address in logs.
            sock=listeners[:1] if handed else listeners,
            accept=not handed,
        )
    except BaseException:
        for listener in listeners:
            listener.close()
        raise

    def adopt(conn: socket.socket, peer: Any) -> None:
        server.adopt(conn, peer)  # closes it at once if the server is closing

    def answer(request: dict[str, Any]) -> None:
        limit = int(request.get("limit", 0))
        out.send(SnapshotReply(id=request["id"], snapshot=snapshot_of(server, limit)))

    def read_commands() -> None:
        for line in sys.stdin:
            request = decode(line)
            if request is None:
                continue
            op = request.get("op")
            if op == "connection":
                try:
                    conn = receive_connection(request["share"])
                except OSError as exc:
                    logger.warning("cannot take a connection from the parent: %s", exc)
                    continue
                try:
                    loop.call_soon_threadsafe(adopt, conn, address_from_json(request.get("peer")))
                except RuntimeError:  # the loop has closed
                    conn.close()
            elif op == "snapshot":
                loop.call_soon_threadsafe(answer, request)
            elif op == "stop":
                break
        with contextlib.suppress(RuntimeError):  # asked to stop, or the parent went away
            loop.call_soon_threadsafe(stopped.set)

    threading.Thread(target=read_commands, name="iocp_echo worker control", daemon=True).start()
    out.send(
        Ready(
            event="ready",
            pid=os.getpid(),
            backend=server.backend_name,
            engine=server.engine_name,
        )
    )
    try:
        await _until_stopped(server, stopped, terminated, float(options.get("drain_seconds", 0)))
    finally:
        server.close()
        for listener in listeners[1:] if handed else ():
            listener.close()  # never served here (the server closes its own)
        await server.wait_closed()


async def _until_stopped(
    server: EchoServer, stopped: asyncio.Event, terminated: asyncio.Event, drain_seconds: float
) -> None:
    """Wait for the parent's stop; a SIGTERM of our own first drains for *drain_seconds*
    (not ready, still serving; the parent's stop cuts it short), as the parent would."""
    stop = asyncio.ensure_future(stopped.wait())
    term = asyncio.ensure_future(terminated.wait())
    try:
        await asyncio.wait({stop, term}, return_when=asyncio.FIRST_COMPLETED)
        if not stopped.is_set() and drain_seconds > 0:
            server.start_draining()
            await asyncio.wait({stop}, timeout=drain_seconds)
    finally:
        stop.cancel()
        term.cancel()


async def _run(config: dict[str, Any], listeners: list[socket.socket], out: _Channel) -> None:
    """:func:`_serve`, stopping gracefully on SIGTERM too (POSIX; see the module docstring)."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    sigterm = asyncio.Event()
    if sys.platform == "win32":
        await _serve(config, listeners, out, stopped, sigterm)
        return

    def terminated() -> None:
        if not sigterm.is_set():
            logger.info("SIGTERM: stopping gracefully")
            sigterm.set()

    def handler(signum: int, frame: object) -> None:
        # In the main thread between two bytecodes: only schedule the stop.
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(terminated)

    signal.signal(signal.SIGTERM, handler)
    if _terminated.is_set():  # SIGTERM came before the loop ran
        terminated()
    try:
        await _serve(config, listeners, out, stopped, sigterm)
    finally:
        # Drained: a SIGTERM from now on (a service manager signalling every process just as
        # the parent's stop let this one finish) has nothing left to stop.  Ignored, not the
        # default action, which CPython restores for Python handlers as the process exits
        # and which would make a clean stop look like a death by SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: A SIGTERM that arrives before the loop runs (while the worker starts up) is kept here.
_terminated = threading.Event()


def main() -> int:
    """Run one worker: read its configuration from stdin, serve until told to stop."""
    for name in ("SIGINT", "SIGBREAK"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
    if sys.platform != "win32":
        # Until the loop takes SIGTERM over (_run), remember it instead of dying at once.
        signal.signal(signal.SIGTERM, lambda signum, frame: _terminated.set())
    out = _Channel(sys.stdout)
    config = decode(sys.stdin.readline())
    if config is None:
        return 2  # started by hand, or the parent died before configuring it
    label = f"worker {config['worker']}, pid {os.getpid()}"
    logging.basicConfig(
        level=int(config["log_level"]),
        format=f"%(asctime)s %(levelname)s %(name)s ({label}): %(message)s",
        stream=sys.stderr,
    )
    listeners = [receive_listener(spec) for spec in config["listeners"]]
    try:
        loops.run(_run(config, listeners, out))
    except Exception as exc:
        logger.error("%s cannot serve: %s: %s", label, type(exc).__name__, exc, exc_info=exc)
        return 3
    return 0
