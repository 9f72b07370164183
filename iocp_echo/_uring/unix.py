"""Unix-domain stream sockets for the io_uring loop: ``create_unix_server`` and
``create_unix_connection``.

The OS model.  An ``AF_UNIX`` stream socket is a socket like a TCP one to io_uring: ``ACCEPT``,
``RECV``, ``SEND`` and the connect readiness poll work on it unchanged, so the loop serves it
with the same proactor operations (and ``sock_*`` calls) as TCP.  What differs is the address:
a filesystem path, which ``bind`` creates as a socket file and nothing removes when the
socket closes (a stale file makes the next ``bind`` fail with EADDRINUSE), or a name in
Linux's abstract namespace (a leading NUL byte), which has no file and vanishes with the
socket.  So a server removes a stale socket file before binding its path and, on 3.13's
``cleanup_socket`` terms, removes its own file when it stops serving, but only if the file
there is still the one it created (same inode): another server may have replaced it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UnixSockets"]

logger = logging.getLogger("iocp_echo")

#: asyncio's Unix loop removes its server's socket file on close from 3.13 on.
CLEANUP_DEFAULT = sys.version_info >= (3, 13)


def _is_abstract(path: str | bytes) -> bool:
    return len(path) > 0 and path[0] in (0, "\x00")


def _check_stream_socket(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")


class UnixSockets:
    """One loop's Unix-domain servers and connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cleanup: dict[socket.socket, int] = {}  # listening socket -> its file's inode

    async def create_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | bytes | os.PathLike[Any] | None,
        *,
        ssl: Any,
        sock: socket.socket | None,
        server_hostname: str | None,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            address = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await self._loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        elif sock is None:
            raise ValueError("no path and sock were specified")
        else:
            _check_stream_socket(sock)
            sock.setblocking(False)
        options: dict[str, Any] = {}
        if ssl:
            options = {
                "ssl": ssl,
                "server_hostname": server_hostname,
                "ssl_handshake_timeout": ssl_handshake_timeout,
                "ssl_shutdown_timeout": ssl_shutdown_timeout,
            }
        return await self._loop.create_connection(protocol_factory, sock=sock, **options)

    async def create_server(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | bytes | os.PathLike[Any] | None,
        *,
        sock: socket.socket | None,
        backlog: int,
        ssl: Any,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        start_serving: bool,
        cleanup_socket: bool,
    ) -> asyncio.Server:
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            sock = self._bind(os.fspath(path))
        elif sock is None:
            raise ValueError("path was not specified, and no sock specified")
        else:
            _check_stream_socket(sock)
        if cleanup_socket:
            name = sock.getsockname()
            if name and not _is_abstract(name):
                try:
                    self._cleanup[sock] = os.stat(name).st_ino
                except FileNotFoundError:
                    pass
        options: dict[str, Any] = {}
        if ssl:
            options = {
                "ssl": ssl,
                "ssl_handshake_timeout": ssl_handshake_timeout,
                "ssl_shutdown_timeout": ssl_shutdown_timeout,
            }
        try:
            return await self._loop.create_server(
                protocol_factory,
                sock=sock,
                backlog=backlog,
                start_serving=start_serving,
                **options,
            )
        except BaseException:
            self._cleanup.pop(sock, None)
            raise

    def _bind(self, path: str | bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not _is_abstract(path):
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)  # a stale socket file: nothing listens there
            except FileNotFoundError:
                pass
            except OSError as exc:
                # The directory may allow creating the socket but not looking at it.
                logger.error("Unable to check or remove stale UNIX socket %r: %r", path, exc)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
            raise
        except BaseException:
            sock.close()
            raise
        return sock

    def stop_serving(self, sock: socket.socket) -> Callable[[], None]:
        """Before *sock* is closed: what to call after, to remove its socket file."""
        inode = self._cleanup.pop(sock, None)
        if inode is None:
            return lambda: None
        path = sock.getsockname()

        def cleanup() -> None:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.error("Unable to clean up listening UNIX socket %r: %r", path, exc)

        return cleanup
