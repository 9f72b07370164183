"""The one seam between the echo logic and the operating system.

Everything that differs between completion backends (how to make the loop, how to issue an
accept, which accept errors are per-connection, how to reserve a port) is reached through
:func:`backend`.  The server and protocol modules never look at ``sys.platform``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from asyncio import proactor_events
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple, Protocol, cast

from ._transport import CompletionTransport, ConnectionOwner
from .errors import ProactorRequiredError, UnsupportedPlatformError

__all__ = ["Backend", "BackendOperation", "Engine", "backend", "require_proactor"]


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

    def prepare_listener(self, sock: socket.socket) -> None: ...

    def is_transient_accept_error(self, exc: OSError) -> bool: ...

    def accept(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket
    ) -> asyncio.Future[tuple[socket.socket, Any]]: ...

    def operations(self, loop: asyncio.AbstractEventLoop) -> list[BackendOperation]:
        """In-flight operations; raises LookupError, with the reason, when they cannot be
        read."""
        ...


_probed: dict[str, UnsupportedPlatformError | None] = {}


def backend(platform: str | None = None) -> Backend:
    """The completion backend for *platform* (default: this one), or
    :class:`UnsupportedPlatformError`."""
    platform = platform or sys.platform
    module: ModuleType
    if platform == "win32":
        from . import _iocp as module
    elif platform.startswith("linux"):
        from . import _uring as module

        if platform == sys.platform:  # probe the real kernel once
            if "linux" not in _probed:
                try:
                    module.probe()
                    _probed["linux"] = None
                except UnsupportedPlatformError as exc:
                    _probed["linux"] = exc
            if _probed["linux"] is not None:
                raise _probed["linux"]
    else:
        raise UnsupportedPlatformError(
            f"iocp_echo has no completion backend for {platform!r}: it runs on Windows (I/O "
            "completion ports) and Linux (io_uring). On this system, run it under Wine with "
            "Windows CPython: python tools/winpy.py --python 3.13 examples/echo.py"
        )
    return cast(Backend, module)


def require_proactor(loop: asyncio.AbstractEventLoop) -> None:
    """Refuse any loop that is not completion-based, before a socket is opened."""
    if isinstance(loop, proactor_events.BaseProactorEventLoop):
        return
    kind = f"{type(loop).__module__}.{type(loop).__qualname__}"
    raise ProactorRequiredError(
        f"iocp_echo needs a proactor (completion-based) event loop, but the running loop is "
        f"{kind}. Start your program with iocp_echo.run(main()), or create its loop with "
        f"iocp_echo.new_event_loop() (asyncio.ProactorEventLoop on Windows; remove any "
        f"WindowsSelectorEventLoopPolicy or third-party loop policy)."
    )
