"""What every completion backend offers, as records and interfaces.

Both sides of the seam import this module: :mod:`iocp_echo._platform` (which picks a backend)
and the backends themselves (which fill in these records).  It imports neither, so there is no
import circle between the seam and the code behind it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ._transport import CompletionTransport, ConnectionOwner

__all__ = ["Backend", "BackendOperation", "Engine"]


class BackendOperation(NamedTuple):
    """One operation a backend's proactor has in flight, as far as the backend knows it.

    ``future`` is the operation's Future, or None for the engine's operations (which have
    none); ``kind``, ``nbytes``, ``started`` and ``state`` are None where the backend does not
    record them (CPython's IocpProactor records none of them for its own operations), and
    ``callback_name`` is the proactor callback's name, the only hint then left.
    """

    future: asyncio.Future[Any] | None
    sock: Any
    kind: str | None
    nbytes: int | None
    started: float | None
    state: str | None
    callback_name: str


class Engine(Protocol):
    """A backend's completion engine for one server: makes its connections' transports."""

    @property
    def name(self) -> str: ...

    #: Whether the engine accepts itself (:meth:`start_accepting`); else the server runs its
    #: own accept loop with :meth:`Backend.accept`.
    accepts: bool

    def connect(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        peer: Any,
        write_high_water: int,
        owner: ConnectionOwner | None,
    ) -> CompletionTransport: ...

    def sweep(self, now: float) -> None:
        """Called by the server about once a second: give back memory nothing uses."""

    def start_accepting(
        self,
        listener: socket.socket,
        admit: Callable[[socket.socket, Any], None],
        failed: Callable[[OSError], float],
    ) -> None: ...

    def stop_accepting(self) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    NAME: str

    def make_engine(self, loop: asyncio.AbstractEventLoop, *, max_read: int) -> Engine:
        """The completion engine, or InternalsUnavailable/OSError saying why it cannot run."""
        ...

    def new_event_loop(self) -> asyncio.AbstractEventLoop: ...

    def loop_class(self) -> type[asyncio.AbstractEventLoop]: ...

    def prepare_listener(self, sock: socket.socket) -> None: ...

    def is_transient_accept_error(self, exc: OSError) -> bool: ...

    def accept(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket
    ) -> asyncio.Future[tuple[socket.socket, Any]]: ...

    def operations(self, loop: asyncio.AbstractEventLoop) -> list[BackendOperation]:
        """In-flight operations; raises LookupError, with the reason, when they cannot be
        read."""
        ...
