"""Worker processes: one listener, every core, supervised (``run_workers``, ``--workers N``).

One Python process runs on one core.  :func:`run_workers` opens the listening sockets in this
(the parent) process, before anything else, so that a bad or busy port is reported once, then
starts N worker processes (``_workers_child.py``) that each run their own completion loop and
echo server on what it was given.  What they are given differs by OS, and is
``_listener_sharing.py``'s business: on Windows this process accepts and hands each connection
to the next ready worker in turn (:meth:`WorkerPool._give` chooses the worker); on Linux each
worker accepts on its own listeners of a ``SO_REUSEPORT`` group.  They talk over a control pipe
(``_worker_protocol.py``).

The parent serves no connections.  It supervises: a worker that dies is restarted after a
back-off (:func:`restart_delay`: 0.1 s, doubling per death within :data:`CRASH_WINDOW`:
0.1, 0.2, 0.4, 0.8 s) with a WARNING naming its exit status, and a worker that dies
:data:`CRASH_LIMIT` times within :data:`CRASH_WINDOW` seconds stops the whole server with
:class:`WorkersFailed`, rather than restarting forever.  Ctrl-C, SIGTERM and Ctrl-Break ask
every worker to stop gracefully (in-flight echoes drain, bounded by ``shutdown_timeout``); a
second one kills them.  With ``drain_seconds``, the first one only makes the pool not ready
(the admin endpoint's ``/readyz`` answers 503, so a load balancer stops sending connections)
while the workers keep serving for that long; a second one then stops them at once.  A stop
signal that arrives while the pool is still starting is kept and acted on as soon as its loop
runs.  A worker given SIGTERM itself (a service manager signalling every process of the
service) drains the same way, after its own ``drain_seconds`` of not being ready.  No worker
outlives the parent: each treats the end of its control pipe as an order to stop.

The parent also answers for the workers: it asks each one over its control pipe
(:meth:`WorkerPool.collect`), and :class:`WorkersView` (``_workers_view.py``) turns the answers
into the ``stats()``, ``pending_operations()`` and ``snapshot()`` of an
:class:`~iocp_echo.EchoServer`, so the admin endpoint and ``--stats-every`` show totals, and
every worker's share labelled by worker number and pid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from . import _platform
from ._listener_sharing import (
    HANDS_OUT,
    HandOut,
    close_listener_sets,
    inherited_fds,
    listener_specs,
    open_listener_sets,
    share,
    worker_listeners,
)
from ._logflood import LogLimiter
from ._worker_protocol import (
    Configuration,
    HandedConnection,
    SnapshotRequest,
    Stop,
    ToWorker,
    decode,
    encode,
    worker_command,
)
from ._workers_view import WorkerOperation, WorkersStats, WorkersView
from .admin import DEFAULT_STUCK_AFTER, MAX_OPERATIONS_LIMIT, log_stats, start_admin
from .errors import IocpEchoError
from .listeners import format_address, validate_port, validate_positive
from .protocol import DEFAULT_MAX_READ
from .proxy_protocol import DEFAULT_HEADER_TIMEOUT, DEFAULT_TRUSTED, TrustedSources
from .server import (
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    EchoServer,
)

__all__ = [
    "CRASH_LIMIT",
    "CRASH_WINDOW",
    "WorkerOperation",
    "WorkerPool",
    "WorkersFailed",
    "WorkersStats",
    "WorkersView",
    "resolve_workers",
    "restart_delay",
    "run_workers",
]

logger = logging.getLogger("iocp_echo.workers")

#: A worker that dies this many times within CRASH_WINDOW seconds stops the server.
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
#: Restart back-off: the first restart after this long, doubling per death within
#: CRASH_WINDOW.  The crash limit bounds it: the longest wait is before the last restart
#: allowed, RESTART_BACKOFF * 2 ** (CRASH_LIMIT - 2) (0.8 s).
RESTART_BACKOFF = 0.1
#: How long the parent waits for the workers' answers when asked for stats.
STATS_TIMEOUT = 2.0
#: Beyond shutdown_timeout, what a worker gets to finish closing before it is killed (its
#: server waits up to 5 s for cancelled operations to come back from the kernel).
STOP_GRACE = 10.0

_SERVE_OPTIONS = (
    "max_read",
    "max_connections",
    "idle_timeout",
    "backlog",
    "write_high_water",
    "shutdown_timeout",
    "proxy_protocol",
    "proxy_from",
    "proxy_header_timeout",
    "drain_seconds",
)


class WorkersFailed(IocpEchoError):
    """The server stopped because a worker kept crashing (or could not be started)."""


class ShutdownForced(IocpEchoError):
    """A second Ctrl-C (or SIGTERM) killed the workers before they finished draining."""


def resolve_workers(workers: object) -> int:
    """*workers* as a count: 0 means one per CPU."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an integer, got {workers!r}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (one per CPU) or more, got {workers}")
    return workers or os.cpu_count() or 1


def restart_delay(recent_deaths: int) -> float:
    """How long to wait before restarting a worker that has died *recent_deaths* times
    within :data:`CRASH_WINDOW` (this death included): 0.1 s, doubling each time."""
    return RESTART_BACKOFF * (1 << (max(1, recent_deaths) - 1))


def describe_exit(status: int) -> str:
    """An exit status as a person reads it: a signal's name on POSIX, hex for NTSTATUS codes."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"status {status} (killed by {name})"
    if status > 0xFFFF:
        return f"status {status:#x}"
    return f"status {status}"


class _Worker:
    """The parent's handle on one worker slot, across restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.state = "starting"
        self.ready = False
        self.restarts = 0
        self.crashes: collections.deque[float] = collections.deque()
        self.restart_handle: asyncio.TimerHandle | None = None
        self.lock = threading.Lock()
        self.replies: dict[int, dict[str, Any]] = {}
        self.answered = threading.Condition(self.lock)

    def send(self, message: ToWorker) -> bool:
        process = self.process
        if process is None or process.stdin is None:
            return False
        try:
            process.stdin.write(encode(message).encode())
            process.stdin.flush()
        except (OSError, ValueError):
            return False  # it is exiting: its exit is reported by its reader thread
        return True


_stderr_lock = threading.Lock()


def _relay_stderr(stream: Any) -> None:
    """Copy a worker's log lines to this process's ``sys.stderr`` (whatever it is now)."""
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace")
        with _stderr_lock:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
    stream.close()


class WorkerPool:
    """The parent of N workers serving one port (see the module docstring).

    Constructing it checks every argument and opens the listening socket(s), raising what
    :func:`~iocp_echo.serve_echo` raises for them; :meth:`run` starts and supervises the
    workers until a stop is asked for.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        workers: int,
        max_read: int = DEFAULT_MAX_READ,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
        backlog: int = DEFAULT_BACKLOG,
        write_high_water: int | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        proxy_protocol: bool = False,
        proxy_from: str | Sequence[str] = DEFAULT_TRUSTED,
        proxy_header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        drain_seconds: float = 0.0,
    ) -> None:
        port = validate_port(port)
        count = resolve_workers(workers)
        validate_positive("max_read", max_read, allow_none=False)
        validate_positive("max_connections", max_connections, allow_none=True)
        validate_positive("idle_timeout", idle_timeout, allow_none=True, kind=float)
        validate_positive("backlog", backlog, allow_none=False)
        validate_positive("write_high_water", write_high_water, allow_none=True)
        validate_positive("shutdown_timeout", shutdown_timeout, allow_none=False, kind=float)
        validate_positive(
            "proxy_header_timeout", proxy_header_timeout, allow_none=False, kind=float
        )
        if not drain_seconds >= 0:
            raise ValueError(f"drain_seconds must be 0 or more, got {drain_seconds}")
        trusted = TrustedSources(proxy_from)  # a bad CIDR is reported here, not by N workers
        if max_connections is not None and max_connections < count:
            raise ValueError(
                f"max_connections={max_connections} is shared out among the {count} workers: "
                "it must be at least the number of workers"
            )
        self._backend = _platform.backend()
        self._options: dict[str, Any] = {
            "max_read": max_read,
            "idle_timeout": idle_timeout,
            "shutdown_timeout": shutdown_timeout,
            "proxy_protocol": proxy_protocol,
            "proxy_from": [str(network) for network in trusted.networks],
            "proxy_header_timeout": proxy_header_timeout,
            "drain_seconds": drain_seconds,
        }
        if write_high_water is not None:
            self._options["write_high_water"] = write_high_water
        self._max_connections = max_connections
        self._shutdown_timeout = shutdown_timeout
        self._drain_seconds = drain_seconds
        #: Not ready any more (a stop signal came with drain_seconds): workers still serve.
        self._draining = False
        self._drain_handle: asyncio.TimerHandle | None = None
        self._workers = [_Worker(i + 1) for i in range(count)]
        #: The listening sockets of each worker: the same ones for all (Windows), or a
        #: SO_REUSEPORT group with one set per worker (Linux; see open_listener_sets).
        self._listeners = open_listener_sets(self._backend, count, host, port, backlog)
        self._local = self._listeners[1][0].getsockname()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_request = 0
        self._stopping = False
        self._forced = False
        self._fatal: str | None = None
        self._stop_requested: asyncio.Event | None = None
        self._all_stopped: asyncio.Event | None = None
        self._all_ready: asyncio.Event | None = None
        self._cache: tuple[float, list[dict[str, Any]]] | None = None
        #: Stop signals that came before the loop existed, acted on once it runs.
        self._early_stops: list[str] = []
        #: Windows: this process accepts and hands each connection to the next ready worker.
        self._hand_out: HandOut | None = None
        self._turn = 0
        self._log = LogLimiter(logger)
        self.view = WorkersView(self)

    def _close_listeners(self) -> None:
        close_listener_sets(self._listeners)

    # -- what the view reads ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._local[0])

    @property
    def port(self) -> int:
        return int(self._local[1])

    @property
    def backend_name(self) -> str:
        return self._backend.NAME

    @property
    def workers(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int | None]:
        """Each worker's pid now (None for one being restarted)."""
        return [w.pid if w.process is not None else None for w in self._workers]

    def is_serving(self) -> bool:
        return not self._stopping

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def max_connections(self) -> int | None:
        return self._max_connections

    def ready_workers(self) -> int:
        """Workers running and ready to serve now."""
        return sum(1 for w in self._workers if w.ready and w.state == "running")

    def max_connections_share(self, index: int) -> int | None:
        """Worker *index*'s part of max_connections: shared out so that the parts add up to
        the limit exactly, so the server as a whole never holds more."""
        if self._max_connections is None:
            return None
        base, extra = divmod(self._max_connections, len(self._workers))
        return base + (1 if index <= extra else 0)

    # -- running ----------------------------------------------------------------------------

    def run(
        self,
        *,
        on_ready: Callable[[WorkerPool], None] | None = None,
        admin_port: int | None = None,
        on_admin: Callable[[int], None] | None = None,
        stats_every: float | None = None,
        stuck_after: float = DEFAULT_STUCK_AFTER,
        admin_host: str = "127.0.0.1",
    ) -> None:
        """Start the workers and supervise them until Ctrl-C, SIGTERM or Ctrl-Break.

        Returns after a graceful shutdown; raises :class:`WorkersFailed` when a worker kept
        crashing and :class:`ShutdownForced` after a second stop signal.
        """
        try:
            with (
                self._stop_signals(),
                asyncio.Runner(loop_factory=self._backend.new_event_loop) as runner,
            ):
                runner.run(
                    self._supervise(
                        on_ready, admin_port, on_admin, stats_every, stuck_after, admin_host
                    )
                )
        finally:
            self._close_listeners()
        if self._fatal is not None:
            raise WorkersFailed(self._fatal)
        if self._forced:
            raise ShutdownForced("shutdown forced: worker(s) killed before they finished draining")

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Ctrl-C, SIGTERM and Ctrl-Break ask for a stop (a second one forces it).

        Installed before the loop runs, so ``asyncio.Runner`` leaves SIGINT to us; a handler
        runs in the main thread between two bytecodes, so it only schedules the stop.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.request_stop, name)
            elif loop is None:
                # Before _supervise() runs (the loop is being made): kept, not dropped.  This
                # handler and _supervise() run in the same (main) thread, so _supervise()
                # either sees this entry or has set self._loop before the handler ran.
                self._early_stops.append(name)

        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, handler)
        try:
            yield
        finally:
            for number, old in previous.items():
                signal.signal(number, old)

    async def _supervise(
        self,
        on_ready: Callable[[WorkerPool], None] | None,
        admin_port: int | None,
        on_admin: Callable[[int], None] | None,
        stats_every: float | None,
        stuck_after: float,
        admin_host: str = "127.0.0.1",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._all_stopped = asyncio.Event()
        self._all_ready = asyncio.Event()
        for reason in self._early_stops:
            self.request_stop(reason)
        if HANDS_OUT and not self._stopping:
            self._hand_out = HandOut(self._backend, self._log, self._give)
        for worker in self._workers:
            self._start_worker(worker)
        if self._hand_out is not None and not self._stopping:
            self._hand_out.start(self._listeners[1])
        helpers: list[asyncio.Task[None]] = []
        admin = None
        try:
            ready = asyncio.ensure_future(self._all_ready.wait())
            stop = asyncio.ensure_future(self._stop_requested.wait())
            await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stop.cancel()
            if not self._stopping:
                if on_ready is not None:
                    on_ready(self)
                if admin_port is not None:
                    # admin.py types its argument as EchoServer; the view has every attribute
                    # it reads (host, port, backend_name, is_serving, stats, pending_operations).
                    admin = await start_admin(
                        cast(EchoServer, self.view), admin_port, host=admin_host
                    )
                    if on_admin is not None:
                        on_admin(admin.port)
                if stats_every is not None:
                    helpers.append(asyncio.create_task(self._report(stats_every, stuck_after)))
            await self._stop_requested.wait()
            try:
                await asyncio.wait_for(
                    self._all_stopped.wait(), self._shutdown_timeout + STOP_GRACE
                )
            except TimeoutError:
                logger.warning(
                    "worker(s) still running %.1f s after the stop: killing them",
                    self._shutdown_timeout + STOP_GRACE,
                )
                self._kill_all()
                await self._all_stopped.wait()
        finally:
            if self._drain_handle is not None:
                self._drain_handle.cancel()
                self._drain_handle = None
            for task in helpers:
                task.cancel()
            if self._hand_out is not None:
                self._hand_out.stop()
                await self._hand_out.wait_stopped()
            if admin is not None:
                admin.close()
                await admin.wait_closed()
            if not self._all_stopped.is_set():  # cancelled: never leave a worker behind
                self._stopping = True
                self._kill_all()
                for worker in self._workers:
                    if worker.process is not None:
                        await asyncio.to_thread(worker.process.wait)

    # -- Windows: handing each connection accepted here to a worker in turn ----------------

    def _give(self, conn: socket.socket, address: Any) -> None:
        """Send *conn* to the next ready worker (round-robin); close it if none can take it."""
        try:
            ready = [w for w in self._workers if w.ready and w.state == "running" and w.process]
            for _ in ready:
                worker = ready[self._turn % len(ready)]
                self._turn += 1
                process = worker.process
                assert process is not None
                try:
                    shared = share(conn, process.pid)
                except OSError as exc:  # it has just exited: try the next one
                    logger.debug("cannot share a connection with worker %d: %s", worker.index, exc)
                    continue
                message = HandedConnection(op="connection", share=shared, peer=address)
                if worker.send(message):
                    return
            self._log.log(
                "connection dropped",
                logging.WARNING,
                "closing the connection from %s: no worker could take it",
                format_address(address),
                error_class="no worker",
            )
        finally:
            conn.close()  # a worker has its own handle now, or nobody serves it

    async def _report(self, every: float, stuck_after: float) -> None:
        while True:
            await asyncio.sleep(every)
            log_stats(cast(EchoServer, self.view), stuck_after)

    def request_stop(self, reason: str = "stop") -> None:
        """Stop every worker gracefully; asked a second time, kill them.

        With *drain_seconds*, the first request only makes the pool not ready (``/readyz``
        answers 503) while the workers keep serving and accepting; the stop proper follows
        that many seconds later, or at once when asked again meanwhile.
        """
        assert self._stop_requested is not None and self._all_stopped is not None
        if self._drain_handle is not None:  # asked again while draining: stop now
            self._drain_handle.cancel()
            self._drain_handle = None
        elif self._drain_seconds > 0 and not self._draining and not self._stopping:
            assert self._loop is not None
            self._draining = True
            logger.info(
                "%s: draining for %g s (not ready; still serving), then stopping",
                reason,
                self._drain_seconds,
            )
            self._drain_handle = self._loop.call_later(
                self._drain_seconds, self._drain_over, reason
            )
            return
        if self._stopping:
            if not self._forced and self._fatal is None and not self._all_stopped.is_set():
                self._forced = True
                logger.warning("%s again: killing the workers without waiting", reason)
                self._kill_all()
            return
        self._stopping = True
        if self._hand_out is not None:
            self._hand_out.stop()
        logger.info("%s: stopping %d worker(s) gracefully", reason, len(self._workers))
        for worker in self._workers:
            if worker.restart_handle is not None:
                worker.restart_handle.cancel()
                worker.restart_handle = None
            if worker.process is not None:
                worker.state = "stopping"
                worker.send(Stop(op="stop"))
            else:
                worker.state = "stopped"
        self._check_all_stopped()
        self._stop_requested.set()

    def _drain_over(self, reason: str) -> None:
        self._drain_handle = None
        self.request_stop(reason)

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(OSError):
                    worker.process.kill()

    def _check_all_stopped(self) -> None:
        assert self._all_stopped is not None
        if self._stopping and all(w.process is None for w in self._workers):
            self._all_stopped.set()

    # -- one worker -------------------------------------------------------------------------

    def _start_worker(self, worker: _Worker) -> None:
        worker.restart_handle = None
        if self._stopping:
            return
        worker.state = "starting"
        worker.ready = False
        posix = sys.platform != "win32"
        listeners = worker_listeners(self._listeners, worker.index)
        try:
            process = subprocess.Popen(
                worker_command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=inherited_fds(listeners),
                # POSIX: out of the terminal's process group, so a Ctrl-C reaches the parent
                # only, which then stops the workers in order.
                start_new_session=posix,
            )
        except OSError as exc:
            self._worker_exited(worker, None, f"could not be started: {exc}")
            return
        worker.process = process
        worker.pid = process.pid
        options = dict(self._options)
        # For the worker as a whole: it runs one server for all its listeners (see
        # _workers_child.py), which holds this limit over every one of them.
        options["max_connections"] = self.max_connections_share(worker.index)
        worker.send(
            Configuration(
                worker=worker.index,
                options=options,
                listeners=listener_specs(listeners, process.pid),
                log_level=logging.getLogger("iocp_echo").getEffectiveLevel(),
            )
        )
        threading.Thread(
            target=self._read_worker, args=(worker, process), daemon=True, name="worker reader"
        ).start()
        threading.Thread(target=_relay_stderr, args=(process.stderr,), daemon=True).start()

    def _read_worker(self, worker: _Worker, process: subprocess.Popen[bytes]) -> None:
        """A thread per worker process: its messages, then its exit."""
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            message = decode(line)
            if message is None:
                continue
            if "id" in message:
                with worker.answered:
                    worker.replies[int(message["id"])] = message
                    worker.answered.notify_all()
            elif message.get("event") == "ready":
                self._call_soon(self._worker_ready, worker, process, message)
        process.stdout.close()
        status = process.wait()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        self._call_soon(self._worker_exited, worker, process, describe_exit(status))

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                loop.call_soon_threadsafe(callback, *args)

    def _worker_ready(
        self, worker: _Worker, process: subprocess.Popen[bytes], message: dict[str, Any]
    ) -> None:
        if worker.process is not process:
            return
        worker.ready = True
        if worker.state == "starting":
            worker.state = "running"
        if worker.restarts:
            logger.info("worker %d is back (pid %d)", worker.index, process.pid)
        if not self._stopping and self._hand_out is not None:
            self._hand_out.resume()
        if all(w.ready for w in self._workers):
            assert self._all_ready is not None
            self._all_ready.set()

    def _worker_exited(
        self, worker: _Worker, process: subprocess.Popen[bytes] | None, how: str
    ) -> None:
        if process is not None and worker.process is not process:
            return
        worker.process = None
        worker.ready = False
        if self._hand_out is not None and not any(w.ready for w in self._workers):
            self._hand_out.pause()
        pid = "-" if process is None else str(process.pid)
        if self._stopping:
            worker.state = "stopped"
            if self._forced or how != "status 0":
                logger.warning("worker %d (pid %s) stopped with %s", worker.index, pid, how)
            self._check_all_stopped()
            return
        now = time.monotonic()
        worker.crashes.append(now)
        while worker.crashes and worker.crashes[0] < now - CRASH_WINDOW:
            worker.crashes.popleft()
        if len(worker.crashes) >= CRASH_LIMIT:
            worker.state = "stopped"
            self._fatal = (
                f"worker {worker.index} died {len(worker.crashes)} times within "
                f"{CRASH_WINDOW:g} s (last: pid {pid}, exit {how}); stopping the server"
            )
            logger.error("%s", self._fatal)
            self.request_stop("crash loop")
            return
        delay = restart_delay(len(worker.crashes))
        logger.warning(
            "worker %d (pid %s) exited unexpectedly with %s; restarting it in %.1f s",
            worker.index,
            pid,
            how,
            delay,
        )
        worker.state = "restarting"
        worker.restarts += 1
        assert self._loop is not None
        worker.restart_handle = self._loop.call_later(delay, self._start_worker, worker)

    # -- asking the workers -----------------------------------------------------------------

    def collect(self, max_age: float = 0.0) -> list[dict[str, Any]]:
        """Every worker's snapshot now (or the last one, if younger than *max_age* seconds).

        Blocks the calling loop for at most :data:`STATS_TIMEOUT` seconds: the parent's loop
        serves no connections, only this and the admin endpoint.
        """
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < max_age:
            return self._cache[1]
        asked: list[tuple[_Worker, int | None]] = []
        for worker in self._workers:
            self._next_request += 1
            number = self._next_request
            sent = worker.ready and worker.send(
                SnapshotRequest(op="snapshot", id=number, limit=MAX_OPERATIONS_LIMIT)
            )
            asked.append((worker, number if sent else None))
        deadline = time.monotonic() + STATS_TIMEOUT
        result = []
        for worker, request_id in asked:
            entry: dict[str, Any] = {
                "worker": worker.index,
                "pid": worker.pid if worker.process is not None else None,
                "state": worker.state,
                "restarts": worker.restarts,
                "stats": None,
                "error": None,
            }
            if request_id is None:
                entry["error"] = f"worker is {worker.state}"
            else:
                with worker.answered:
                    while request_id not in worker.replies:
                        left = deadline - time.monotonic()
                        if left <= 0 or worker.process is None:
                            break
                        worker.answered.wait(left)
                    reply = worker.replies.pop(request_id, None)
                    worker.replies.clear()  # late answers to earlier requests
                if reply is None:
                    entry["error"] = f"no answer within {STATS_TIMEOUT:g} s"
                else:
                    snapshot = reply["snapshot"]
                    entry["stats"] = snapshot["stats"]
                    entry["snapshot"] = snapshot
            result.append(entry)
        self._cache = (time.monotonic(), result)
        return result


def run_workers(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    workers: int,
    **serve_echo_options: Any,
) -> None:
    """Serve the echo on *host*:*port* from *workers* processes (0: one per CPU); block until
    Ctrl-C, SIGTERM or Ctrl-Break, then stop them all gracefully and return.

    *serve_echo_options* are :func:`~iocp_echo.serve_echo`'s keyword arguments (``max_read``,
    ``max_connections``, ``idle_timeout``, ``backlog``, ``write_high_water``,
    ``shutdown_timeout``; not ``ssl`` or ``sock``).  ``max_connections`` is for the whole
    server: each worker refuses past its even share.  The listener is opened here, first, so
    :class:`InvalidPortError` and :class:`AddressInUseError` are raised before any worker
    starts; :class:`WorkersFailed` is raised when a worker keeps crashing.  Call it from the
    main thread (elsewhere stop signals are not handled); it runs its own event loop.
    """
    unknown = set(serve_echo_options) - set(_SERVE_OPTIONS)
    if unknown:
        raise TypeError(f"run_workers() got unsupported option(s): {', '.join(sorted(unknown))}")
    WorkerPool(host, port, workers=workers, **serve_echo_options).run()
