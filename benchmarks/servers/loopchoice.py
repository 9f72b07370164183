"""The event loops the benchmark's asyncio programs run on, by name, shared by the echo
server (``asyncio_echo.py``) and the ping-pong client (``pingpong.py``) so that both make
each loop the same way.

Natively: ``default`` (the stock selector loop), ``uvloop``, ``rloop``, ``uringcore`` and
``iocp_echo`` (``iocp_echo.new_event_loop()``, its io_uring loop).  Under Wine: ``default``
(the stock ``ProactorEventLoop``), ``winloop`` and ``iocp_echo`` (its IOCP loop).  A loop
package that is missing or fails to import raises here, before anything listens, so the
harness reports the import error as that loop's failure.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

#: The checkout, for ``iocp_echo`` (the benchmark runs it uninstalled, as examples/echo.py).
ROOT = Path(__file__).resolve().parent.parent.parent
NAMES = ("default", "uvloop", "winloop", "rloop", "uringcore", "iocp_echo")

Factory = Callable[[], asyncio.AbstractEventLoop]


def factory(name: str, site: str | None = None) -> Factory | None:
    """The loop factory for ``asyncio.Runner`` (None: asyncio's default loop).  *site* is
    an extra folder for ``sys.path`` (winloop under Wine lives outside the checkout)."""
    if site:
        sys.path.insert(0, site)
    if name == "default":
        return None
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    if name == "winloop":
        import winloop

        return winloop.new_event_loop  # type: ignore[no-any-return]
    if name == "rloop":
        import rloop

        return rloop.new_event_loop  # type: ignore[no-any-return]
    if name == "uringcore":
        import uringcore

        return uringcore.UringEventLoop  # type: ignore[no-any-return]
    if name == "iocp_echo":
        sys.path.insert(0, str(ROOT))
        import iocp_echo

        return iocp_echo.new_event_loop
    raise ValueError(f"unknown loop {name!r}; one of {', '.join(NAMES)}")


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """The loop's class, as the READY line shows it (``module.Class``)."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"
