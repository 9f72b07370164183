"""The Prometheus page (``iocp_echo.metrics``), read back with the official parser.

``prometheus_client``'s parser is lax (a sample whose family is not the one just declared
becomes a family of its own, untyped), so :func:`parse` also checks what it lets through:
every family declared once, typed, with its samples under it.  The counters are compared with
``ServerStats`` taken in the same loop step, with no ``await`` in between, so that nothing can
change between the two and the comparison is exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
import socket
import sys
import threading
import time
import typing
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import iocp_echo
from iocp_echo import introspection, metrics, proxy_protocol, workers
from iocp_echo._workers_view import WorkersView
from iocp_echo.metrics import CONTENT_TYPE, render_metrics
from iocp_echo.server import ServerStats

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_exactly, recv_until_eof, reset, wait_until

KINDS = ("accept", "recv", "send", "unknown")
STATES = ("pending", "cancelling", "completing")
#: Families with one sample per server (per worker under --workers), and the field of
#: ServerStats each one shows.
SERVER_FIELDS = {
    "iocp_echo_connections_open": "open_connections",
    "iocp_echo_connections_total": "total_connections",
    "iocp_echo_connections_refused_total": "refused_connections",
    "iocp_echo_accept_failures_total": "failed_accepts",
    "iocp_echo_received_bytes_total": "bytes_received",
    "iocp_echo_sent_bytes_total": "bytes_sent",
    "iocp_echo_unsent_bytes": "bytes_unsent",
    "iocp_echo_reading_paused_connections": "reading_paused",
}


def parse(text: str) -> dict[str, Metric]:
    """The page's families by sample name (``_total`` included), checked for what the lax
    parser accepts: one block per family, each typed, with HELP; every line ends the page."""
    assert text.endswith("\n")
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge"), (family.name, family.type)
        assert family.documentation, family.name
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name not in families, f"{name} is written in more than one block"
        families[name] = family
    declared = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(declared) == len(set(declared)) == len(families)
    return families


def samples(families: dict[str, Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """*name*'s samples: sorted labels -> value."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for sample in families[name].samples:
        assert sample.name == name
        key = tuple(sorted(sample.labels.items()))
        assert key not in found, f"{name}{key} written twice"
        found[key] = sample.value
    return found


def value(families: dict[str, Metric], name: str, **labels: str) -> float:
    return samples(families, name)[tuple(sorted(labels.items()))]


# -- a real server ---------------------------------------------------------------------------


@pytest.mark.backend
async def test_counters_are_the_server_stats_after_echoes_a_reset_and_a_refusal() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0, max_connections=2) as server:
        loop = asyncio.get_running_loop()
        for size in (1, 1000, 70_000):
            assert await echo(server.port, b"x" * size) == b"x" * size
        held = await connect(server.port)
        await loop.sock_sendall(held, b"held")
        assert await recv_exactly(held, 4) == b"held"
        resetting = await connect(server.port)
        await loop.sock_sendall(resetting, b"partial")
        assert await recv_exactly(resetting, 7) == b"partial"
        reset(resetting)
        resetting.close()
        await wait_until(lambda: sum(server.stats().errors.values()) == 1, what="the reset")
        await wait_until(lambda: server.stats().open_connections == 1, what="one open")
        second = await connect(server.port)
        await wait_until(lambda: server.stats().open_connections == 2, what="two open")
        refused = await connect(server.port)  # past max_connections=2: closed at once
        try:
            assert await recv_until_eof(refused, timeout=10) == b""
        except ConnectionError:
            pass
        refused.close()
        await wait_until(lambda: server.stats().refused_connections == 1, what="the refusal")

        # One loop step: nothing runs between these calls, so they see the same server.
        before = server.stats()
        operations = server.pending_operations()
        text = render_metrics(server)
        after = server.stats()

        families = parse(text)
        for name, field in SERVER_FIELDS.items():
            assert samples(families, name) == {(): getattr(before, field)}, name
        assert before.total_connections == 6 and before.refused_connections == 1
        assert before.bytes_received == before.bytes_sent == 1 + 1000 + 70_000 + 4 + 7
        errors = samples(families, "iocp_echo_errors_total")
        assert errors == {(("class", k),): n for k, n in before.errors.items()}
        assert sum(errors.values()) == 1
        expected = Counter((op.kind, op.state) for op in operations)
        assert expected and all(op.age >= 0 for op in operations)
        # Every kind and state introspection knows has its series, 0 when none.
        assert samples(families, "iocp_echo_pending_operations") == {
            (("kind", kind), ("state", state)): expected[kind, state]
            for kind in typing.get_args(introspection.Kind)
            for state in typing.get_args(introspection.State)
        }
        oldest = value(families, "iocp_echo_oldest_pending_operation_age_seconds")
        assert before.oldest_pending_age <= oldest <= after.oldest_pending_age
        assert dataclasses.replace(after, oldest_pending_age=0.0) == dataclasses.replace(
            before, oldest_pending_age=0.0
        )
        assert value(families, "iocp_echo_ready") == 0  # max_connections open: full
        assert value(families, "iocp_echo_draining") == 0
        assert samples(families, "iocp_echo_info") == {
            (("backend", server.backend_name), ("python", python_version())): 1
        }
        assert "iocp_echo_pending_operations_unavailable" not in families
        assert "iocp_echo_worker_up" not in families
        second.close()
        await wait_until(lambda: server.stats().open_connections == 1, what="one open again")
        families = parse(render_metrics(server))
        assert value(families, "iocp_echo_ready") == 1
        assert value(families, "iocp_echo_draining") == 0
        server.start_draining()
        families = parse(render_metrics(server))
        assert value(families, "iocp_echo_ready") == 0
        assert value(families, "iocp_echo_draining") == 1
        held.close()
    assert_nothing_left(server)


@pytest.mark.backend
async def test_proxy_header_outcomes_are_counted_only_with_the_proxy_protocol_on() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as plain:
        assert "iocp_echo_proxy_headers_total" not in parse(render_metrics(plain))
    assert_nothing_left(plain)
    async with await iocp_echo.serve_echo("127.0.0.1", 0, proxy_protocol=True) as proxied:
        header = proxy_protocol.encode_v1(("192.0.2.7", 40000), ("192.0.2.1", 80))
        loop = asyncio.get_running_loop()
        client = await connect(proxied.port)
        await loop.sock_sendall(client, header + b"hello")
        assert await recv_exactly(client, 5) == b"hello"
        client.close()
        malformed = await connect(proxied.port)
        await loop.sock_sendall(malformed, b"PROXY nonsense\r\n")
        try:
            assert await recv_until_eof(malformed, timeout=10) == b""  # never echoed
        except ConnectionError:
            pass
        malformed.close()
        await wait_until(lambda: proxied.stats().proxy_headers["malformed"] == 1, what="counted")
        await wait_until(lambda: proxied.stats().open_connections == 0, what="both closed")
        stats = proxied.stats()
        families = parse(render_metrics(proxied))
        assert samples(families, "iocp_echo_proxy_headers_total") == {
            (("outcome", outcome),): stats.proxy_headers[outcome]
            for outcome in proxy_protocol.OUTCOMES
        }
        assert value(families, "iocp_echo_proxy_headers_total", outcome="v1") == 1
        assert value(families, "iocp_echo_proxy_headers_total", outcome="malformed") == 1
    assert_nothing_left(proxied)


@pytest.mark.backend
async def test_names_types_and_units_follow_the_prometheus_conventions(
    server: iocp_echo.EchoServer,
) -> None:
    assert await echo(server.port, b"ping") == b"ping"
    text = render_metrics(server)
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    text.encode("utf-8")  # the charset it is served with
    for name, family in parse(text).items():
        assert name.startswith("iocp_echo_"), name
        assert (family.type == "counter") == name.endswith("_total"), name
        base = name.removesuffix("_total")
        if "bytes" in base:
            assert base.endswith("_bytes"), name
        if "seconds" in base or "age" in base:
            assert base.endswith("_seconds"), name
        assert family.type != "counter" or all(s.value >= 0 for s in family.samples), name
    # A family's HELP and TYPE come once, before all of its samples (the text format's rule).
    current = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] == current, line


# -- rendering, from sources made for the test -------------------------------------------------


class FakeServer:
    """An EchoServer-shaped source whose stats the test chooses."""

    def __init__(
        self,
        stats: ServerStats,
        operations: Sequence[metrics.Operation] = (),
        *,
        backend_name: str = "fake",
        unavailable: str | None = None,
    ) -> None:
        self.backend_name = backend_name
        self._stats = stats
        self._operations = operations
        self._unavailable = unavailable
        self.draining = False

    def is_ready(self) -> bool:
        return True

    def is_serving(self) -> bool:
        return True

    def stats(self) -> ServerStats:
        return self._stats

    def pending_operations(self) -> Sequence[metrics.Operation]:
        if self._unavailable is not None:
            raise introspection.IntrospectionUnavailable(self._unavailable)
        return self._operations


def make_stats(**fields: Any) -> ServerStats:
    base: dict[str, Any] = {
        "open_connections": 0,
        "total_connections": 0,
        "refused_connections": 0,
        "failed_accepts": 0,
        "bytes_received": 0,
        "bytes_sent": 0,
        "bytes_unsent": 0,
        "reading_paused": 0,
    }
    base.update(fields)
    return ServerStats(**base)


#: Label and HELP text the format must carry: quotes, backslashes, newlines, the separators
#: of the format itself, and any other character.
awkward_text = st.text(
    alphabet=st.one_of(st.sampled_from('\\"\n\r\t ,={}#'), st.characters(codec="utf-8")),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    errors=st.dictionaries(awkward_text, st.integers(0, 2**63)),
    backend=awkward_text,
    reason=awkward_text,
)
def test_label_values_round_trip_through_the_parser(
    errors: dict[str, int], backend: str, reason: str
) -> None:
    source = FakeServer(make_stats(errors=errors), backend_name=backend, unavailable=reason)
    families = parse(render_metrics(source))
    assert samples(families, "iocp_echo_errors_total") == {
        (("class", k),): n for k, n in errors.items()
    }
    assert samples(families, "iocp_echo_info") == {
        (("backend", backend), ("python", python_version())): 1
    }
    assert samples(families, "iocp_echo_pending_operations_unavailable") == {
        (("reason", reason),): 1
    }


@settings(max_examples=300, deadline=None)
@given(text=awkward_text.filter(lambda t: t == t.strip()))
def test_help_text_round_trips_through_the_parser(text: str) -> None:
    # The parser strips every line, so text with surrounding blanks cannot come back whole.
    page = f"# HELP x {metrics._escape_help(text)}\n# TYPE x gauge\nx 1\n"
    (family,) = text_string_to_metric_families(page)
    assert family.documentation == text


def test_unavailable_operations_are_not_guessed() -> None:
    source = FakeServer(make_stats(pending_unavailable='no "proactor"\\cache\nhere'))
    families = parse(render_metrics(source))
    assert samples(families, "iocp_echo_pending_operations") == {}
    assert "iocp_echo_oldest_pending_operation_age_seconds" in families
    assert samples(families, "iocp_echo_oldest_pending_operation_age_seconds") == {}
    assert samples(families, "iocp_echo_pending_operations_unavailable") == {
        (("reason", 'no "proactor"\\cache\nhere'),): 1
    }


def test_values_are_written_exactly() -> None:
    big = 2**64 + 1  # beyond a float's 53 bits: written as the integer it is
    source = FakeServer(make_stats(bytes_received=big, oldest_pending_age=1e-9))
    text = render_metrics(source)
    assert f"iocp_echo_received_bytes_total {big}\n" in text
    assert metrics._format_value(math.inf) == "+Inf"
    assert metrics._format_value(-math.inf) == "-Inf"
    assert metrics._format_value(math.nan) == "NaN"
    assert value(parse(text), "iocp_echo_oldest_pending_operation_age_seconds") == 1e-9


# -- under --workers --------------------------------------------------------------------------


class FakePool:
    """The few things :class:`WorkersView` reads of a pool, answering what the test says."""

    host = "127.0.0.1"
    port = 8080
    backend_name = "fake"

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    @property
    def workers(self) -> int:
        return len(self.entries)

    def is_serving(self) -> bool:
        return True

    draining = False
    max_connections = None

    def ready_workers(self) -> int:
        return sum(e["stats"] is not None for e in self.entries)

    def collect(self, max_age: float = 0.0) -> list[dict[str, Any]]:
        return self.entries


def entry(
    worker: int,
    stats: ServerStats | None,
    operations: Sequence[tuple[str, str]] = (),
    *,
    restarts: int = 0,
) -> dict[str, Any]:
    """One worker's answer, as WorkerPool.collect() gives it (None: it did not answer)."""
    if stats is None:
        return {
            "worker": worker,
            "pid": None,
            "state": "restarting",
            "restarts": restarts,
            "stats": None,
            "error": "worker is restarting",
        }
    listed = [
        {
            "kind": kind,
            "state": state,
            "fileno": 3,
            "local": ["127.0.0.1", 8080],
            "peer": None,
            "nbytes": 0,
            "started": 0.0,
            "age": 1.0,
        }
        for kind, state in operations
    ]
    as_dict = dataclasses.asdict(stats)
    return {
        "worker": worker,
        "pid": 1000 + worker,
        "state": "running",
        "restarts": restarts,
        "stats": as_dict,
        "error": None,
        "snapshot": {
            "stats": as_dict,
            "operations": listed,
            "operations_total": sum(stats.pending_by_kind.values()),
            "operations_unavailable": None,
            "serving": True,
        },
    }


def pending_stats(operations: Sequence[tuple[str, str]], **fields: Any) -> ServerStats:
    """Stats whose pending counts are those of *operations*."""
    return make_stats(
        pending_by_kind=dict(Counter(kind for kind, _ in operations)),
        pending_by_state=dict(Counter(state for _, state in operations)),
        oldest_pending_age=1.0 if operations else 0.0,
        **fields,
    )


def test_every_worker_has_its_own_samples_and_a_silent_one_only_worker_up() -> None:
    ops1 = [("accept", "pending"), ("recv", "pending"), ("recv", "cancelling")]
    ops3 = [("accept", "pending")]
    stats1 = pending_stats(ops1, open_connections=2, total_connections=7, errors={"OSError": 2})
    stats3 = pending_stats(ops3, total_connections=1, bytes_received=5, bytes_sent=5)
    view = WorkersView(
        FakePool(
            [
                entry(1, stats1, ops1),
                entry(2, None, restarts=3),
                entry(3, stats3, ops3, restarts=1),
            ]
        )
    )
    families = parse(render_metrics(view))
    assert samples(families, "iocp_echo_worker_up") == {
        (("worker", "1"),): 1,
        (("worker", "2"),): 0,
        (("worker", "3"),): 1,
    }
    assert samples(families, "iocp_echo_worker_restarts_total") == {
        (("worker", "1"),): 0,
        (("worker", "2"),): 3,
        (("worker", "3"),): 1,
    }
    for name, field in SERVER_FIELDS.items():
        assert samples(families, name) == {
            (("worker", "1"),): getattr(stats1, field),
            (("worker", "3"),): getattr(stats3, field),
        }, name
    assert samples(families, "iocp_echo_errors_total") == {
        (("class", "OSError"), ("worker", "1")): 2
    }
    pending = samples(families, "iocp_echo_pending_operations")
    assert {k: n for k, n in pending.items() if n} == {
        (("kind", "accept"), ("state", "pending"), ("worker", "1")): 1,
        (("kind", "recv"), ("state", "pending"), ("worker", "1")): 1,
        (("kind", "recv"), ("state", "cancelling"), ("worker", "1")): 1,
        (("kind", "accept"), ("state", "pending"), ("worker", "3")): 1,
    }
    assert len(pending) == 2 * 10 * 3
    assert samples(families, "iocp_echo_oldest_pending_operation_age_seconds") == {
        (("worker", "1"),): 1.0,
        (("worker", "3"),): 1.0,
    }
    # The whole pool's own samples carry no worker label.
    assert samples(families, "iocp_echo_info") == {
        (("backend", "fake, 3 workers"), ("python", python_version())): 1
    }
    assert set(samples(families, "iocp_echo_ready")) == {()}


def test_a_worker_listing_only_its_oldest_operations_still_counts_exactly() -> None:
    listed = [("recv", "cancelling")] * 3 + [("send", "pending")] * 2
    unlisted = [("recv", "pending")] * 1500 + [("accept", "pending")] * 4
    view = WorkersView(FakePool([entry(1, pending_stats(listed + unlisted), listed)]))
    pending = samples(parse(render_metrics(view)), "iocp_echo_pending_operations")
    assert {k: n for k, n in pending.items() if n} == {
        (("kind", kind), ("state", state), ("worker", "1")): n
        for (kind, state), n in Counter(listed + unlisted).items()
    }


def test_a_worker_whose_unlisted_operations_mix_kinds_and_states_is_unavailable() -> None:
    listed = [("recv", "pending")]
    unlisted = [("recv", "cancelling"), ("send", "pending")]
    view = WorkersView(FakePool([entry(1, pending_stats(listed + unlisted), listed)]))
    families = parse(render_metrics(view))
    assert samples(families, "iocp_echo_pending_operations") == {}
    (reason,) = samples(families, "iocp_echo_pending_operations_unavailable")
    assert reason[1] == ("worker", "1") and "listed 1 of its 3" in reason[0][1]
    # The oldest age is known exactly all the same.
    assert samples(families, "iocp_echo_oldest_pending_operation_age_seconds") == {
        (("worker", "1"),): 1.0
    }


operation = st.tuples(st.sampled_from(KINDS), st.sampled_from(STATES))


@given(operations=st.lists(operation, max_size=60), listed=st.integers(0, 60))
def test_joint_counts_are_exact_or_unknown(operations: list[tuple[str, str]], listed: int) -> None:
    ops = [Op(kind, state) for kind, state in operations]
    stats = pending_stats(operations)
    joint = metrics._joint_counts(ops[:listed], stats.pending_by_kind, stats.pending_by_state)
    unlisted = operations[listed:]
    if len({s for _, s in unlisted}) <= 1 or len({k for k, _ in unlisted}) <= 1:
        assert joint == Counter(operations)
    else:
        assert joint is None


@pytest.mark.backend
def test_a_real_worker_pool_has_one_sample_per_worker() -> None:
    pool = workers.WorkerPool("127.0.0.1", 0, workers=2)
    loops: list[asyncio.AbstractEventLoop] = []
    ready = threading.Event()
    found: list[tuple[str, workers.WorkersStats]] = []
    failures: list[BaseException] = []

    def on_ready(pool: workers.WorkerPool) -> None:
        loops.append(asyncio.get_running_loop())
        ready.set()

    async def scrape() -> tuple[workers.WorkersStats, str, workers.WorkersStats]:
        # Each of these asks every worker afresh (over the control pipes): once the workers
        # are idle, nothing changes from one to the next.
        return pool.view.stats(), render_metrics(pool.view), pool.view.stats()

    def client() -> None:
        try:
            if not ready.wait(120):
                raise AssertionError("the workers never became ready")
            for size in range(1, 21):
                with socket.create_connection(("127.0.0.1", pool.port), timeout=30) as sock:
                    sock.sendall(b"y" * size)
                    assert recv_all(sock, size) == b"y" * size
            # Each worker counts its connection once it has seen it close.
            deadline = time.monotonic() + 60
            while True:
                before, text, after = asyncio.run_coroutine_threadsafe(scrape(), loops[0]).result(
                    60
                )
                if before.total_connections == 20 and before.open_connections == 0:
                    found.append((text, after))
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the workers never counted 20 connections: {before}")
                time.sleep(0.02)
        except BaseException as exc:
            failures.append(exc)
        finally:
            signal.raise_signal(signal.SIGINT)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        pool.run(on_ready=on_ready)
    finally:
        thread.join(120)
    if failures:
        raise failures[0]
    ((text, stats),) = found
    families = parse(text)
    assert samples(families, "iocp_echo_worker_up") == {
        (("worker", "1"),): 1,
        (("worker", "2"),): 1,
    }
    assert samples(families, "iocp_echo_worker_restarts_total") == {
        (("worker", "1"),): 0,
        (("worker", "2"),): 0,
    }
    for name, field in SERVER_FIELDS.items():
        assert samples(families, name) == {
            (("worker", str(e["worker"])),): e["stats"][field] for e in stats.workers
        }, name
    received = samples(families, "iocp_echo_received_bytes_total")
    assert sum(received.values()) == sum(range(1, 21))
    assert sum(samples(families, "iocp_echo_connections_total").values()) == 20
    pending = samples(families, "iocp_echo_pending_operations")
    assert {labels[2] for labels in pending} == {("worker", "1"), ("worker", "2")}


# -- helpers ------------------------------------------------------------------------------------


def python_version() -> str:
    return sys.version.split()[0]


@dataclasses.dataclass(frozen=True)
class Op:
    """Stands in for a PendingOperation."""

    kind: str
    state: str


def recv_all(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)
