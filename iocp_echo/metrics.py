"""A server's counters in the Prometheus text exposition format (version 0.0.4).

Operators watch fleets with Prometheus, which scrapes a page of ``name{labels} value`` lines;
:func:`render_metrics` writes that page for an :class:`~iocp_echo.EchoServer` or for the
supervisor's :class:`~iocp_echo.workers.WorkersView` under ``--workers``, and the admin
endpoint serves it as ``GET /metrics`` with :data:`CONTENT_TYPE`.  The format is small enough
to write with the standard library, and iocp_echo has no run-time dependency: the tests read
the output back with the official ``prometheus_client`` parser.

The names follow Prometheus' conventions: the ``iocp_echo_`` prefix, base units in the name
(``_bytes``, ``_seconds``), ``_total`` on every counter and on nothing else.  Every family is
written as one block (``# HELP``, ``# TYPE``, then all its samples), which the format requires.

Under ``--workers`` every sample that describes a server carries a ``worker`` label, one
sample per worker, rather than being summed: a restarted worker starts its counters again
from zero, and Prometheus' ``rate()`` recognises that reset only on the worker's own series
(a sum would merely dip).  ``sum without (worker) (...)`` gives the totals.  A worker that did
not answer contributes ``iocp_echo_worker_up{worker="N"} 0`` and its restart count, and no
sample that would have to be made up.

Pending operations are counted jointly by kind and state, every kind and state introspection
knows always written (0 when none), so that a series never vanishes when it falls to zero.
Where the pending operations cannot be listed (:class:`~iocp_echo.IntrospectionUnavailable`)
they are not guessed: that server's ``iocp_echo_pending_operations`` and
``iocp_echo_oldest_pending_operation_age_seconds`` samples are left out, and
``iocp_echo_pending_operations_unavailable{reason="..."} 1`` says why.  A worker sends its
supervisor its 1,000 oldest operations only, with exact counts by kind and by state: the rest
are counted jointly when they are all of one state or all of one kind (nearly always: they
are all pending), and otherwise that worker's joint counts are reported unavailable the same
way (its oldest age is still known, and written).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from . import introspection
from ._server_stats import ServerStats
from ._workers_view import WorkerOperation, WorkersStats

__all__ = ["CONTENT_TYPE", "MetricsSource", "Operation", "render_metrics"]

#: The Content-Type of :func:`render_metrics`' page (the text format's, version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_KINDS: tuple[str, ...] = typing.get_args(introspection.Kind)
_STATES: tuple[str, ...] = typing.get_args(introspection.State)


class Operation(Protocol):
    """What the metrics read of a pending operation (a
    :class:`~iocp_echo.introspection.PendingOperation` or a worker's
    :class:`~iocp_echo.workers.WorkerOperation`)."""

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> str: ...


class MetricsSource(Protocol):
    """What :func:`render_metrics` reads: :class:`~iocp_echo.EchoServer` and
    :class:`~iocp_echo.workers.WorkersView` both have it.

    When ``stats()`` returns a :class:`~iocp_echo.workers.WorkersStats`, the source is a pool
    of workers, and ``pending_operations()`` lists :class:`~iocp_echo.workers.WorkerOperation`
    records naming their worker.
    """

    @property
    def backend_name(self) -> str: ...

    @property
    def draining(self) -> bool: ...

    def is_ready(self) -> bool: ...

    def stats(self) -> ServerStats: ...

    def pending_operations(self) -> Sequence[Operation]: ...


_Labels = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    name: str
    type: Literal["counter", "gauge"]
    help: str
    #: Written only when it has samples (otherwise HELP and TYPE stand alone).
    optional: bool = False
    samples: list[tuple[_Labels, float]] = field(default_factory=list)

    def add(self, labels: _Labels, value: float) -> None:
        self.samples.append((labels, value))


class _Page:
    """The families of one page, in the order they are written."""

    def __init__(self) -> None:
        self._families: list[_Family] = []
        self.info = self._new("info", "gauge", "Always 1: the server's backend and Python.")
        self.ready = self._new(
            "ready", "gauge", "1 while the server accepts and would take a new connection."
        )
        self.draining = self._new(
            "draining", "gauge", "1 once the server drains before stopping (readiness is 0)."
        )
        self.worker_up = self._new(
            "worker_up", "gauge", "1 when the worker answered this scrape, 0 otherwise.", True
        )
        self.worker_restarts = self._new(
            "worker_restarts_total", "counter", "Times the supervisor restarted the worker.", True
        )
        self.open = self._new("connections_open", "gauge", "Connections open now.")
        self.total = self._new("connections_total", "counter", "Connections accepted and served.")
        self.refused = self._new(
            "connections_refused_total",
            "counter",
            "Connections closed at once because max_connections were open.",
        )
        self.failed_accepts = self._new(
            "accept_failures_total", "counter", "Accepts that failed (the server kept accepting)."
        )
        self.received = self._new("received_bytes_total", "counter", "Bytes received from clients.")
        self.sent = self._new("sent_bytes_total", "counter", "Bytes sent to clients.")
        self.unsent = self._new(
            "unsent_bytes", "gauge", "Bytes written by the server and not yet sent."
        )
        self.paused = self._new(
            "reading_paused_connections",
            "gauge",
            "Connections not read from because their peer does not read its echoes.",
        )
        self.errors = self._new(
            "errors_total", "counter", "Connections and accepts lost to an error, by its class."
        )
        self.proxy_headers = self._new(
            "proxy_headers_total",
            "counter",
            "PROXY protocol headers by outcome (written only with the PROXY protocol on).",
            True,
        )
        self.pending = self._new(
            "pending_operations", "gauge", "Operations in flight by kind and state."
        )
        self.pending_unavailable = self._new(
            "pending_operations_unavailable",
            "gauge",
            "1 when the operations in flight cannot be listed; the reason says why.",
            True,
        )
        self.oldest = self._new(
            "oldest_pending_operation_age_seconds",
            "gauge",
            "Age of the oldest operation in flight (0 when none).",
        )

    def _new(
        self, name: str, type: Literal["counter", "gauge"], help: str, optional: bool = False
    ) -> _Family:
        family = _Family(f"iocp_echo_{name}", type, help, optional)
        self._families.append(family)
        return family

    def render(self) -> str:
        lines = []
        for family in self._families:
            if family.optional and not family.samples:
                continue
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.type}")
            for labels, value in family.samples:
                lines.append(f"{family.name}{_format_labels(labels)} {_format_value(value)}")
        return "\n".join(lines) + "\n"

    def add_server(
        self, labels: _Labels, stats: ServerStats, pending: Mapping[tuple[str, str], int] | str
    ) -> None:
        """One server's samples (one worker's, under ``--workers``): *pending* counts its
        operations by (kind, state), or says why they are not known."""
        self.open.add(labels, stats.open_connections)
        self.total.add(labels, stats.total_connections)
        self.refused.add(labels, stats.refused_connections)
        self.failed_accepts.add(labels, stats.failed_accepts)
        self.received.add(labels, stats.bytes_received)
        self.sent.add(labels, stats.bytes_sent)
        self.unsent.add(labels, stats.bytes_unsent)
        self.paused.add(labels, stats.reading_paused)
        for error_class, count in sorted(stats.errors.items()):
            self.errors.add((*labels, ("class", error_class)), count)
        for outcome, count in sorted(stats.proxy_headers.items()):
            self.proxy_headers.add((*labels, ("outcome", outcome)), count)
        if stats.pending_unavailable is None:  # the oldest age is known even if not the list
            self.oldest.add(labels, stats.oldest_pending_age)
        if isinstance(pending, str):
            self.pending_unavailable.add((*labels, ("reason", pending)), 1)
            return
        kinds = [*_KINDS, *sorted({k for k, _ in pending} - set(_KINDS))]
        states = [*_STATES, *sorted({s for _, s in pending} - set(_STATES))]
        for kind in kinds:
            for state in states:
                count = pending.get((kind, state), 0)
                self.pending.add((*labels, ("kind", kind), ("state", state)), count)


def render_metrics(source: MetricsSource) -> str:
    """*source*'s metrics as a page of the Prometheus text format 0.0.4 (see the module
    docstring); serve it with :data:`CONTENT_TYPE`.

    Call it on the loop's thread, as ``stats()`` and ``pending_operations()`` are called.
    """
    # stats() first: under --workers it collects every worker's answer, which is_ready() and
    # pending_operations() then reuse instead of asking the workers again.
    stats = source.stats()
    page = _Page()
    page.info.add((("backend", source.backend_name), ("python", sys.version.split()[0])), 1)
    page.ready.add((), source.is_ready())
    page.draining.add((), source.draining)
    if isinstance(stats, WorkersStats):
        _add_workers(page, source, stats)
        return page.render()
    pending: Counter[tuple[str, str]] | str
    if stats.pending_unavailable is not None:
        pending = stats.pending_unavailable
    else:
        try:
            pending = Counter((op.kind, op.state) for op in source.pending_operations())
        except introspection.IntrospectionUnavailable as exc:
            pending = str(exc)
    page.add_server((), stats, pending)
    return page.render()


def _add_workers(page: _Page, source: MetricsSource, stats: WorkersStats) -> None:
    """Every worker's samples, labelled by worker number.

    The view's ``pending_operations()`` comes from the answers ``stats()`` just collected (it
    reuses them for half a second), so a worker's listed operations and its counts agree.
    """
    listed: dict[int, list[Operation]] = {}
    for op in source.pending_operations():
        if isinstance(op, WorkerOperation):
            listed.setdefault(op.worker, []).append(op)
    for entry in stats.workers:
        labels = (("worker", str(entry["worker"])),)
        page.worker_restarts.add(labels, entry["restarts"])
        if entry["stats"] is None:
            page.worker_up.add(labels, 0)
            continue
        page.worker_up.add(labels, 1)
        worker_stats = _stats_from_dict(entry["stats"])
        pending: Counter[tuple[str, str]] | str
        if worker_stats.pending_unavailable is not None:
            pending = worker_stats.pending_unavailable
        else:
            ops = listed.get(entry["worker"], [])
            by_kind, by_state = worker_stats.pending_by_kind, worker_stats.pending_by_state
            joint = _joint_counts(ops, by_kind, by_state)
            if joint is not None:
                pending = joint
            else:
                pending = (
                    f"the worker listed {len(ops)} of its {sum(by_kind.values())} operations, "
                    "and the others mix kinds and states"
                )
        page.add_server(labels, worker_stats, pending)


def _stats_from_dict(values: Mapping[str, Any]) -> ServerStats:
    """A worker's :class:`ServerStats` back from the dict it sent."""
    return ServerStats(**{f.name: values[f.name] for f in dataclasses.fields(ServerStats)})


def _joint_counts(
    listed: Iterable[Operation], by_kind: Mapping[str, int], by_state: Mapping[str, int]
) -> Counter[tuple[str, str]] | None:
    """Operations by (kind, state), from the *listed* ones and the exact counts *by_kind* and
    *by_state*; None when they cannot be known.

    A worker sends its oldest 1,000 operations only, with exact counts by kind and by state.
    The unlisted ones are known jointly when they are all of one state (as they nearly always
    are: all pending) or all of one kind; otherwise the joint counts are not known.
    """
    joint = Counter((op.kind, op.state) for op in listed)
    rest_kinds = Counter(by_kind)
    rest_states = Counter(by_state)
    for (kind, state), count in joint.items():
        rest_kinds[kind] -= count
        rest_states[state] -= count
    if any(n < 0 for n in rest_kinds.values()) or any(n < 0 for n in rest_states.values()):
        return None  # the list and the counts are not of the same moment
    if rest_kinds.total() != rest_states.total():
        return None
    kinds = [k for k, n in rest_kinds.items() if n]
    states = [s for s, n in rest_states.items() if n]
    if not kinds:
        return joint
    if len(states) == 1:
        for kind in kinds:
            joint[kind, states[0]] += rest_kinds[kind]
    elif len(kinds) == 1:
        for state in states:
            joint[kinds[0], state] += rest_states[state]
    else:
        return None
    return joint


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: _Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in labels) + "}"


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
