"""Checking a server's arguments and opening its listening sockets, before anything runs.

Kept apart from the server so that every error a person can cause by configuration (a port out
of range, a port in use, a wrong type) is raised here, with a message saying what to do, before
the server exists.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from .errors import AddressInUseError, InvalidPortError, is_address_in_use, os_error_code

__all__ = ["format_address", "open_listeners", "validate_port", "validate_positive"]


def format_address(address: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) for logs and messages; ``str()`` otherwise."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def validate_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidPortError(f"port must be an integer, got {port!r}")
    if port != 0 and not 1024 <= port <= 65535:
        raise InvalidPortError(
            f"port {port} is out of range: use 1024-65535, or 0 to let the OS choose a free port"
        )
    return port


def validate_positive(name: str, value: object, *, allow_none: bool, kind: type = int) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        expected = "a number" if kind is float else "an integer"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")


def open_listeners(
    host: str, port: int, backlog: int, prepare: Callable[[socket.socket], None]
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address *host* resolves to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _canon, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if listeners and port == 0:  # every address on the port the OS chose first
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, type_, proto)
            listeners.append(sock)
            prepare(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if is_address_in_use(exc):
                    raise AddressInUseError(
                        exc.errno,
                        f"cannot listen on {format_address(address)}: port {address[1]!r} is "
                        f"already in use (OS error {os_error_code(exc)}); stop the program using "
                        f"it or choose another port",
                    ) from None
                raise OSError(
                    exc.errno, f"cannot listen on {format_address(address)}: {exc.strerror}"
                ) from exc
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners
