"""The sweep of an :class:`~iocp_echo.EchoServer`: one timer for every connection's upkeep.

Once per interval the server closes connections idle longer than ``idle_timeout``, lets its
engine give the read buffers of quiet connections back (``Engine.sweep``), and summarises the
log lines its rate limiter held back.  One timer per server, not one per connection, so that
no read or write touches a timer; in exchange an idle timeout is kept only to the interval's
precision (:data:`SWEEP_INTERVAL`, or a quarter of ``idle_timeout`` when that is shorter).
"""

from __future__ import annotations

import logging
import time

from ._server_state import ServerState
from .listeners import format_address

__all__ = ["SWEEP_INTERVAL", "Sweeping"]

#: The sweep's period: idle connections are closed at most this late, and quiet ones give
#: their read buffer back after QUIET_AFTER plus at most this.
SWEEP_INTERVAL = 1.0


class Sweeping(ServerState):
    """The sweep of :class:`~iocp_echo.EchoServer` (see the module docstring)."""

    def _start_sweeping(self) -> None:
        self._sweep_handle = self._loop.call_later(self._sweep_interval(), self._sweep)

    def _stop_sweeping(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def _sweep_interval(self) -> float:
        if self._idle_timeout is None:
            return SWEEP_INTERVAL
        return min(SWEEP_INTERVAL, self._idle_timeout / 4)

    def _sweep(self) -> None:
        """Once per interval for the whole server: idle connections are closed, quiet ones
        give their read buffers back, rate-limited log lines are summarised.  One timer, not
        one per connection."""
        self._sweep_handle = None
        if self._closing:
            return
        self._log.flush()
        if self._proxy is not None:
            self._proxy.flush()
        now = time.monotonic()
        if self._engine is not None:
            self._engine.sweep(now)
        timeout = self._idle_timeout
        if timeout is not None:
            for connection in list(self._connections):
                if self._reading_proxy_header(connection):
                    continue  # proxy_header_timeout's business
                last = connection.note_activity(now)
                if now - last >= timeout:
                    self._log.log(
                        "idle connection closed",
                        logging.INFO,
                        "closing connection from %s: no traffic for %.1f s (idle_timeout)",
                        format_address(connection.peer),
                        now - last,
                    )
                    connection.abort()
        self._sweep_handle = self._loop.call_later(self._sweep_interval(), self._sweep)
