"""Every use of CPython's private asyncio internals, in one place.

CPython's proactor records no kind, size or start time for an overlapped operation, gives the
socket transport no public read-size knob, and has no public way to issue an ``AcceptEx`` whose
failure does not take the listening socket down (gh-93821).  The pieces iocp_echo needs are
therefore reached through private names that have been stable from 3.4 to 3.13:

* ``BaseProactorEventLoop._proactor``; ``IocpProactor._register_with_iocp()``,
  ``IocpProactor._register()`` and ``IocpProactor._cache`` (``ov.address -> (future, ov, obj,
  callback)``), read-only: an entry is never removed or touched here, because freeing a pending
  ``OVERLAPPED`` lets the kernel write into freed memory (gh-116773);
* ``IocpProactor._poll``/``close`` dispatch through ``_cache`` (the completion engine's hook:
  see :class:`CompletionHook`);
* ``_ProactorReadPipeTransport._data`` (the read buffer, 3.10+), ``_read_fut``, ``_write_fut``
  and ``_pending_write``;
* ``BaseTransport._extra`` (and, under TLS, ``_SSLProtocolTransport._ssl_protocol._transport``):
  where a PROXY header's client address replaces the balancer's ``peername``.

Each function checks the shape it relies on and raises :class:`InternalsUnavailable` with a
reason when it differs, so callers degrade to a public code path or report "unavailable"
instead of crashing or guessing.  ``tests/test_private.py`` checks every one of these on each
supported CPython.  Everything here must run on the event loop's thread.

Outside this module, by design, two contracts with asyncio that are not "reaching into"
CPython but *implementing* its extension points, each covered by the whole suite on 3.11-3.13:

* ``iocp_echo._uring.loop.UringEventLoop`` is a ``BaseProactorEventLoop`` subclass, like
  CPython's own ``ProactorEventLoop``: it passes its proactor to ``super().__init__`` (stored
  as ``_proactor``), and starts/stops the self-pipe reader the way ``ProactorEventLoop`` does
  (``_loop_self_reading``, ``_self_reading_future``, ``_run_forever_setup``/``_cleanup`` on
  3.13, ``run_forever`` before).  Introspection names that self-pipe read by ``_ssock``.
  Completing the loop on Linux, it fills in what ``BaseEventLoop`` leaves to its subclasses as
  asyncio's Unix loop does: ``_make_read_pipe_transport``/``_make_write_pipe_transport``,
  ``_make_subprocess_transport``, ``_stop_serving``; reads the signal numbers in the self-pipe
  bytes ``_loop_self_reading`` receives (the write end, ``_csock``, being the wake-up fd);
  queues readiness and signal handles with ``_add_callback``; and offers the
  ``_add_reader``/``_remove_reader``/``_add_writer``/``_remove_writer`` that asyncio's Unix
  transports and child watchers call.
* ``iocp_echo._iocp.loop.IocpDequeue`` is an ``IocpProactor`` subclass whose ``_poll`` (the
  dequeue ``select()`` and ``close()`` call) and ``_stop_serving`` replace CPython's: it reads
  ``_iocp``, ``_cache``, ``_results``, ``_unregistered``, ``_stopped_serving`` and ``_loop``
  as ``_poll`` does.  :func:`check_dequeue` compares every name CPython's ``_poll`` uses with
  the ones that dequeue was written against; any difference and iocp_echo's loop is not used.
* ``protocol.is_completion_transport`` recognises asyncio's proactor transports by their base
  class ``proactor_events._ProactorBasePipeTransport`` (enforcement only: a wrong answer refuses
  a transport, it never misuses one).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CompletionHook",
    "InternalsUnavailable",
    "accept_with_iocp",
    "capabilities",
    "completion_hook",
    "overlapped_cache",
    "set_read_buffer_size",
    "transport_operation",
]


class InternalsUnavailable(LookupError):
    """A private CPython internal iocp_echo relies on is missing or has another shape."""


def _proactor(loop: asyncio.AbstractEventLoop) -> Any:
    proactor = getattr(loop, "_proactor", None)
    if proactor is None:
        raise InternalsUnavailable(
            f"{type(loop).__name__} has no _proactor (not a proactor loop, or already closed)"
        )
    return proactor


def overlapped_cache(
    loop: asyncio.AbstractEventLoop,
) -> list[tuple[asyncio.Future[Any], Any, Any, str]]:
    """Snapshot ``IocpProactor._cache`` as ``(future, overlapped, obj, callback_name)``.

    ``obj`` is the socket the operation was issued on (the listener for an accept), or ``0``
    for a handle wait.  The snapshot is a copy: the cache itself is never modified.
    """
    cache = getattr(_proactor(loop), "_cache", None)
    if not isinstance(cache, dict):
        raise InternalsUnavailable("IocpProactor._cache is missing or not a dict")
    snapshot = []
    for entry in list(cache.values()):
        if not (isinstance(entry, tuple) and len(entry) == 4):
            raise InternalsUnavailable(
                "IocpProactor._cache entries are not (future, ov, obj, callback) tuples"
            )
        future, ov, obj, callback = entry
        callback = getattr(callback, "func", callback)  # functools.partial in 3.13
        snapshot.append((future, ov, obj, getattr(callback, "__name__", "?")))
    return snapshot


def set_read_buffer_size(transport: asyncio.BaseTransport, size: int) -> None:
    """Make a proactor socket transport ask for at most *size* bytes per read.

    CPython's transport reads with ``recv_into`` into its own ``bytearray(65536)``; replacing
    that buffer before the first read is issued is the only way to bound the read size.  Call
    it from ``connection_made``, which CPython schedules before the transport's first read.
    """
    data = getattr(transport, "_data", None)
    if not isinstance(data, bytearray):
        raise InternalsUnavailable("the proactor transport has no bytearray _data read buffer")
    if getattr(transport, "_read_fut", None) is not None:
        raise InternalsUnavailable("the transport's first read was already issued")
    transport._data = bytearray(size)  # type: ignore[attr-defined]


def transport_operation(
    transport: asyncio.BaseTransport, future: asyncio.Future[Any]
) -> tuple[Literal["recv", "send"], int | None] | None:
    """``("recv", size)`` or ``("send", size)`` when *future* is the transport's own read or
    write in flight; ``None`` when it is neither.  The size of a send that completed at once
    (its packet not yet dequeued) is not recorded by the transport: it is then ``None``."""
    if getattr(transport, "_read_fut", None) is future:
        data = getattr(transport, "_data", None)
        return "recv", len(data) if data is not None else 0
    if getattr(transport, "_write_fut", None) is future:
        pending = getattr(transport, "_pending_write", None)
        return "send", pending if isinstance(pending, int) and pending > 0 else None
    return None


def accept_with_iocp(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> asyncio.Future[tuple[socket.socket, Any]]:
    """Issue one ``AcceptEx`` on *listener* through the loop's ``IocpProactor``.

    Unlike ``IocpProactor.accept()`` this leaves no internal task behind whose failure asyncio
    would report as "Task exception was never retrieved", and it closes the pre-created accept
    socket itself on every path where the future does not hand it over.
    """
    import _overlapped  # type: ignore[import-not-found]  # Windows only

    proactor = _proactor(loop)
    register_with_iocp: Callable[[Any], None] | None
    register_with_iocp = getattr(proactor, "_register_with_iocp", None)
    register: Callable[..., asyncio.Future[Any]] | None = getattr(proactor, "_register", None)
    if register_with_iocp is None or register is None:
        raise InternalsUnavailable("IocpProactor has no _register_with_iocp/_register")

    register_with_iocp(listener)
    conn = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        conn.setblocking(False)
        ov = _overlapped.Overlapped(_overlapped.NULL)
        ov.AcceptEx(listener.fileno(), conn.fileno())
    except BaseException:
        conn.close()
        raise

    def finish_accept(transferred: Any, key: Any, ov: Any) -> tuple[socket.socket, Any]:
        ov.getresult()
        # Without SO_UPDATE_ACCEPT_CONTEXT, getpeername() and shutdown() fail on the socket.
        conn.setsockopt(
            socket.SOL_SOCKET,
            _overlapped.SO_UPDATE_ACCEPT_CONTEXT,
            struct.pack("@P", listener.fileno()),
        )
        return conn, conn.getpeername()

    future: asyncio.Future[tuple[socket.socket, Any]] = register(ov, listener, finish_accept)

    def close_unless_accepted(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            conn.close()

    future.add_done_callback(close_unless_accepted)
    return future


@dataclass(frozen=True)
class CompletionHook:
    """IocpProactor's packet dispatch, borrowed by the completion engine.

    ``IocpProactor._poll`` pops ``_cache[address]`` for each dequeued packet and, when the
    entry's future is not done, calls ``callback(transferred, key, ov)`` inline, then
    ``future.set_result(value)``.  The engine puts its own entries in ``cache``: a stand-in
    whose ``done()`` is always False (so the callback runs, with no Future and no
    ``call_soon``), the ``Overlapped`` (kept alive until its packet is dequeued, which is what
    the cache is for: gh-116773), the socket, and the connection's completion method.
    ``IocpProactor.close()`` calls ``cancel()`` on every entry still cached and polls until
    the cache is empty, so the stand-in's ``cancel()`` must cancel the I/O.
    """

    cache: dict[int, tuple[Any, Any, Any, Callable[[Any, Any, Any], Any]]]
    register_socket: Callable[[socket.socket], None]


#: Names ``IocpProactor._poll`` and ``close`` must use for the hook to behave as described:
#: a code-object check that survives .pyc-only standard libraries (the embeddable CPython).
_POLL_NAMES = frozenset({"_cache", "pop", "done", "set_result", "_results", "_stopped_serving"})
_CLOSE_NAMES = frozenset({"_cache", "cancelled", "cancel", "_poll"})


def completion_hook(loop: asyncio.AbstractEventLoop) -> CompletionHook:
    """The loop's IocpProactor cache and socket registration, after checking their shape."""
    proactor = _proactor(loop)
    cache = getattr(proactor, "_cache", None)
    register = getattr(proactor, "_register_with_iocp", None)
    if not isinstance(cache, dict) or not callable(register):
        raise InternalsUnavailable("IocpProactor has no _cache dict or _register_with_iocp")
    stock = _stock_class(type(proactor))  # iocp_echo's own dequeue checked it was this one
    for method, names in (("_poll", _POLL_NAMES), ("close", _CLOSE_NAMES)):
        code = getattr(getattr(stock, method, None), "__code__", None)
        missing = names - set(getattr(code, "co_names", ()))
        if missing:
            raise InternalsUnavailable(
                f"IocpProactor.{method} no longer uses {', '.join(sorted(missing))}: its "
                "completion dispatch is not the one the engine was built for"
            )
    if not isinstance(getattr(proactor, "_results", None), list):
        raise InternalsUnavailable("IocpProactor._results is not a list")
    return CompletionHook(cache, register)


def _stock_class(cls: type) -> type:
    """The first of *cls* and its bases that asyncio defines (``IocpProactor`` for
    iocp_echo's subclass)."""
    return next((c for c in cls.__mro__ if c.__module__.startswith("asyncio.")), cls)


#: Every global and attribute name ``IocpProactor._poll`` uses: identical in CPython 3.11.9,
#: 3.12.9 and 3.13.2.  iocp_echo's loop (``_iocp/loop.py``) replaces ``_poll`` by a dequeue
#: that does the same for CPython's own futures and hands the engine's packets to the engine
#: directly.  A ``_poll`` that uses another name does something that dequeue does not.
_STOCK_POLL_NAMES = frozenset(
    {
        "CloseHandle",
        "GetQueuedCompletionStatus",
        "INFINITE",
        "INVALID_HANDLE_VALUE",
        "KeyError",
        "OSError",
        "ValueError",
        "_cache",
        "_iocp",
        "_loop",
        "_overlapped",
        "_results",
        "_stopped_serving",
        "_unregistered",
        "_winapi",
        "address",
        "append",
        "call_exception_handler",
        "cancel",
        "ceil",
        "clear",
        "done",
        "get_debug",
        "math",
        "pop",
        "set_exception",
        "set_result",
    }
)
#: What the rest of IocpProactor must do for a ``_poll`` override to stand in for it:
#: ``select()`` and ``close()`` reach the port only through ``_poll``, and ``_stop_serving()``
#: and ``_unregister()`` only record what ``_poll`` acts on.
_POLL_CALLERS = {
    "select": frozenset({"_poll", "_results"}),
    "close": frozenset({"_poll", "_cache", "_iocp"}),
    "_stop_serving": frozenset({"_stopped_serving", "add"}),
    "_unregister": frozenset({"_unregistered", "append"}),
}


def check_dequeue(proactor_class: type, proactor: Any = None) -> None:
    """Raise :class:`InternalsUnavailable` unless the ``IocpProactor`` under *proactor_class*
    polls the way iocp_echo's dequeue (``_iocp/loop.py``) replaces; with *proactor*, also
    check the state that dequeue works on.

    The dequeue is a subclass's ``_poll``: it reads ``_iocp``, pops ``_cache`` entries,
    resolves CPython's futures as ``_poll`` does (``_stopped_serving``, ``_results``,
    ``_unregistered``), and calls the engine's entries directly.
    """
    stock = _stock_class(proactor_class)
    code = getattr(getattr(stock, "_poll", None), "__code__", None)
    if code is None or code.co_varnames[: code.co_argcount] != ("self", "timeout"):
        raise InternalsUnavailable("IocpProactor._poll(timeout) is missing or has another shape")
    names = set(code.co_names)
    if names != _STOCK_POLL_NAMES:

        def listed(some: set[str] | frozenset[str]) -> str:
            first = sorted(some)[:5]
            return ", ".join(first) + (f" and {len(some) - 5} more" if len(some) > 5 else "")

        added = listed(names - _STOCK_POLL_NAMES) or "nothing new"
        dropped = listed(_STOCK_POLL_NAMES - names) or "nothing"
        raise InternalsUnavailable(
            f"IocpProactor._poll changed (now uses {added}; no longer uses {dropped}): "
            "iocp_echo's dequeue would not do what it does"
        )
    for method, wanted in _POLL_CALLERS.items():
        method_code = getattr(getattr(stock, method, None), "__code__", None)
        missing = wanted - set(getattr(method_code, "co_names", ()))
        if missing:
            raise InternalsUnavailable(
                f"IocpProactor.{method} no longer uses {', '.join(sorted(missing))}"
            )
    if proactor is not None:
        import weakref

        state = {
            "_iocp": int,
            "_cache": dict,
            "_results": list,
            "_unregistered": list,
            "_stopped_serving": weakref.WeakSet,
        }
        for name, kind in state.items():
            if not isinstance(getattr(proactor, name, None), kind):
                raise InternalsUnavailable(f"IocpProactor.{name} is not a {kind.__name__}")


# -- the io_uring loop's Unix pieces: pipes, subprocesses (iocp_echo._uring) ----------------

#: What asyncio's Unix pipe transports call on their loop beyond its public API; the io_uring
#: loop offers these four (``FdWatcher``).  If a transport stops calling them, it no longer
#: works the way the loop serves it.
_PIPE_LOOP_NAMES = {
    "_UnixReadPipeTransport": frozenset({"_add_reader", "_remove_reader"}),
    "_UnixWritePipeTransport": frozenset(
        {"_add_reader", "_remove_reader", "_add_writer", "_remove_writer"}
    ),
}
#: Names that would mean a pipe transport depends on the selector loop itself (its
#: ``__repr__`` asks the selector, and is replaced by the io_uring loop's subclass).
_SELECTOR_ONLY_NAMES = frozenset(
    {"_selector", "_transports", "_ensure_fd_no_transport", "_test_selector_event"}
)
_PIPE_INIT = ("self", "loop", "pipe", "protocol", "waiter", "extra")
_SUBPROCESS_INIT = (
    "self",
    "loop",
    "protocol",
    "args",
    "shell",
    "stdin",
    "stdout",
    "stderr",
    "bufsize",
    "waiter",
    "extra",
)


def _parameters(function: Any) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    if code is None:
        return ()
    return tuple(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])


def _names_used(cls: type, skip: frozenset[str]) -> set[str]:
    """The global and attribute names the methods of *cls* (and its asyncio bases) use."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("asyncio."):
            continue
        for attr, value in vars(klass).items():
            code = getattr(value, "__code__", None)
            if code is not None and attr not in skip:
                names.update(code.co_names)
    return names


def unix_pipe_transports() -> tuple[type[Any], type[Any]]:
    """asyncio's Unix pipe transports, ``unix_events._UnixReadPipeTransport`` and
    ``_UnixWritePipeTransport``, for the io_uring loop to run on its readiness watches.

    They reach their loop through its public API and the four methods of
    :data:`_PIPE_LOOP_NAMES`; their constructor is ``(loop, pipe, protocol, waiter, extra)``.
    Their ``__repr__`` asks the selector loop's selector: the caller replaces it.
    """
    try:
        from asyncio import unix_events
    except ImportError as exc:  # Windows
        raise InternalsUnavailable(f"asyncio.unix_events is unavailable: {exc}") from None
    found: list[type] = []
    for name, base in (
        ("_UnixReadPipeTransport", asyncio.ReadTransport),
        ("_UnixWritePipeTransport", asyncio.WriteTransport),
    ):
        cls = getattr(unix_events, name, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise InternalsUnavailable(f"asyncio.unix_events.{name} is missing or not a {base}")
        if _parameters(cls.__init__) != _PIPE_INIT:
            raise InternalsUnavailable(f"asyncio.unix_events.{name}() takes other arguments")
        used = _names_used(cls, frozenset({"__repr__"}))
        missing = _PIPE_LOOP_NAMES[name] - used
        extra = _SELECTOR_ONLY_NAMES & used
        if missing or extra:
            raise InternalsUnavailable(
                f"asyncio.unix_events.{name} no longer uses {sorted(missing)} or now uses "
                f"{sorted(extra)}: it is not the transport the io_uring loop was built for"
            )
        found.append(cls)
    return found[0], found[1]


def unix_subprocess_transport() -> type[Any]:
    """``unix_events._UnixSubprocessTransport`` (``subprocess.Popen`` under
    ``base_subprocess.BaseSubprocessTransport``), for the io_uring loop's subprocesses.

    The loop makes it as asyncio's Unix loop does, ``(loop, protocol, args, shell, stdin,
    stdout, stderr, bufsize, waiter, extra, **popen_kwargs)``; connects its pipes through the
    loop's public ``connect_read_pipe``/``connect_write_pipe``; and tells it of the child's
    exit with ``_process_exited(returncode)``, or, when starting fails, closes it and awaits
    ``_wait()``.
    """
    try:
        from asyncio import base_subprocess, unix_events
    except ImportError as exc:  # Windows
        raise InternalsUnavailable(f"asyncio.unix_events is unavailable: {exc}") from None
    cls = getattr(unix_events, "_UnixSubprocessTransport", None)
    base = getattr(base_subprocess, "BaseSubprocessTransport", None)
    if not (isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)):
        raise InternalsUnavailable("asyncio.unix_events._UnixSubprocessTransport is missing")
    for method in ("_process_exited", "_wait", "get_pid", "_start", "_connect_pipes"):
        if not callable(getattr(cls, method, None)):
            raise InternalsUnavailable(f"asyncio's subprocess transport has no {method}()")
    if _parameters(cls.__init__)[: len(_SUBPROCESS_INIT)] != _SUBPROCESS_INIT:
        raise InternalsUnavailable("asyncio's subprocess transport takes other arguments")
    return cls


def installed_child_watcher(policy: asyncio.AbstractEventLoopPolicy) -> Any | None:
    """The child watcher an application installed on asyncio's Unix policy
    (``set_child_watcher``, deprecated in 3.12, gone in 3.14), else None.

    asyncio's Unix loop waits for its children through that watcher; the io_uring loop has
    its own (pidfd) and defers to an installed one only, read from the policy's
    ``_watcher`` without creating one as ``get_child_watcher()`` would.
    """
    if not callable(getattr(policy, "get_child_watcher", None)):
        return None  # 3.14+, or a policy with no watchers
    if "_watcher" not in vars(policy):
        raise InternalsUnavailable(
            f"{type(policy).__name__} keeps no _watcher: cannot tell an installed watcher"
        )
    return vars(policy)["_watcher"]


def capabilities(loop: asyncio.AbstractEventLoop) -> dict[str, str | None]:
    """Which internals are usable on *loop*: name -> ``None`` if usable, else the reason."""
    report: dict[str, str | None] = {}
    try:
        overlapped_cache(loop)
        report["overlapped_cache"] = None
    except InternalsUnavailable as exc:
        report["overlapped_cache"] = str(exc)
    try:
        proactor = _proactor(loop)
        ok = callable(getattr(proactor, "_register", None)) and callable(
            getattr(proactor, "_register_with_iocp", None)
        )
        report["accept_with_iocp"] = (
            None if ok and sys.platform == "win32" else "IocpProactor._register is unavailable"
        )
    except InternalsUnavailable as exc:
        report["accept_with_iocp"] = str(exc)
    try:
        completion_hook(loop)
        report["completion_hook"] = None
    except InternalsUnavailable as exc:
        report["completion_hook"] = str(exc)
    return report


# -- the loops' own socket transports (iocp_echo._loop_transports) ---------------------------


def _server_hook(server: Any, name: str) -> Callable[[Any], None]:
    method = getattr(server, name, None)
    code = getattr(getattr(type(server), name, None), "__code__", None)
    if method is None or code is None:
        raise InternalsUnavailable(f"asyncio.Server has no {name}()")
    if code.co_argcount == 2:  # 3.13+: the server keeps its transports (close_clients())
        return method  # type: ignore[no-any-return]
    if code.co_argcount == 1:  # 3.11, 3.12: a count only
        return lambda _transport: method()
    raise InternalsUnavailable(f"asyncio.Server.{name}() takes {code.co_argcount - 1} arguments")


def server_attach(server: Any, transport: asyncio.BaseTransport) -> None:
    """Count *transport* among *server*'s connections, as asyncio's own transports do in
    their constructor: ``Server.wait_closed()`` waits for them, and on 3.13
    ``close_clients()``/``abort_clients()`` reach them."""
    _server_hook(server, "_attach")(transport)


def server_detach(server: Any, transport: asyncio.BaseTransport) -> None:
    """The counterpart of :func:`server_attach`, once the connection is lost."""
    _server_hook(server, "_detach")(transport)


def ssl_protocol_class() -> type[asyncio.BufferedProtocol]:
    """``asyncio.sslproto.SSLProtocol``: the TLS layer every asyncio loop puts between a
    socket transport and the application's protocol (``loop._make_ssl_transport``)."""
    from asyncio import sslproto

    cls = getattr(sslproto, "SSLProtocol", None)
    init = getattr(getattr(cls, "__init__", None), "__code__", None)
    if not isinstance(cls, type) or init is None or "_app_transport" not in init.co_names:
        raise InternalsUnavailable("asyncio.sslproto.SSLProtocol has another shape")
    return cls  # type: ignore[return-value]


def transport_extras(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """The dict in which asyncio keeps *transport*'s extra info (``BaseTransport._extra``);
    for TLS, the one of the socket transport under it, which its ``get_extra_info`` consults
    for the names TLS does not answer itself (``peername`` among them).  A PROXY header names
    the client: its address goes there, so a protocol on asyncio's transports sees it too."""
    ssl_protocol = getattr(transport, "_ssl_protocol", None)
    underneath = transport if ssl_protocol is None else getattr(ssl_protocol, "_transport", None)
    extra = getattr(underneath, "_extra", None)
    if not isinstance(extra, dict) or "peername" not in extra:
        raise InternalsUnavailable(
            f"{type(underneath).__name__} keeps no _extra dict with 'peername' in it"
        )
    return extra


def sendfile_mode(name: str) -> Any:
    """A member of ``asyncio.constants._SendfileMode``: what ``loop.sendfile()`` reads from
    a transport's ``_sendfile_compatible`` to choose the native path, the fallback, or
    neither.  ``None`` when asyncio has no such member: ``loop.sendfile()`` then takes its
    fallback (it tests for the members by identity)."""
    from asyncio import constants

    return getattr(getattr(constants, "_SendfileMode", None), name, None)


def flow_control_transport() -> type[asyncio.Transport]:
    """``asyncio.transports._FlowControlMixin``: the base asyncio's write-side transports share,
    and the type ``loop.sendfile()``'s fallback requires of a transport (it reads the
    transport's ``_protocol_paused``).  ``asyncio.Transport`` when it has another shape, so a
    transport still works, without that fallback."""
    from asyncio import transports

    mixin = getattr(transports, "_FlowControlMixin", None)
    slots = set(getattr(mixin, "__slots__", ()))
    if (
        isinstance(mixin, type)
        and issubclass(mixin, asyncio.Transport)
        and slots == {"_loop", "_protocol_paused", "_high_water", "_low_water"}
    ):
        return mixin
    return asyncio.Transport
