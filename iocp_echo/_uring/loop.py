"""asyncio's event loop on io_uring: :class:`UringEventLoop`.

The loop is ``asyncio.BaseProactorEventLoop`` over :class:`~.proactor.UringProactor`: one
``io_uring_enter`` per iteration submits what the iteration issued and waits for completions.
What a proactor loop on Linux needs beyond CPython's generic one lives here, apart from the
completion engine (``engine.py``), which serves connections on the same proactor: readiness
watches for ``add_reader``/``add_writer`` (:mod:`.readiness`), signal handlers
(:mod:`.signals`), pipes and ptys (:mod:`.pipes`), subprocesses (:mod:`.children`) and
Unix-domain sockets (:mod:`.unix`), each a module of its own; this class only wires them to
asyncio's loop API.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from asyncio import proactor_events
from collections.abc import Callable
from typing import Any, TypeVarTuple

from .._loop_transports import EngineTransports
from . import pipes
from .children import ChildWatcher, make_subprocess_transport
from .proactor import UringProactor
from .readiness import EVENT_READ, EVENT_WRITE, FdWatcher, fileobj_to_fd
from .signals import SignalHandlers, current_wakeup_fd, restore_wakeup_fd
from .unix import CLEANUP_DEFAULT, UnixSockets

__all__ = ["UringEventLoop"]

_Ts = TypeVarTuple("_Ts")


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
        self._readiness = FdWatcher(self, proactor)
        self._signals = SignalHandlers(self, lambda: self._csock.fileno())  # type: ignore[attr-defined]
        self._children = ChildWatcher(self, self._readiness)
        self._unix = UnixSockets(self)
        #: Socket transports by descriptor: add_reader() and its kin refuse a descriptor a
        #: transport reads and writes (a second reader would steal its data).
        self._fd_transports: weakref.WeakValueDictionary[int, asyncio.BaseTransport]
        self._fd_transports = weakref.WeakValueDictionary()
        previous = current_wakeup_fd()
        try:
            super().__init__(proactor)
        except BaseException:
            self._closed = True
            proactor.close()
            raise
        restore_wakeup_fd(previous, self._csock.fileno())  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        self._children.close()
        self._readiness.close()
        previous = current_wakeup_fd()
        own = self._csock.fileno()  # type: ignore[attr-defined]
        super().close()
        restore_wakeup_fd(previous, own)
        self._signals.close()

    if hasattr(asyncio.BaseEventLoop, "_run_forever_setup"):  # 3.13+

        def _run_forever_setup(self) -> None:
            assert self._self_reading_future is None  # type: ignore[has-type]
            self.call_soon(self._loop_self_reading)
            super()._run_forever_setup()  # type: ignore[misc]

        def _run_forever_cleanup(self) -> None:
            super()._run_forever_cleanup()  # type: ignore[misc]
            self._stop_self_reading()

    else:

        def run_forever(self) -> None:
            try:
                assert self._self_reading_future is None  # type: ignore[has-type]
                self.call_soon(self._loop_self_reading)
                super().run_forever()
            finally:
                self._stop_self_reading()

    def _stop_self_reading(self) -> None:
        future = self._self_reading_future  # type: ignore[has-type]
        if future is not None:
            future.cancel()
            self._self_reading_future = None

    def _loop_self_reading(self, f: asyncio.Future[Any] | None = None) -> None:
        """The self-pipe's bytes are the signal numbers the wake-up descriptor got."""
        if f is not None and f.done() and not f.cancelled() and f.exception() is None:
            data = f.result()
            if data and self._signals:
                self._signals.deliver(data)
        super()._loop_self_reading(f)  # type: ignore[misc]

    # -- signals ----------------------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        self._check_closed()  # type: ignore[attr-defined]
        self._signals.add(sig, callback, args)

    def remove_signal_handler(self, sig: int) -> bool:
        return self._signals.remove(sig)

    # -- readiness --------------------------------------------------------------------------

    def add_reader(self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def add_writer(self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_writer(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    def _ensure_fd_no_transport(self, fd: Any) -> None:
        transport = self._fd_transports.get(fileobj_to_fd(fd))
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> asyncio.Transport:
        transport = super()._make_socket_transport(sock, protocol, waiter, extra, server)
        self._fd_transports[sock.fileno()] = transport
        return transport

    def _make_datagram_transport(  # type: ignore[override]
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.DatagramTransport:
        transport = super()._make_datagram_transport(  # type: ignore[misc]
            sock, protocol, address, waiter, extra
        )
        self._fd_transports[sock.fileno()] = transport
        return transport  # type: ignore[no-any-return]

    # The underscored forms are the ones asyncio's Unix transports and child watchers call.

    def _add_reader(
        self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts
    ) -> asyncio.Handle:
        self._check_closed()  # type: ignore[attr-defined]
        return self._readiness.add(fileobj_to_fd(fd), EVENT_READ, callback, args)

    def _remove_reader(self, fd: Any) -> bool:
        if self.is_closed():
            return False
        return self._readiness.remove(fileobj_to_fd(fd), EVENT_READ)

    def _add_writer(
        self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts
    ) -> asyncio.Handle:
        self._check_closed()  # type: ignore[attr-defined]
        return self._readiness.add(fileobj_to_fd(fd), EVENT_WRITE, callback, args)

    def _remove_writer(self, fd: Any) -> bool:
        if self.is_closed():
            return False
        return self._readiness.remove(fileobj_to_fd(fd), EVENT_WRITE)

    def _watching(self, fd: int, events: int) -> bool:
        return self._readiness.watching(fd, events)

    # -- pipes and subprocesses -------------------------------------------------------------

    def _make_read_pipe_transport(  # type: ignore[override]
        self,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.ReadTransport:
        read_class, _ = pipes.transport_classes()
        return read_class(self, pipe, protocol, waiter, extra)  # type: ignore[no-any-return]

    def _make_write_pipe_transport(  # type: ignore[override]
        self,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.WriteTransport:
        _, write_class = pipes.transport_classes()
        return write_class(self, pipe, protocol, waiter, extra)  # type: ignore[no-any-return]

    async def _make_subprocess_transport(  # type: ignore[override]
        self,
        protocol: asyncio.SubprocessProtocol,
        args: Any,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        bufsize: int,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> asyncio.SubprocessTransport:
        return await make_subprocess_transport(
            self,
            self._children,
            protocol,
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            extra,
            **kwargs,
        )

    # -- Unix-domain sockets ----------------------------------------------------------------

    async def create_unix_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | bytes | os.PathLike[Any] | None = None,
        *,
        ssl: Any = None,
        sock: socket.socket | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        return await self._unix.create_connection(
            protocol_factory,
            path,
            ssl=ssl,
            sock=sock,
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    async def create_unix_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | bytes | os.PathLike[Any] | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
        cleanup_socket: bool = CLEANUP_DEFAULT,
    ) -> asyncio.Server:
        """As asyncio's Unix loop; *cleanup_socket* (3.13's) is offered on every version,
        on by default from 3.13 as there."""
        return await self._unix.create_server(
            protocol_factory,
            path,
            sock=sock,
            backlog=backlog,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            start_serving=start_serving,
            cleanup_socket=cleanup_socket,
        )

    def _stop_serving(self, sock: socket.socket) -> None:
        cleanup = self._unix.stop_serving(sock)
        super()._stop_serving(sock)  # type: ignore[misc]
        cleanup()
