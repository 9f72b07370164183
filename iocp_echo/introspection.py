"""What the completion port is waiting on right now.

The proactor's cache of in-flight ``OVERLAPPED`` operations is the only authority on what is
pending; it records no kind, size or start time.  This module joins that cache (read through
:mod:`iocp_echo._private`) with what iocp_echo knows itself: the operations it issued (kind,
size, start time recorded at issue), the transports it owns (their read and write futures), and
the loop's own self-pipe read.  What nobody recorded is classified by the proactor callback's
name, and its start time is when it was first seen.

Call these on the loop's thread; from another thread use :func:`pending_operations_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from . import _platform, _private

__all__ = [
    "IntrospectionUnavailable",
    "PendingOperation",
    "engine_operations",
    "pending_operations",
    "pending_operations_threadsafe",
    "summarize",
]

Kind = Literal[
    "accept", "recv", "send", "connect", "sendfile", "wakeup", "wait", "reader", "writer", "unknown"
]
State = Literal["pending", "cancelling", "completing"]


class IntrospectionUnavailable(RuntimeError):
    """The proactor's internals are not what this version of iocp_echo knows how to read."""


@dataclass(frozen=True)
class PendingOperation:
    """One overlapped operation the completion port has not yet reported as dequeued.

    ``state`` is ``"pending"`` while the kernel works on it, ``"cancelling"`` after a cancel was
    issued, and ``"completing"`` when it finished but its packet is not yet dequeued.
    ``nbytes`` is the size requested (reads) or being sent (writes); 0 for an accept.
    ``started`` is a ``time.monotonic()`` value and ``age`` is seconds since then.
    """

    kind: Kind
    state: State
    fileno: int | None
    local: Any
    peer: Any
    nbytes: int | None
    started: float
    age: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "fileno": self.fileno,
            "local": _jsonable(self.local),
            "peer": _jsonable(self.peer),
            "nbytes": self.nbytes,
            "started": self.started,
            "age": self.age,
        }


#: Operations iocp_echo issued itself: future -> (kind, nbytes, started).
_issued: weakref.WeakKeyDictionary[asyncio.Future[Any], tuple[Kind, int, float]] = (
    weakref.WeakKeyDictionary()
)
#: When an operation nobody recorded was first seen.
_first_seen: weakref.WeakKeyDictionary[asyncio.Future[Any], float] = weakref.WeakKeyDictionary()

_KIND_BY_CALLBACK: dict[str, Kind] = {
    "finish_accept": "accept",
    "finish_accept_pipe": "accept",
    "finish_connect": "connect",
    "finish_connect_pipe": "connect",
    "finish_recv": "recv",
    "_finish_recvfrom": "recv",
    "finish_send": "send",
    "finish_sendfile": "sendfile",
    "finish_wait_for_handle": "wait",
    # 3.12+: one callback for recv, send and sendfile alike; it cannot tell them apart.
    "finish_socket_func": "unknown",
}


def record(future: asyncio.Future[Any], kind: Kind, nbytes: int) -> None:
    """Remember what an operation iocp_echo just issued is."""
    _issued[future] = (kind, nbytes, time.monotonic())


class Owner(Protocol):
    """What a connection tells introspection about itself (``EchoProtocol`` is one)."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    @property
    def read_started(self) -> float: ...

    @property
    def peer(self) -> Any:
        """The client's address (a PROXY header's, when one named it), or None."""
        ...


class OwnerSource(Protocol):
    """Something that owns connections on a loop (an ``EchoServer``)."""

    def owners(self) -> tuple[asyncio.AbstractEventLoop, Mapping[int, Owner]]: ...


#: Servers alive now, whose connections the loop-wide view recognises too.
_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def register_source(source: OwnerSource) -> None:
    _sources.add(source)


def pending_operations(loop: asyncio.AbstractEventLoop | None = None) -> list[PendingOperation]:
    """Every operation the loop's proactor has in flight, oldest first.

    Raises :class:`IntrospectionUnavailable`, with the reason, when the proactor's internals
    are not what this version of iocp_echo knows (a future CPython, a closed loop).
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    owners: dict[int, Owner] = {}
    for source in list(_sources):
        source_loop, source_owners = source.owners()
        if source_loop is loop:
            owners.update(source_owners)
    return collect(loop, None, owners)


def collect(
    loop: asyncio.AbstractEventLoop,
    sockets: Iterable[socket.socket] | None = None,
    owners: Mapping[int, Owner] | None = None,
) -> list[PendingOperation]:
    """The operations in flight on *sockets* (all, when None), oldest first.

    *owners* maps ``id(socket)`` to the connection that owns it, so that its transport's read
    and write are recognised, and the read's start time known.
    """
    try:
        entries = _platform.backend().operations(loop)
    except LookupError as exc:
        raise IntrospectionUnavailable(str(exc)) from None
    wanted = None if sockets is None else {id(s) for s in sockets}
    owners = owners or {}
    self_pipe = getattr(loop, "_ssock", None)
    now = time.monotonic()
    operations = []
    for entry in entries:
        future, obj = entry.future, entry.sock
        if wanted is not None and id(obj) not in wanted:
            continue
        kind: Kind
        nbytes: int | None
        owner = owners.get(id(obj))
        issued = _issued.get(future) if future is not None else None
        if issued is not None:
            kind, nbytes, started = issued
        elif entry.kind is not None:  # a backend that records what it issues
            kind, nbytes = entry.kind, entry.nbytes  # type: ignore[assignment]
            started = entry.started if entry.started is not None else now
        elif (
            future is not None
            and owner is not None
            and owner.transport is not None
            and (transport_op := _private.transport_operation(owner.transport, future))
        ):
            kind, nbytes = transport_op
            # The transport issues its next read as it delivers the last one.
            started = owner.read_started if kind == "recv" else _first_seen.setdefault(future, now)
        elif obj is self_pipe and self_pipe is not None:
            kind, nbytes = "wakeup", 4096  # the loop reads its self-pipe 4 KiB at a time
            started = _first_seen.setdefault(future, now) if future is not None else now
        else:
            kind = _KIND_BY_CALLBACK.get(entry.callback_name, "unknown")
            nbytes = None
            started = _first_seen.setdefault(future, now) if future is not None else now
        state: State
        if entry.state is not None:
            state = entry.state  # type: ignore[assignment]
        elif future is not None and future.cancelled():
            state = "cancelling"
        elif future is not None and future.done():
            state = "completing"
        else:
            state = "pending"
        fileno, local, peer = _describe(obj)
        if owner is not None and owner.peer is not None:
            peer = owner.peer  # the client a PROXY header named, not the balancer
        operations.append(
            PendingOperation(kind, state, fileno, local, peer, nbytes, started, now - started)
        )
    operations.sort(key=lambda op: op.started)
    return operations


def engine_operations(transport: Any) -> list[PendingOperation]:
    """The operations in flight of one engine connection, from what the engine recorded:
    exact kind, size and start, and no system call (a snapshot of many connections must
    stay cheap)."""
    now = time.monotonic()
    sock = transport.socket
    fileno = transport._fileno
    local = transport.get_extra_info("sockname") if sock.fileno() != -1 else None
    return [
        PendingOperation(kind, state, fileno, local, transport.peer, nbytes, started, now - started)
        for kind, state, nbytes, started in transport.operations()
    ]


def summarize(operations: Iterable[PendingOperation]) -> dict[str, Any]:
    """Counts by kind and by state, and the oldest age: the figures ``stats()`` reports."""
    by_kind: dict[str, int] = {}
    by_state: dict[str, int] = {}
    oldest = 0.0
    for op in operations:
        by_kind[op.kind] = by_kind.get(op.kind, 0) + 1
        by_state[op.state] = by_state.get(op.state, 0) + 1
        oldest = max(oldest, op.age)
    return {"by_kind": by_kind, "by_state": by_state, "oldest_age": oldest}


def pending_operations_threadsafe(
    loop: asyncio.AbstractEventLoop, timeout: float | None = 5.0
) -> list[PendingOperation]:
    """:func:`pending_operations` asked from another thread: it runs on *loop*'s thread."""
    result: concurrent.futures.Future[list[PendingOperation]] = concurrent.futures.Future()

    def ask() -> None:
        try:
            result.set_result(collect(loop))
        except BaseException as exc:
            result.set_exception(exc)

    loop.call_soon_threadsafe(ask)
    return result.result(timeout)


def _describe(obj: Any) -> tuple[int | None, Any, Any]:
    if not isinstance(obj, socket.socket):
        return None, None, None
    fileno = obj.fileno()
    if fileno == -1:
        return None, None, None
    local = peer = None
    try:
        local = obj.getsockname()
    except OSError:
        pass
    try:
        peer = obj.getpeername()
    except OSError:
        pass  # a listener, or a connection the peer already reset
    return fileno, local, peer


def _jsonable(address: Any) -> Any:
    return list(address) if isinstance(address, tuple) else address
