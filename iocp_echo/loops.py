"""Getting a completion-based event loop for this platform."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from . import _platform

__all__ = ["backend_name", "new_event_loop", "run"]

_T = TypeVar("_T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new proactor event loop for this platform (``asyncio.ProactorEventLoop`` on Windows).

    Raises :class:`UnsupportedPlatformError` where there is no completion backend.
    """
    return _platform.backend().new_event_loop()


def run(coro: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """Like :func:`asyncio.run`, on the platform's proactor loop."""
    backend = _platform.backend()
    with asyncio.Runner(debug=debug, loop_factory=backend.new_event_loop) as runner:
        return runner.run(coro)


def backend_name() -> str:
    """The completion backend's name, e.g. ``"IOCP (asyncio ProactorEventLoop)"``."""
    return _platform.backend().NAME
