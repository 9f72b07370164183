"""asyncio's event loop on io_uring: :class:`UringEventLoop`.

The loop is ``asyncio.BaseProactorEventLoop`` over :class:`~.proactor.UringProactor`: one
``io_uring_enter`` per iteration submits what the iteration issued and waits for completions.
What a proactor loop on Linux needs beyond CPython's generic one lives here, apart from the
completion engine (``engine.py``), which serves connections on the same proactor.
"""

from __future__ import annotations

import asyncio
from asyncio import proactor_events

from .._loop_transports import EngineTransports
from .proactor import UringProactor

__all__ = ["UringEventLoop"]


class UringEventLoop(EngineTransports, proactor_events.BaseProactorEventLoop):
    """asyncio's proactor event loop on io_uring."""

    @property
    def proactor(self) -> UringProactor:
        """The loop's io_uring proactor (the completion engine submits through it)."""
        return self._proactor  # type: ignore[attr-defined,no-any-return]

    def __init__(self, proactor: UringProactor | None = None) -> None:
        if proactor is None:
            try:
                proactor = UringProactor()
            except BaseException:
                # BaseEventLoop.__del__ reads _closed: without it, a failed construction
                # would also print an AttributeError when this half-made loop is collected.
                self._closed = True
                raise
        try:
            super().__init__(proactor)
        except BaseException:
            self._closed = True
            proactor.close()
            raise

    if hasattr(asyncio.BaseEventLoop, "_run_forever_setup"):  # 3.13+

        def _run_forever_setup(self) -> None:
            assert self._self_reading_future is None  # type: ignore[has-type]
            self.call_soon(self._loop_self_reading)  # type: ignore[attr-defined]
            super()._run_forever_setup()  # type: ignore[misc]

        def _run_forever_cleanup(self) -> None:
            super()._run_forever_cleanup()  # type: ignore[misc]
            self._stop_self_reading()

    else:

        def run_forever(self) -> None:
            try:
                assert self._self_reading_future is None  # type: ignore[has-type]
                self.call_soon(self._loop_self_reading)  # type: ignore[attr-defined]
                super().run_forever()
            finally:
                self._stop_self_reading()

    def _stop_self_reading(self) -> None:
        future = self._self_reading_future  # type: ignore[has-type]
        if future is not None:
            future.cancel()
            self._self_reading_future = None
