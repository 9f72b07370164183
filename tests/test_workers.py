"""Worker processes (``run_workers``, ``--workers N``): one listener, several processes.

Most tests run the supervisor in this process (its signal handlers need the main thread) with
the client in a thread, so they run the same natively (io_uring workers on a SO_REUSEPORT
group) and on Windows CPython under Wine (the supervisor accepts and hands each connection to
a worker in turn, through ``socket.share``), where a stop signal can only be raised
in-process.  The tests that need an exit status run the CLI as a subprocess; whatever an
assertion does, their clean-up kills every process they started (the supervisor, its workers,
and on Linux every process of the session, Wine's included).  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iocp_echo import inspector, workers
from iocp_echo.errors import AddressInUseError

from .helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo.py")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(backend: (.+)\)")
WORKER_PIDS = re.compile(r"worker (\d+) pid (\d+)")
ADMIN = re.compile(r"admin snapshot on http://127\.0\.0\.1:(\d+)/")
#: What kills a worker from outside: TerminateProcess on Windows (os.kill with any signal).
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)


def snapshot(admin_port: int) -> dict[str, Any]:
    return inspector.fetch(f"127.0.0.1:{admin_port}", timeout=30, limit=1000)


def worker_entries(admin_port: int) -> list[dict[str, Any]]:
    entries = snapshot(admin_port)["stats"]["workers"]
    assert isinstance(entries, list)
    return entries


def echo_once(port: int, payload: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(65536, size - len(data)))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def process_gone(pid: int) -> bool:
    """Whether no process *pid* runs any more (POSIX: signal 0; Windows: its handle)."""
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return True
        try:
            return bool(kernel32.WaitForSingleObject(handle, 0) == 0)  # WAIT_OBJECT_0: exited
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):  # a zombie whose new parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def _linux_processes() -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, session id), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return found


def process_tree(pid: int) -> set[int]:
    """*pid*'s descendants (through parent links) and, when it leads a session, every process
    of that session: Wine starts Windows processes by forking twice, so a worker under Wine
    has init for its parent but stays in the session.  Empty off Linux."""
    if not sys.platform.startswith("linux"):
        return set()
    table = _linux_processes()
    tree = {p for p, (_, session) in table.items() if session == pid}
    tree.add(pid)
    grew = True
    while grew:
        children = {p for p, (parent, _) in table.items() if parent in tree} - tree
        grew = bool(children)
        tree |= children
    tree.discard(pid)
    return tree


def kill_tree(process: subprocess.Popen[str]) -> None:
    """Kill *process* and every process it started (see :func:`process_tree`), wait for it.

    The clean-up of every test that starts the CLI: it must not depend on the test's
    assertions having passed, and must leave nothing running."""
    for _ in range(3):  # again, in case one of them was starting a process as we killed
        tree = process_tree(process.pid)
        with contextlib.suppress(OSError):
            process.kill()
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, KILL)
        if not tree:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=60)


def run_pool(
    client: Callable[[workers.WorkerPool, int], None],
    *,
    stop_signal: int = signal.SIGINT,
    host: Any = "127.0.0.1",  # None: every address (0.0.0.0 and ::)
    **options: Any,
) -> workers.WorkerPool:
    """Run a 2-worker pool here (main thread) and *client(pool, admin_port)* in a thread,
    then stop the pool with *stop_signal*, raised in this process as a console would."""
    pool = workers.WorkerPool(host, 0, workers=2, **options)
    admin: list[int] = []
    ready = threading.Event()
    failures: list[BaseException] = []

    def on_admin(port: int) -> None:
        admin.append(port)
        ready.set()

    def body() -> None:
        try:
            if not ready.wait(120):
                raise AssertionError("the workers never became ready")
            client(pool, admin[0])
        except BaseException as exc:
            failures.append(exc)
        finally:
            signal.raise_signal(stop_signal)

    thread = threading.Thread(target=body)
    thread.start()
    try:
        pool.run(admin_port=0, on_admin=on_admin)
    finally:
        thread.join(120)
    if failures:
        raise failures[0]
    return pool


@pytest.mark.backend
def test_two_workers_share_500_connections_every_echo_exact() -> None:
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        pids = pool.pids()
        clients = []
        seen["bytes"] = 0
        try:
            for i in range(500):
                sock = socket.create_connection(("127.0.0.1", pool.port), timeout=30)
                clients.append(sock)
                payload = f"{i}:".encode() + os.urandom(61)
                sock.sendall(payload)
                assert recv_exactly(sock, len(payload)) == payload
                seen["bytes"] += len(payload)
            document = snapshot(admin_port)
            seen["document"] = document
            seen["pids"] = pids
            seen["ports"] = {s.getsockname()[1] for s in clients}
        finally:
            for sock in clients:
                sock.close()

    pool = run_pool(client)
    document, pids = seen["document"], seen["pids"]
    stats = document["stats"]
    entries = stats["workers"]
    assert [e["worker"] for e in entries] == [1, 2]
    assert [e["pid"] for e in entries] == pids
    opened = [e["stats"]["open_connections"] for e in entries]
    assert sum(opened) == stats["open_connections"] == 500
    if sys.platform == "win32":
        assert opened == [250, 250]  # handed out in turn by the supervisor
    else:
        assert min(opened) >= 50, f"one worker got almost nothing: {opened}"  # reuseport hash
    assert stats["bytes_received"] == stats["bytes_sent"] == seen["bytes"]
    # Every client's pending read is listed, labelled with the worker (and pid) serving it.
    reads = {
        op["peer"][1]: (op["worker"], op["pid"])
        for op in document["operations"]
        if op["kind"] == "recv" and op["peer"] is not None
    }
    assert set(reads) == seen["ports"]
    assert {label for label in reads.values()} == {(1, pids[0]), (2, pids[1])}
    assert pool.pids() == [None, None]  # every worker process has exited and been waited for
    assert all(process_gone(pid) for pid in pids if pid is not None)


@pytest.mark.backend
def test_a_killed_worker_is_restarted_while_the_other_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        first = pool.pids()
        held = [socket.create_connection(("127.0.0.1", pool.port), timeout=30) for _ in range(20)]
        try:
            for sock in held:
                sock.sendall(b"hi")
                assert recv_exactly(sock, 2) == b"hi"
            owner = {
                op["peer"][1]: op["worker"]
                for op in snapshot(admin_port)["operations"]
                if op["kind"] == "recv" and op["peer"] is not None
            }
            survivors = [s for s in held if owner[s.getsockname()[1]] == 2]
            assert survivors, owner
            assert first[0] is not None
            os.kill(first[0], KILL)
            wait_for(lambda: pool.pids()[0] != first[0], 30, "worker 1's exit to be seen")
            # New clients are served throughout, and worker 2's clients keep their echo.
            served = 0

            def back() -> bool:
                nonlocal served
                assert echo_once(pool.port, b"during %d" % served) == b"during %d" % served
                served += 1
                for sock in survivors:
                    sock.sendall(b"still")
                    assert recv_exactly(sock, 5) == b"still"
                entry = worker_entries(admin_port)[0]
                return bool(
                    entry["state"] == "running"
                    and entry["pid"] not in (None, first[0])
                    and entry["stats"]["total_connections"] > 0
                )

            wait_for(back, 60, "worker 1 to come back and serve")
            seen.update(
                first=first, now=pool.pids(), served=served, entries=worker_entries(admin_port)
            )
        finally:
            for sock in held:
                sock.close()

    run_pool(client)
    first, now = seen["first"], seen["now"]
    assert now[1] == first[1]  # the other worker was never restarted
    assert now[0] not in (None, first[0])
    assert seen["entries"][0]["restarts"] == 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "iocp_echo.workers" and r.levelname == "WARNING"
    ]
    assert any(
        m.startswith(f"worker 1 (pid {first[0]}) exited unexpectedly with status ")
        for m in warnings
    ), warnings


@pytest.mark.backend
@pytest.mark.parametrize(
    "stop_signal",
    ["SIGINT", "SIGBREAK" if sys.platform == "win32" else "SIGTERM"],
)
def test_stop_signal_drains_in_flight_echoes_and_leaves_no_process(stop_signal: str) -> None:
    payload = os.urandom(200_000)
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        seen["pids"] = pool.pids()
        sock = socket.create_connection(("127.0.0.1", pool.port), timeout=30)
        seen["sock"] = sock
        sock.sendall(payload)  # and read nothing yet: the echo is in flight at the stop
        wait_for(
            lambda: snapshot(admin_port)["stats"]["bytes_received"] == len(payload),
            30,
            "the server to receive the payload",
        )

    pool = run_pool(client, stop_signal=getattr(signal, stop_signal))
    sock = seen["sock"]
    with sock:
        assert recv_exactly(sock, len(payload)) == payload
        assert sock.recv(1) == b""  # then the worker closed it on its way out
    assert pool.pids() == [None, None]
    assert all(process_gone(pid) for pid in seen["pids"])


@pytest.mark.backend
def test_max_connections_is_for_the_whole_server() -> None:
    """max_connections=2 with 2 workers: each worker takes one, so never more than 2 open."""
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        clients = [
            socket.create_connection(("127.0.0.1", pool.port), timeout=30) for _ in range(10)
        ]
        try:
            echoed = 0
            for sock in clients:
                try:
                    sock.sendall(b"x")
                    answer = sock.recv(1)
                except ConnectionError:
                    answer = b""  # refused: closed by the server, reset under Wine
                echoed += answer == b"x"
            seen["echoed"] = echoed
            seen["stats"] = snapshot(admin_port)["stats"]
        finally:
            for sock in clients:
                sock.close()

    run_pool(client, max_connections=2)
    stats = seen["stats"]
    assert 1 <= seen["echoed"] <= 2
    assert stats["open_connections"] == seen["echoed"]
    assert stats["refused_connections"] == 10 - seen["echoed"]
    assert all(e["stats"]["open_connections"] <= 1 for e in stats["workers"])


def test_restart_back_off_doubles_from_a_tenth_of_a_second() -> None:
    assert [workers.restart_delay(n) for n in range(1, workers.CRASH_LIMIT)] == [
        0.1,
        0.2,
        0.4,
        0.8,
    ]


@pytest.mark.backend
def test_max_connections_share_is_per_worker_across_all_its_listeners() -> None:
    """A host with two addresses (None: 0.0.0.0 and ::) gives every worker two listeners; with
    max_connections=2 and 2 workers the whole server still serves at most 2 at once (each
    worker 1, over both its listeners), not 1 per listener per worker."""
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        held: list[socket.socket] = []
        outcomes: list[tuple[str, bool]] = []
        try:
            for i in range(20):  # one at a time: each is served or refused before the next
                host = "127.0.0.1" if i % 2 == 0 else "::1"
                sock = socket.create_connection((host, pool.port), timeout=30)
                held.append(sock)
                try:
                    sock.sendall(b"x")
                    served = sock.recv(1) == b"x"
                except ConnectionError:
                    served = False  # refused: closed by the server, reset under Wine
                outcomes.append((host, served))
            seen["outcomes"] = outcomes
            seen["stats"] = snapshot(admin_port)["stats"]
        finally:
            for sock in held:
                sock.close()

    run_pool(client, host=None, max_connections=2)
    served = [host for host, ok in seen["outcomes"] if ok]
    stats = seen["stats"]
    assert 1 <= len(served) <= 2, seen["outcomes"]
    assert stats["open_connections"] == len(served)
    assert stats["refused_connections"] == 20 - len(served)
    assert all(e["stats"]["open_connections"] <= 1 for e in stats["workers"]), stats["workers"]
    if sys.platform == "win32":  # handed out in turn: worker 1 gets IPv4, worker 2 IPv6
        assert served == ["127.0.0.1", "::1"], seen["outcomes"]


@pytest.mark.backend
def test_a_stop_signal_before_the_loop_runs_is_not_lost() -> None:
    """Ctrl-C between the signal handlers' installation and the supervisor's loop running
    stops the pool before any worker starts, instead of being dropped (the pool would then
    serve until the next signal)."""
    pool = workers.WorkerPool("127.0.0.1", 0, workers=2)
    real = pool._backend
    started: list[int | None] = []
    ready: list[bool] = []

    class SignalWhileMakingTheLoop:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def new_event_loop(self) -> Any:
            signal.raise_signal(signal.SIGINT)  # the handler runs now, with no loop yet
            return real.new_event_loop()

    pool._backend = SignalWhileMakingTheLoop()  # type: ignore[assignment]
    done = threading.Event()
    watchdog_fired = threading.Event()

    def watchdog() -> None:  # with the signal lost, run() would serve until the next one
        if not done.wait(60):
            watchdog_fired.set()
            signal.raise_signal(signal.SIGINT)

    thread = threading.Thread(target=watchdog)
    thread.start()
    try:
        pool.run(on_ready=lambda p: ready.append(True))
        started.extend(pool.pids())
    finally:
        done.set()
        thread.join(120)
    assert not watchdog_fired.is_set(), "the early Ctrl-C was dropped"
    assert ready == [] and started == [None, None]


def test_run_workers_rejects_what_cannot_cross_processes() -> None:
    with pytest.raises(TypeError, match="ssl"):
        workers.run_workers("127.0.0.1", 0, workers=2, ssl=None)
    with pytest.raises(ValueError, match="workers"):
        workers.resolve_workers(-1)
    assert workers.resolve_workers(0) == (os.cpu_count() or 1)


@pytest.mark.backend
def test_port_in_use_raises_before_any_worker_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(AddressInUseError, match=f"port {port} is already in use"):
            workers.WorkerPool("127.0.0.1", port, workers=2)


# -- the command line, as a subprocess --------------------------------------------------------


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, ECHO, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )


@contextlib.contextmanager
def cli_workers(*args: str) -> Iterator[tuple[subprocess.Popen[str], int, list[int], int]]:
    """The CLI with 2 workers and an admin endpoint: (process, port, worker pids, admin)."""
    process = start_cli("--workers", "2", "--admin-port", "0", *args)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]  # each blocks until printed
        listening = LISTENING.search(lines[0])
        admin = ADMIN.search(lines[2])
        assert listening and admin, (lines, process.stderr and process.stderr.read())
        pids = [int(pid) for _, pid in WORKER_PIDS.findall(lines[1])]
        assert len(pids) == 2, lines
        yield process, int(listening.group(1)), pids, int(admin.group(1))
    finally:
        kill_tree(process)


@pytest.mark.backend
def test_crash_loop_stops_the_server_with_exit_1_and_one_line() -> None:
    with cli_workers() as (process, port, pids, admin):
        assert echo_once(port, b"before") == b"before"
        killed: list[int] = []
        for _ in range(workers.CRASH_LIMIT):
            pid = pids[0] if not killed else None

            def running() -> bool:
                nonlocal pid
                entry = worker_entries(admin)[0]
                if entry["state"] == "running" and entry["pid"] not in (None, *killed):
                    pid = entry["pid"]
                return pid is not None

            wait_for(running, 60, "worker 1 to be running")
            assert pid is not None
            os.kill(pid, KILL)
            killed.append(pid)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("iocp-echo: error:")]
    assert errors == [err.strip().splitlines()[-1]], err
    assert "worker 1 died 5 times within 60 s" in errors[0]
    assert "Traceback" not in err
    # The back-off doubles from 0.1 s; the crash limit stops it at 0.8 s (the fifth death
    # stops the server instead of restarting it).
    delays = re.findall(r"worker 1 \(pid \d+\) exited unexpectedly .*restarting it in (\S+) s", err)
    assert delays == ["0.1", "0.2", "0.4", "0.8"], err
    assert all(process_gone(pid) for pid in [*killed, pids[1]])


@pytest.mark.backend
def test_workers_stop_by_themselves_when_the_supervisor_is_killed() -> None:
    """No worker outlives its supervisor, even one killed outright (TerminateProcess on
    Windows, where no signal reaches a process from outside)."""
    with cli_workers() as (process, port, pids, _):
        assert echo_once(port, b"orphan?") == b"orphan?"
        process.kill()
        process.communicate(timeout=60)
        wait_for(lambda: all(process_gone(pid) for pid in pids), 30, "the workers to exit")


@pytest.mark.backend
def test_cli_port_in_use_is_reported_once_before_any_worker_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = subprocess.run(
            [sys.executable, ECHO, "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    assert process.returncode == 1
    assert process.stdout == ""
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert f"port {port} is already in use" in lines[0]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--port", "80", "--workers", "2"], 1, "port 80 is out of range"),
        (["--workers", "-1"], 2, "must be 0 (one per CPU) or more"),
        (["--workers", "2", "--max-connections", "1"], 2, "shared out among 2 workers"),
    ],
)
def test_cli_worker_argument_errors(args: list[str], status: int, message: str) -> None:
    process = subprocess.run(
        [sys.executable, ECHO, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert process.returncode == status, process.stderr
    assert message in process.stderr
    assert "Traceback" not in process.stderr


@pytest.mark.backend
@pytest.mark.uring
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_native_cli_workers_stop_on_signal_with_exit_0(stop_signal: int) -> None:
    """A real signal to the supervisor, from outside (Windows: the wine_cli test below)."""
    with cli_workers("--stats-every", "0.2") as (process, port, pids, _):
        assert echo_once(port, b"Hello, workers!") == b"Hello, workers!"
        assert process.stderr is not None
        line = process.stderr.readline()  # --stats-every logs the totals (a line per 0.2 s)
        while "INFO iocp_echo.admin: connections open=" not in line:
            assert line, "no stats line before the server exited"
            line = process.stderr.readline()
        assert "total=1 " in line or "total=0 " in line, line
        process.send_signal(stop_signal)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "iocp-echo: stopped" in err and "Traceback" not in err
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.backend
@pytest.mark.uring
def test_native_cli_sigterm_to_every_process_still_drains() -> None:
    """SIGTERM to the supervisor and to every worker at once (systemd's default
    KillMode=control-group, or ``kill`` of every pid): the workers drain as on SIGTERM to the
    supervisor alone, instead of dying with the echo in flight.  (Windows has no SIGTERM to
    catch: a process is ended with TerminateProcess.)"""
    chunk = os.urandom(65536)
    with cli_workers() as (process, port, pids, admin), socket.socket() as sock:
        # A small receive window, and nothing read: sent a chunk at a time, each read by the
        # server before the next, until part of the echo waits in the worker (not in kernel
        # buffers), so a worker that dies at the signal loses it.  The worker never holds
        # more than a chunk unsent, below write_high_water: it never stops reading.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sent = 0
        stats: dict[str, Any] = {}

        def received_all() -> bool:
            stats.update(snapshot(admin)["stats"])
            return bool(stats["bytes_received"] == sent)

        deadline = time.monotonic() + 60
        while not stats.get("bytes_unsent"):
            assert time.monotonic() < deadline, "the server never had unsent bytes"
            sock.sendall(chunk)
            sent += len(chunk)
            wait_for(received_all, 30, "the server to read what was sent")
        payload = chunk * (sent // len(chunk))
        for pid in [process.pid, *pids]:
            os.kill(pid, signal.SIGTERM)
        assert recv_exactly(sock, len(payload)) == payload
        assert sock.recv(1) == b""
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "iocp-echo: stopped" in err and "Traceback" not in err
    assert "stopped with" not in err, err  # no worker ended other than with status 0
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.backend
@pytest.mark.uring
def test_native_cli_second_sigint_forces_the_stop() -> None:
    """A client that never reads keeps its worker draining; a second Ctrl-C kills it."""
    with (
        cli_workers() as (process, port, pids, admin),
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        while snapshot(admin)["stats"]["bytes_unsent"] == 0:  # the echo is stuck
            assert time.monotonic() < deadline, "the server never had unsent bytes"
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(b"x" * 65536)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        line = process.stderr.readline()
        while "stopping 2 worker(s) gracefully" not in line:
            assert line, "the supervisor never started stopping"
            line = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("iocp-echo: error: shutdown forced")
    assert all(process_gone(pid) for pid in pids)


# -- Windows CPython's CLI under Wine, driven from Linux ----------------------------------------


def _wine_workers() -> set[int]:
    """Linux pids of Wine processes running a worker (their command line names the module)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"_workers_child" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
    return found


@pytest.fixture
def wine_python(request: pytest.FixtureRequest) -> str:
    version = request.config.getoption("--wine-python")
    assert isinstance(version, str)
    return version


@pytest.mark.wine_cli
def test_wine_cli_workers_share_the_load_and_stop_on_ctrl_c(wine_python: str) -> None:
    before = _wine_workers()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tools" / "winpy.py"),
            "--python",
            wine_python,
            ECHO,
            "--port",
            "0",
            "--workers",
            "2",
            "--admin-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own session: kill_tree finds every Wine process of it
    )
    clients: list[socket.socket] = []
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        listening, admin = LISTENING.search(lines[0]), ADMIN.search(lines[2])
        assert listening and admin, lines
        assert listening.group(2) == "IOCP (asyncio ProactorEventLoop)"
        port, admin_port = int(listening.group(1)), int(admin.group(1))
        for _ in range(100):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        for i, sock in enumerate(clients):
            sock.sendall(b"%d" % i)
            assert recv_exactly(sock, len(b"%d" % i)) == b"%d" % i
        # Both workers were ready before the port was printed, and the supervisor hands the
        # connections out in turn: exactly half each.
        opened = [e["stats"]["open_connections"] for e in worker_entries(admin_port)]
        assert opened == [50, 50], opened
        running = _wine_workers() - before
        assert len(running) >= 2, running
        process.send_signal(signal.SIGINT)  # Wine turns it into a console Ctrl-C
        _, err = process.communicate(timeout=120)
        for sock in clients:
            assert sock.recv(1) == b""
    finally:
        for sock in clients:
            sock.close()
        kill_tree(process)  # whatever failed above: nothing of it keeps running
    assert process.returncode == 0, err
    assert "iocp-echo: stopped" in err and "Traceback" not in err
    wait_for(lambda: not (_wine_workers() & running), 30, "the Wine workers to exit")
