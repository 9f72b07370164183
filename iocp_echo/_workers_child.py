"""One worker process of :func:`iocp_echo.run_workers`: an echo server on a listener it was given.

The OS model.  The parent opened the listening sockets; a worker only ever receives them.

Windows: a socket handle is per process, so the parent calls ``socket.share(pid)`` (Winsock's
``WSADuplicateSocket``) for this worker's pid and the worker rebuilds it with
``socket.fromshare()``.  Every worker then holds a handle to the *same* socket, and a socket
can be associated with one completion port only: the first worker to post ``AcceptEx`` on it
would own it, and every other worker's association fails with ``ERROR_INVALID_PARAMETER``
(WinError 87: seen under Wine, and what libuv's handling of imported sockets on Windows
expects).  So a worker accepts in a thread, with a plain blocking ``accept()`` that needs no
completion port, and hands each connection to its loop, where the completion engine serves it
(the connection is a new socket, free to join this worker's port).  The kernel gives each
connection to one of the waiting ``accept()`` calls, whichever worker's it is.

Linux: the parent opened one listener per worker in a ``SO_REUSEPORT`` group, and this
worker's arrives as an inherited file descriptor; its io_uring accepts on it as usual, and the
kernel's reuseport hash spreads the connections over the group.

The control channel is the worker's stdin and stdout, one JSON object per line, read by a
plain thread: a pipe handed to a child process on Windows is not overlapped, so the event
loop's completion port cannot read it, and a thread works the same on both systems.

- parent -> worker: first the configuration (options, listener, label, log level); then
  ``{"op": "snapshot", "id": N, "limit": L}`` or ``{"op": "stop"}``.
- worker -> parent: ``{"event": "ready", ...}`` once serving; ``{"id": N, "snapshot": ...}``
  per request.

End of file on stdin means the parent is gone: the worker shuts down gracefully, so a
supervisor killed outright does not leave workers serving behind it.  Ctrl-C and Ctrl-Break
are ignored here (a console or terminal delivers them to every process in it): the parent
decides when workers stop, which is what lets a second Ctrl-C force the shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any, TextIO

from . import introspection, loops
from ._transport import DEFAULT_WRITE_HIGH_WATER
from .errors import os_error_code
from .listeners import format_address
from .protocol import DEFAULT_MAX_READ, EchoProtocol
from .server import ACCEPT_ERROR_BACKOFF, DEFAULT_SHUTDOWN_TIMEOUT, EchoServer, serve, serve_echo

__all__ = ["main"]

logger = logging.getLogger("iocp_echo.workers")


def _receive_listener(spec: dict[str, Any]) -> socket.socket:
    """The listening socket the parent described in *spec* (see the module docstring)."""
    if sys.platform == "win32":
        return socket.fromshare(base64.b64decode(spec["share"]))
    return socket.socket(fileno=int(spec["fd"]))


def _snapshot(servers: list[EchoServer], limit: int) -> dict[str, Any]:
    """This worker's stats (summed over its servers) and its *limit* oldest operations."""
    totals: dict[str, Any] = {}
    for server in servers:
        for key, value in dataclasses.asdict(server.stats()).items():
            if isinstance(value, dict):
                merged = Counter(totals.get(key, {}))
                merged.update(value)
                totals[key] = dict(merged)
            elif key == "oldest_pending_age":
                totals[key] = max(totals.get(key, 0.0), value)
            elif key == "pending_unavailable":
                totals[key] = totals.get(key) or value
            else:
                totals[key] = totals.get(key, 0) + value
    operations: list[dict[str, Any]] = []
    unavailable: str | None = None
    try:
        found = [op for server in servers for op in server.pending_operations()]
    except introspection.IntrospectionUnavailable as exc:
        found, unavailable = [], str(exc)
    found.sort(key=lambda op: -op.age)
    operations = [op.as_dict() for op in found[:limit]]
    return {
        "stats": totals,
        "operations": operations,
        "operations_total": len(found),
        "operations_unavailable": unavailable,
        "serving": any(server.is_serving() for server in servers),
    }


def _accept_in_thread(server: EchoServer, listener: socket.socket) -> None:
    """Accept on *listener* in a thread until it is closed, handing each client to *server*
    on its loop (``EchoServer.adopt``): see the module docstring, Windows."""
    loop = asyncio.get_running_loop()
    listener.setblocking(True)
    local = format_address(listener.getsockname())

    def accept() -> None:
        while True:
            try:
                conn, address = listener.accept()
            except OSError as exc:
                if listener.fileno() == -1 or not server.is_serving():
                    return  # closed by close(): the accept was interrupted
                logger.warning(
                    "accept on %s failed: %s (OS error %s); retrying in %.1f s",
                    local,
                    exc,
                    os_error_code(exc),
                    ACCEPT_ERROR_BACKOFF,
                )
                time.sleep(ACCEPT_ERROR_BACKOFF)  # this thread only: the loop runs on
                continue
            try:
                loop.call_soon_threadsafe(server.adopt, conn, address)
            except RuntimeError:  # the loop has closed
                conn.close()
                return

    threading.Thread(target=accept, name="iocp_echo accept", daemon=True).start()


async def _serve_handed(listener: socket.socket, options: dict[str, Any]) -> EchoServer:
    """Windows: an echo server on *listener*, accepting in a thread (module docstring)."""
    max_read = int(options.get("max_read", DEFAULT_MAX_READ))
    server = await serve(
        lambda: EchoProtocol(max_read=max_read),
        max_read=max_read,
        max_connections=options.get("max_connections"),
        idle_timeout=options.get("idle_timeout"),
        write_high_water=int(options.get("write_high_water", DEFAULT_WRITE_HIGH_WATER)),
        shutdown_timeout=float(options.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)),
        sock=listener,
        accept=False,
    )
    _accept_in_thread(server, listener)
    return server


class _Channel:
    """Lines to the parent, written whole from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # the parent is gone: the stdin reader sees EOF and stops the worker


async def _serve(config: dict[str, Any], listeners: list[socket.socket], out: _Channel) -> None:
    loop = asyncio.get_running_loop()
    options = dict(config["options"])
    servers: list[EchoServer] = []
    try:
        for listener in listeners:
            if sys.platform == "win32":
                servers.append(await _serve_handed(listener, options))
            else:
                servers.append(await serve_echo(sock=listener, **options))
    except BaseException:
        for server in servers:
            server.close()
        for listener in listeners[len(servers) :]:
            listener.close()
        raise
    stopped = asyncio.Event()

    def stop() -> None:
        for server in servers:
            server.close()
        stopped.set()

    def answer(request: dict[str, Any]) -> None:
        limit = int(request.get("limit", 0))
        out.send({"id": request["id"], "snapshot": _snapshot(servers, limit)})

    def read_commands() -> None:
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if request.get("op") == "snapshot":
                loop.call_soon_threadsafe(answer, request)
            elif request.get("op") == "stop":
                break
        loop.call_soon_threadsafe(stop)  # asked to stop, or the parent went away (EOF)

    threading.Thread(target=read_commands, name="iocp_echo worker control", daemon=True).start()
    first = servers[0]
    out.send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "backend": first.backend_name,
            "engine": first.engine_name,
        }
    )
    await stopped.wait()
    for server in servers:
        await server.wait_closed()


def main() -> int:
    """Run one worker: read its configuration from stdin, serve until told to stop."""
    for name in ("SIGINT", "SIGBREAK"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
    out = _Channel(sys.stdout)
    config = json.loads(sys.stdin.readline() or "null")
    if not isinstance(config, dict):
        return 2  # started by hand, or the parent died before configuring it
    label = f"worker {config['worker']}, pid {os.getpid()}"
    logging.basicConfig(
        level=int(config["log_level"]),
        format=f"%(asctime)s %(levelname)s %(name)s ({label}): %(message)s",
        stream=sys.stderr,
    )
    listeners = [_receive_listener(spec) for spec in config["listeners"]]
    try:
        loops.run(_serve(config, listeners, out))
    except Exception as exc:
        logger.error("%s cannot serve: %s: %s", label, type(exc).__name__, exc, exc_info=exc)
        return 3
    return 0
