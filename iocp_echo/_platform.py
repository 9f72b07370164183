"""The one seam between the echo logic and the operating system.

Everything that differs between completion backends (how to make the loop, how to issue an
accept, which accept errors are per-connection, how to reserve a port) is reached through
:func:`backend`.  The server and protocol modules never look at ``sys.platform``.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import proactor_events
from types import ModuleType
from typing import cast

from ._backend import Backend, BackendOperation, Engine
from .errors import ProactorRequiredError, UnsupportedPlatformError

__all__ = ["Backend", "BackendOperation", "Engine", "backend", "require_proactor"]


_probed: dict[str, UnsupportedPlatformError | None] = {}


def _unsupported(platform: str) -> UnsupportedPlatformError:
    return UnsupportedPlatformError(
        f"iocp_echo has no completion backend for {platform!r}: it runs on Windows (I/O "
        "completion ports) and Linux (io_uring). On this system, run it under Wine with "
        "Windows CPython: python tools/winpy.py --python 3.13 examples/echo.py"
    )


def _module(platform: str) -> ModuleType:
    if platform == "win32":
        from . import _iocp

        return _iocp
    if platform.startswith("linux"):
        from . import _uring

        return _uring
    raise _unsupported(platform)


def backend(platform: str | None = None) -> Backend:
    """The completion backend for *platform* (default: this one), or
    :class:`UnsupportedPlatformError`."""
    platform = platform or sys.platform
    module = _module(platform)
    if platform == sys.platform and platform.startswith("linux"):  # probe the kernel once
        if "linux" not in _probed:
            try:
                module.probe()
                _probed["linux"] = None
            except UnsupportedPlatformError as exc:
                _probed["linux"] = exc
        if _probed["linux"] is not None:
            raise _probed["linux"]
    return cast(Backend, module)


def loop_class() -> type[asyncio.AbstractEventLoop]:
    """This platform's event loop class, found without starting anything: a class that
    raises :class:`UnsupportedPlatformError` when made, where there is no backend."""
    try:
        module = _module(sys.platform)
    except UnsupportedPlatformError as exc:
        reason = exc

        class UnsupportedEventLoop(asyncio.AbstractEventLoop):
            def __init__(self) -> None:
                raise reason

        return UnsupportedEventLoop
    return cast(type[asyncio.AbstractEventLoop], module.loop_class())


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
