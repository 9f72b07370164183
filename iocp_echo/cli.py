"""The ``iocp-echo`` command: ``python -m iocp_echo``, ``python examples/echo.py``, ``iocp-echo``.

Exit status: 0 after a graceful shutdown (Ctrl-C, or Ctrl-Break on Windows); 1 when the server
cannot start (invalid port, port in use, unsupported platform), with one line saying why; 2 for
a malformed command line, with argparse's message.  With ``--workers N`` (N > 1) this process
supervises N worker processes (``workers.py``); it also exits 1, with one line, when a worker
keeps crashing or a second Ctrl-C forced the stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import types
from collections.abc import Callable, Sequence

from . import loops, workers
from .admin import DEFAULT_STUCK_AFTER, flush_stats_log, log_stats, start_admin
from .errors import IocpEchoError
from .listeners import format_address as _format_peer
from .listeners import validate_port as _validate_port
from .proxy_protocol import DEFAULT_TRUSTED, TrustedSources
from .server import DEFAULT_HOST, DEFAULT_PORT, EchoServer, serve_echo

__all__ = ["build_parser", "main"]

PROG = "iocp-echo"


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _networks(text: str) -> TrustedSources:
    try:
        return TrustedSources(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per CPU) or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Asynchronous TCP echo server on completion-port I/O (Windows IOCP through "
            "asyncio's ProactorEventLoop). Every byte a client sends is sent back, in order. "
            "Stop it with Ctrl-C (or Ctrl-Break on Windows)."
        ),
        epilog=(
            "exit status: 0 after a graceful shutdown, 1 when the server cannot start (invalid "
            "port, port in use, unsupported platform) or, with --workers, stopped because a "
            "worker kept crashing or a second Ctrl-C forced it, 2 for a bad command line. "
            "'iocp-echo inspect HOST:PORT [--watch]' shows a running server's pending "
            "operations (see 'iocp-echo inspect --help')."
        ),
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port, 1024-65535, or 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive(int),
        metavar="N",
        help="close connections beyond N open ones at once (default: no limit); with "
        "--workers, N is for the whole server, shared out evenly among the workers",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive(float),
        metavar="SECONDS",
        help="close a connection with no traffic for SECONDS (default: never)",
    )
    parser.add_argument(
        "--stats-every",
        type=_positive(float),
        metavar="SECONDS",
        help="log a one-line summary (connections, bytes, pending operations by kind, oldest "
        "age) every SECONDS at INFO",
    )
    parser.add_argument(
        "--stuck-after",
        type=_positive(float),
        metavar="SECONDS",
        default=DEFAULT_STUCK_AFTER,
        help="with --stats-every, warn about each operation pending longer than SECONDS "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        metavar="PORT",
        help="serve a JSON snapshot (stats and pending operations) on http://127.0.0.1:PORT/ "
        "for 'iocp-echo inspect' (default: off; 0 picks a free port)",
    )
    parser.add_argument(
        "--admin-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the admin endpoint listens on (default: %(default)s); use 0.0.0.0 for "
        "probes and scrapes from other machines: /healthz, /readyz and /metrics are then "
        "answered to anyone, the snapshot (GET /) still to this machine only",
    )
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's "
        "send-proxy, nginx's proxy_protocol, Envoy and cloud load balancers send it); the "
        "client it names replaces the balancer's address in logs, stats and the admin endpoint",
    )
    parser.add_argument(
        "--proxy-from",
        type=_networks,
        default=TrustedSources(DEFAULT_TRUSTED),
        metavar="CIDR[,CIDR]",
        help="with --proxy-protocol, the networks allowed to send PROXY headers; connections "
        "from anywhere else are closed (default: loopback, 127.0.0.0/8,::1/128)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=_not_negative,
        default=0.0,
        metavar="S",
        help="on SIGTERM or Ctrl-C, first answer 503 on the admin endpoint's /readyz while "
        "still serving and accepting for S seconds (so a load balancer's health check takes "
        "this instance out), then stop accepting and drain; a second signal stops at once "
        "(default: 0, stop at once)",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="serve from N worker processes sharing one listener, supervised by this one "
        "(0: one per CPU; default: %(default)s, this process serves alone)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity; DEBUG shows every connection (default: %(default)s)",
    )
    return parser


async def _serve(options: argparse.Namespace) -> None:
    async with await serve_echo(
        options.host,
        options.port,
        max_connections=options.max_connections,
        idle_timeout=options.idle_timeout,
        proxy_protocol=options.proxy_protocol,
        proxy_from=options.proxy_from.networks,
    ) as server:
        stops = _Stops(server, options.drain_seconds)
        _stop_on_break(stops.request, drain=options.drain_seconds > 0)
        print(
            f"{PROG}: listening on {_format_peer((server.host, server.port))} "
            f"(backend: {server.backend_name})",
            flush=True,
        )
        helpers: list[asyncio.Task[None]] = []
        admin = None
        if options.admin_port is not None:
            admin = await start_admin(server, options.admin_port, host=options.admin_host)
            print(
                f"{PROG}: admin snapshot on {_admin_url(options.admin_host, admin.port)}",
                flush=True,
            )
        if options.stats_every is not None:
            helpers.append(asyncio.create_task(_report(server, options)))
        try:
            await server.serve_forever()
        finally:
            for task in helpers:
                task.cancel()
            if helpers:
                flush_stats_log(server)  # summarise stuck warnings held back this minute
            if admin is not None:
                admin.close()
                await admin.wait_closed()


async def _report(server: EchoServer, options: argparse.Namespace) -> None:
    while True:
        await asyncio.sleep(options.stats_every)
        log_stats(server, options.stuck_after)


def _admin_url(host: str, port: int) -> str:
    """Where to reach the admin endpoint from this machine."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{_format_peer((host, port))}/"


class _Stops:
    """What the stop signals do: the first drains (with *drain_seconds*) or closes, the second
    closes at once, the third (Ctrl-C only) interrupts."""

    def __init__(self, server: EchoServer, drain_seconds: float) -> None:
        self._server = server
        self._drain_seconds = drain_seconds
        self._count = 0
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._count += 1
        if self._count == 1 and self._drain_seconds > 0:
            print(
                f"{PROG}: draining for {self._drain_seconds:g} s (/readyz answers 503), "
                "then stopping; signal again to stop now",
                file=sys.stderr,
                flush=True,
            )
            self._task = asyncio.get_running_loop().create_task(
                self._server.shutdown(self._drain_seconds)
            )
        else:
            self._server.close()


def _stop_on_break(stop: Callable[[], None], *, drain: bool = False) -> None:
    """Ctrl-Break on Windows (SIGBREAK) and SIGTERM elsewhere stop the server gracefully.

    Without *drain*, Ctrl-C needs nothing here: ``asyncio.Runner`` turns SIGINT into
    cancelling the main task, and ``serve_forever()`` closes the server when cancelled.  With
    *drain*, Ctrl-C drains first like the others; a third Ctrl-C interrupts outright.
    """
    loop = asyncio.get_running_loop()
    names = ["SIGBREAK", "SIGTERM"]
    if drain:
        names.append("SIGINT")
    interrupts = 0

    def handler(signum: int, frame: types.FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 2:
                signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
        loop.call_soon_threadsafe(stop)

    for name in names:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, handler)


def _serve_workers(options: argparse.Namespace, count: int) -> None:
    """``--workers N`` (N > 1): this process supervises N workers (see ``workers.py``)."""
    pool = workers.WorkerPool(
        options.host,
        options.port,
        workers=count,
        max_connections=options.max_connections,
        idle_timeout=options.idle_timeout,
        proxy_protocol=options.proxy_protocol,
        proxy_from=[str(network) for network in options.proxy_from.networks],
        drain_seconds=options.drain_seconds,
    )

    def ready(pool: workers.WorkerPool) -> None:
        print(
            f"{PROG}: listening on {_format_peer((pool.host, pool.port))} "
            f"(backend: {pool.backend_name})",
            flush=True,
        )
        pids = ", ".join(f"worker {i} pid {pid}" for i, pid in enumerate(pool.pids(), 1))
        print(f"{PROG}: {pool.workers} worker processes: {pids}", flush=True)

    def admin_ready(port: int) -> None:
        print(f"{PROG}: admin snapshot on {_admin_url(options.admin_host, port)}", flush=True)

    pool.run(
        on_ready=ready,
        admin_port=options.admin_port,
        admin_host=options.admin_host,
        on_admin=admin_ready,
        stats_every=options.stats_every,
        stuck_after=options.stuck_after,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["inspect"]:
        from . import inspector  # a client: no event loop, no backend needed

        return inspector.main(arguments[1:])
    parser = build_parser()
    options = parser.parse_args(arguments)
    count = workers.resolve_workers(options.workers)
    if options.max_connections is not None and count > 1 and options.max_connections < count:
        parser.error(
            f"--max-connections {options.max_connections} is shared out among {count} "
            "workers: it must be at least the number of workers"
        )
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _validate_port(options.port)
        if options.admin_port is not None and options.admin_port != 0:
            _validate_port(options.admin_port)
        loops.backend_name()  # refuse an unsupported platform before anything starts
        if count > 1:
            _serve_workers(options, count)
        else:
            loops.run(_serve(options))
    except IocpEchoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # e.g. an address that does not exist on this machine
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0
