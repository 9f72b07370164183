"""The control pipe between the supervisor (``workers.py``) and a worker (``_workers_child.py``).

Both ends speak it, so what each message holds is written down once, here, as typed records
that mypy checks where a message is made.  A worker is started as ``python -c BOOT <package
root>`` (:func:`worker_command`), so that it imports this very package, wherever it lies, and
not some installed copy.  Its stdin and stdout are then the pipe: one JSON object per line
(:func:`encode`, :func:`decode`), read on each side by a plain thread: a pipe handed to a child
process on Windows is not overlapped, so the event loop's completion port cannot read it, and a
thread works the same on both systems.

- supervisor -> worker: first its :class:`Configuration`; then any number of
  :class:`SnapshotRequest`, :class:`HandedConnection` (Windows: a connection the supervisor
  accepted) and, last, :class:`Stop`.
- worker -> supervisor: :class:`Ready` once it serves; a :class:`SnapshotReply` per request.

Neither end trusts a line to be a message: one that does not parse as a JSON object is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from . import introspection

if TYPE_CHECKING:
    from .server import EchoServer

__all__ = [
    "Configuration",
    "HandedConnection",
    "ListenerSpec",
    "Ready",
    "Snapshot",
    "SnapshotReply",
    "SnapshotRequest",
    "Stop",
    "ToSupervisor",
    "ToWorker",
    "address_from_json",
    "decode",
    "encode",
    "snapshot_of",
    "worker_command",
]

_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from iocp_echo._workers_child import main; sys.exit(main())"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class ListenerSpec(TypedDict, total=False):
    """One listening socket given to a worker: ``share`` (Windows: ``socket.share`` output,
    base64) or ``fd`` (POSIX: a descriptor the worker inherited).  See ``_listener_sharing``."""

    share: str
    fd: int


class Configuration(TypedDict):
    """The first line a worker reads: who it is, how to serve, on what, and how much to log."""

    worker: int
    options: dict[str, Any]
    listeners: list[ListenerSpec]
    log_level: int


class SnapshotRequest(TypedDict):
    """Asks for a :class:`SnapshotReply` with this *id* and at most *limit* operations."""

    op: Literal["snapshot"]
    id: int
    limit: int


class HandedConnection(TypedDict):
    """Windows: a connection the supervisor accepted, shared for this worker, and its peer."""

    op: Literal["connection"]
    share: str
    peer: Any


class Stop(TypedDict):
    """Drain and exit (the end of the pipe means the same)."""

    op: Literal["stop"]


class Ready(TypedDict):
    """The worker serves now."""

    event: Literal["ready"]
    pid: int
    backend: str
    engine: str


class Snapshot(TypedDict):
    """A worker's stats (a :class:`~iocp_echo.ServerStats` as a dict) and oldest operations."""

    stats: dict[str, Any]
    operations: list[dict[str, Any]]
    operations_total: int
    operations_unavailable: str | None
    serving: bool
    readiness: str


class SnapshotReply(TypedDict):
    """The answer to the :class:`SnapshotRequest` with the same *id*."""

    id: int
    snapshot: Snapshot


ToWorker = Configuration | SnapshotRequest | HandedConnection | Stop
ToSupervisor = Ready | SnapshotReply


def worker_command() -> list[str]:
    """The command line that starts one worker of this package."""
    return [sys.executable, "-c", _BOOT, _PACKAGE_ROOT]


def encode(message: ToWorker | ToSupervisor) -> str:
    """*message* as the line that carries it."""
    return json.dumps(message, separators=(",", ":")) + "\n"


def decode(line: str | bytes) -> dict[str, Any] | None:
    """The message on *line*, or None when it is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def address_from_json(value: Any) -> Any:
    """An address back from JSON, which turned its tuple into a list."""
    return tuple(value) if isinstance(value, list) else value


def snapshot_of(server: EchoServer, limit: int) -> Snapshot:
    """A worker's *server* as its :class:`Snapshot`, with its *limit* oldest operations."""
    unavailable: str | None = None
    try:
        found = server.pending_operations()
    except introspection.IntrospectionUnavailable as exc:
        found, unavailable = [], str(exc)
    found.sort(key=lambda op: -op.age)
    return {
        "stats": dataclasses.asdict(server.stats()),
        "operations": [op.as_dict() for op in found[:limit]],
        "operations_total": len(found),
        "operations_unavailable": unavailable,
        "serving": server.is_serving(),
        "readiness": server.readiness(),
    }
