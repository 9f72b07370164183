"""The worker pool seen as one server: totals and every worker's share, for the admin endpoint.

``run_workers()``'s supervisor serves no connections, yet the admin endpoint and
``--stats-every`` ask it what an :class:`~iocp_echo.EchoServer` answers: ``stats()``,
``pending_operations()``, ``snapshot()``.  :class:`WorkersView` answers them from each worker's
:class:`~iocp_echo._worker_protocol.Snapshot`, which the pool collects over the control pipes:
it adds the workers' counters up and labels every worker's share by worker number and pid.  It
is apart from the supervisor because it only reads: it knows the pool through the few things
:class:`Pool` names, and nothing of processes, pipes or restarts.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._worker_protocol import address_from_json
from .listeners import format_address
from .server import ServerStats

__all__ = ["Pool", "WorkerOperation", "WorkersStats", "WorkersView"]


class Pool(Protocol):
    """What the view reads of the pool (:class:`~iocp_echo.workers.WorkerPool` has it)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def backend_name(self) -> str: ...

    @property
    def workers(self) -> int: ...

    def is_serving(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    @property
    def max_connections(self) -> int | None: ...

    def ready_workers(self) -> int: ...

    def collect(self, max_age: float = 0.0) -> list[dict[str, Any]]:
        """Every worker's entry: ``worker``, ``pid``, ``state``, ``restarts``, ``stats``,
        ``error``, and ``snapshot`` when it answered (see ``WorkerPool.collect``)."""
        ...


@dataclass(frozen=True)
class WorkerOperation:
    """A pending operation of one worker, as that worker reported it."""

    kind: str
    state: str
    fileno: int | None
    local: Any
    peer: Any
    nbytes: int | None
    started: float
    age: float
    worker: int
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "fileno": self.fileno,
            "local": self.local,
            "peer": self.peer,
            "nbytes": self.nbytes,
            "started": self.started,
            "age": self.age,
            "worker": self.worker,
            "pid": self.pid,
        }


@dataclass(frozen=True)
class WorkersStats(ServerStats):
    """Totals over every worker (the :class:`ServerStats` fields), and each worker's own.

    ``workers`` holds one entry per worker: ``worker`` (1..N), ``pid`` (None while it is being
    restarted), ``state``, ``restarts``, and ``stats`` (its :class:`ServerStats` as a dict, or
    None with ``error`` saying why it is missing).
    """

    workers: list[dict[str, Any]] = field(default_factory=list)


def _sum_stats(entries: list[dict[str, Any]]) -> WorkersStats:
    totals: dict[str, Any] = {}
    unavailable = []
    for entry in entries:
        stats = entry["stats"]
        if stats is None:
            continue
        for f in dataclasses.fields(ServerStats):
            value = stats.get(f.name)
            if f.name == "pending_unavailable":
                if value:
                    unavailable.append(f"worker {entry['worker']}: {value}")
            elif f.name == "oldest_pending_age":
                totals[f.name] = max(totals.get(f.name, 0.0), float(value or 0.0))
            elif isinstance(value, dict):
                merged = collections.Counter(totals.get(f.name, {}))
                merged.update(value)
                totals[f.name] = dict(merged)
            else:
                totals[f.name] = totals.get(f.name, 0) + int(value or 0)
    public = [{k: v for k, v in e.items() if k != "snapshot"} for e in entries]
    return WorkersStats(
        open_connections=totals.get("open_connections", 0),
        total_connections=totals.get("total_connections", 0),
        refused_connections=totals.get("refused_connections", 0),
        failed_accepts=totals.get("failed_accepts", 0),
        bytes_received=totals.get("bytes_received", 0),
        bytes_sent=totals.get("bytes_sent", 0),
        bytes_unsent=totals.get("bytes_unsent", 0),
        reading_paused=totals.get("reading_paused", 0),
        errors=totals.get("errors", {}),
        pending_by_kind=totals.get("pending_by_kind", {}),
        pending_by_state=totals.get("pending_by_state", {}),
        oldest_pending_age=totals.get("oldest_pending_age", 0.0),
        pending_unavailable="; ".join(unavailable) or None,
        proxy_headers=totals.get("proxy_headers", {}),
        workers=public,
    )


class WorkersView:
    """The whole pool seen as one server, for the admin endpoint and ``--stats-every``.

    It has the reading side of :class:`~iocp_echo.EchoServer`: ``host``, ``port``,
    ``backend_name``, ``is_serving()``, ``stats()`` (a :class:`WorkersStats`: totals, and
    each worker's own), ``pending_operations()`` (every worker's, oldest first, each a
    :class:`WorkerOperation` naming its worker and pid; at most the 1,000 oldest per worker)
    and ``snapshot()``.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @property
    def host(self) -> str:
        return self._pool.host

    @property
    def port(self) -> int:
        return self._pool.port

    @property
    def backend_name(self) -> str:
        return f"{self._pool.backend_name}, {self._pool.workers} workers"

    def is_serving(self) -> bool:
        return self._pool.is_serving()

    @property
    def draining(self) -> bool:
        return self._pool.draining

    def readiness(self) -> str:
        """As :meth:`EchoServer.readiness <iocp_echo.EchoServer.readiness>`, for the pool:
        ``"starting"`` too, while no worker is ready; ``"full"`` when the workers' open
        connections reach ``max_connections`` (asked of them at most once a second)."""
        if not self._pool.is_serving():
            return "closing"
        if self._pool.draining:
            return "draining"
        if not self._pool.ready_workers():
            return "starting"
        limit = self._pool.max_connections
        if limit is not None:
            entries = self._pool.collect(max_age=1.0)
            if sum(e["stats"]["open_connections"] for e in entries if e["stats"]) >= limit:
                return "full"
        return "ready"

    def is_ready(self) -> bool:
        return self.readiness() == "ready"

    def stats(self) -> WorkersStats:
        return _sum_stats(self._pool.collect())

    def pending_operations(self) -> list[WorkerOperation]:
        operations = []
        # The admin endpoint and log_stats() ask for stats() and then at once for this: the
        # same answers serve both, so totals and the list agree.
        for entry in self._pool.collect(max_age=0.5):
            snapshot = entry.get("snapshot")
            if snapshot is None:
                continue
            for op in snapshot["operations"]:
                operations.append(
                    WorkerOperation(
                        kind=op["kind"],
                        state=op["state"],
                        fileno=op["fileno"],
                        local=address_from_json(op["local"]),
                        peer=address_from_json(op["peer"]),
                        nbytes=op["nbytes"],
                        started=op["started"],
                        age=op["age"],
                        worker=entry["worker"],
                        pid=entry["pid"],
                    )
                )
        operations.sort(key=lambda op: -op.age)
        return operations

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "server": {
                "host": self.host,
                "port": self.port,
                "backend": self.backend_name,
                "python": sys.version.split()[0],
                "serving": self.is_serving(),
                "readiness": self.readiness(),
            },
            "stats": dataclasses.asdict(stats),
            "operations": [op.as_dict() for op in self.pending_operations()],
            "operations_unavailable": stats.pending_unavailable,
            "time": time.monotonic(),
        }

    def __repr__(self) -> str:
        return (
            f"<WorkersView {format_address((self.host, self.port))} workers={self._pool.workers}>"
        )
