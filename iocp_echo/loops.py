"""Getting iocp_echo's event loop, under the names a drop-in loop offers (as uvloop does).

>>> iocp_echo.run(main())                                    # like asyncio.run / uvloop.run
>>> asyncio.Runner(loop_factory=iocp_echo.new_event_loop)    # any Runner
>>> asyncio.set_event_loop_policy(iocp_echo.EventLoopPolicy())  # code that sets policies
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from . import _platform

__all__ = ["EventLoop", "EventLoopPolicy", "backend_name", "new_event_loop", "run"]

_T = TypeVar("_T")

#: This platform's event loop class: io_uring's on Linux, the IOCP ``ProactorEventLoop``
#: subclass on Windows.  Elsewhere, making one raises :class:`UnsupportedPlatformError`.
EventLoop: type[asyncio.AbstractEventLoop] = _platform.loop_class()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new iocp_echo event loop for this platform.

    Raises :class:`UnsupportedPlatformError`, saying why and what to do, where there is no
    completion backend (or the kernel refuses io_uring).
    """
    return _platform.backend().new_event_loop()


def run(coro: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Like :func:`asyncio.run`, on iocp_echo's event loop."""
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(coro)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc,valid-type,unused-ignore]
    """For code that still sets a policy (CPython 3.11-3.13):
    ``asyncio.set_event_loop_policy(iocp_echo.EventLoopPolicy())``; then ``asyncio.run()``
    and ``asyncio.new_event_loop()`` make iocp_echo's loop."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


def backend_name() -> str:
    """The completion backend's name, e.g. ``"IOCP (asyncio ProactorEventLoop)"``."""
    return _platform.backend().NAME
