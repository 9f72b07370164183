"""asyncio's event loop on I/O completion ports: :class:`IocpEventLoop`.

Windows only (it subclasses ``asyncio.ProactorEventLoop``).
"""

from __future__ import annotations

import asyncio

from .._loop_transports import EngineTransports

__all__ = ["IocpEventLoop"]


class IocpEventLoop(EngineTransports, asyncio.ProactorEventLoop):  # type: ignore[misc,name-defined,unused-ignore]
    """asyncio's ``ProactorEventLoop`` with the completion engine under its streams."""
