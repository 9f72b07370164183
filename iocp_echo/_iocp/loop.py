"""asyncio's event loop on I/O completion ports: :class:`IocpEventLoop`.

Windows only (it subclasses ``asyncio.ProactorEventLoop``).

The dequeue.  Each loop iteration ``IocpProactor.select()`` runs ``_poll``: it waits in
``GetQueuedCompletionStatus`` for one packet, then keeps dequeuing with a zero timeout until the
port is empty, and resolves the Future cached under each packet's ``OVERLAPPED``.  Under Wine a
dequeue costs 36-55 µs, and ``_poll`` pays per packet for what the completion engine never
needs: two ``WeakSet`` look-ups (``_stopped_serving``), ``done()``, ``set_result()`` and an
append to ``_results`` (the engine's cache entries are stand-ins with no result to keep).
:class:`IocpDequeue` is ``IocpProactor`` with its own ``_poll``:

* the engine's packets go straight to the connection's completion method;
* CPython's own packets are resolved exactly as ``_poll`` resolves them (a listener that
  stopped serving cancels its accept, a done or cancelled Future is left alone, an unknown
  packet is reported in debug mode and its key closed, ``_unregister()``-ed entries are dropped
  at the end), with the ``WeakSet`` asked only while some listener stopped serving is alive;
* the engine's per-iteration budget (``engine.py``, "Fairness") is renewed at the start of each
  dequeue instead of by a loop callback, so a connection's packet never costs the next
  iteration an extra zero-timeout dequeue just to run that callback.

Everything else (``select``, ``close`` cancelling and draining every cached operation, the
accept, receive and send methods) is ``IocpProactor``'s own.  ``_private.check_dequeue``
checks that CPython's ``_poll`` is the one this replaces (the names it uses are compared
whole); where it is not, :func:`iocp_echo._iocp.new_event_loop` returns a plain
``ProactorEventLoop`` and says why once.
"""

from __future__ import annotations

import _overlapped  # type: ignore[import-not-found]  # Windows only
import _winapi  # type: ignore[import-not-found,unused-ignore]
import asyncio
import logging
import math
import weakref
from typing import TYPE_CHECKING, Any

from .. import _private
from .._loop_transports import EngineTransports
from .engine import COMPLETIONS_PER_ITERATION, _CacheEntry

if TYPE_CHECKING:
    from .engine import IocpEngine

__all__ = ["IocpDequeue", "IocpEventLoop"]

logger = logging.getLogger("iocp_echo.iocp")

_INFINITE: int = _overlapped.INFINITE
_INVALID_HANDLE_VALUE: int = _overlapped.INVALID_HANDLE_VALUE
_dequeue_packet = _overlapped.GetQueuedCompletionStatus

_warned_stock_proactor = False


class IocpDequeue(asyncio.IocpProactor):  # type: ignore[misc,name-defined,unused-ignore]
    """``IocpProactor`` with iocp_echo's dequeue (see the module docstring).

    Raises :class:`~iocp_echo._private.InternalsUnavailable` when CPython's ``IocpProactor``
    is not the one the dequeue replaces.
    """

    def __init__(self, concurrency: int = _INFINITE) -> None:
        try:
            _private.check_dequeue(type(self))
        except _private.InternalsUnavailable:
            self._iocp = None  # IocpProactor.__del__ closes: there is nothing to close
            raise
        super().__init__(concurrency)
        try:
            _private.check_dequeue(type(self), self)
        except BaseException:
            super().close()
            raise
        #: Weak references to the objects ``_stop_serving()`` was given that are still
        #: alive: while it is empty, no packet needs the WeakSet look-up.
        self._stopped_alive: set[weakref.ref[Any]] = set()
        #: Engines whose budget this dequeue renews (``attach_engine``).
        self._engines: list[IocpEngine] = []
        #: Set once close() starts: no deferred receive may be issued into a draining port.
        self._closing = False

    # -- the engines ------------------------------------------------------------------------

    def attach_engine(self, engine: IocpEngine) -> None:
        """Renew *engine*'s per-iteration budget at the start of each dequeue."""
        if engine not in self._engines:
            self._engines.append(engine)

    def detach_engine(self, engine: IocpEngine) -> None:
        if engine in self._engines:
            self._engines.remove(engine)

    # -- IocpProactor -----------------------------------------------------------------------

    def _stop_serving(self, obj: Any) -> None:
        super()._stop_serving(obj)
        self._stopped_alive.add(weakref.ref(obj, self._stopped_alive.discard))

    def close(self) -> None:
        self._closing = True
        super().close()

    def _poll(self, timeout: float | None = None) -> None:
        if timeout is None:
            ms = _INFINITE
        elif timeout < 0:
            raise ValueError("negative timeout")
        else:
            # The wait has a 1 ms resolution: round up, to wait at least *timeout*.
            ms = math.ceil(timeout * 1e3)
            if ms >= _INFINITE:
                raise ValueError("timeout too big")
        if self._engines and not self._closing:
            for engine in self._engines:
                if engine.budget != COMPLETIONS_PER_ITERATION and engine.new_iteration():
                    ms = 0  # a postponed packet was delivered: run its callbacks first
        port = self._iocp
        cache = self._cache
        stopped_alive = self._stopped_alive
        while True:
            status = _dequeue_packet(port, ms)
            if status is None:
                break
            ms = 0
            err, transferred, key, address = status
            entry = cache.pop(address, None)
            if entry is None:
                self._unexpected_packet(err, transferred, key, address)
                continue
            future, ov, obj, callback = entry
            if type(future) is _CacheEntry:  # the engine's: no Future, no result to keep
                try:
                    callback(transferred, key, ov)
                except OSError as exc:
                    future.set_exception(exc)
            elif stopped_alive and obj in self._stopped_serving:
                future.cancel()  # the listener is closing: accept_coro closes the socket
            elif not future.done():  # done: completed at once, or cancelled meanwhile
                try:
                    value = callback(transferred, key, ov)
                except OSError as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(value)
                self._results.append(future)
            future = entry = None  # hold nothing of a packet once it is handled
        if self._unregistered:
            for ov in self._unregistered:
                cache.pop(ov.address, None)
            self._unregistered.clear()

    def _unexpected_packet(self, err: int, transferred: int, key: int, address: int) -> None:
        """A packet with no cache entry: a pipe's handle may come back as its key."""
        if self._loop.get_debug():
            self._loop.call_exception_handler(
                {
                    "message": "GetQueuedCompletionStatus() returned an unexpected event",
                    "status": (
                        f"err={err} transferred={transferred} key={key:#x} address={address:#x}"
                    ),
                }
            )
        if key not in (0, _INVALID_HANDLE_VALUE):
            _winapi.CloseHandle(key)  # type: ignore[attr-defined,unused-ignore]


class IocpEventLoop(EngineTransports, asyncio.ProactorEventLoop):  # type: ignore[misc,name-defined,unused-ignore]
    """asyncio's ``ProactorEventLoop`` with the completion engine under its streams, on
    iocp_echo's dequeue (:class:`IocpDequeue`).

    Made directly on a CPython whose ``IocpProactor`` is not the one the dequeue replaces, it
    runs on the stock ``IocpProactor`` (said once in the log);
    :func:`iocp_echo.new_event_loop` returns a plain ``ProactorEventLoop`` there instead.
    """

    def __init__(self, proactor: Any = None) -> None:
        global _warned_stock_proactor
        if proactor is None:
            try:
                proactor = IocpDequeue()
            except _private.InternalsUnavailable as exc:
                if not _warned_stock_proactor:
                    _warned_stock_proactor = True
                    logger.warning("IocpEventLoop runs on the stock IocpProactor: %s", exc)
                proactor = asyncio.IocpProactor()  # type: ignore[attr-defined,unused-ignore]
        super().__init__(proactor)

    def attach_engine(self, engine: IocpEngine) -> bool:
        """Let the dequeue renew *engine*'s budget; False when this loop's proactor is
        CPython's own (the engine then renews it from a loop callback)."""
        proactor = getattr(self, "_proactor", None)
        if isinstance(proactor, IocpDequeue):
            proactor.attach_engine(engine)
            return True
        return False

    def detach_engine(self, engine: IocpEngine) -> None:
        proactor = getattr(self, "_proactor", None)
        if isinstance(proactor, IocpDequeue):
            proactor.detach_engine(engine)
