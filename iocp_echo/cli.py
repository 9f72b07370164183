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
from collections.abc import Callable, Sequence

from . import loops, workers
from .admin import DEFAULT_STUCK_AFTER, flush_stats_log, log_stats, start_admin
from .errors import IocpEchoError
from .listeners import format_address as _format_peer
from .listeners import validate_port as _validate_port
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
    ) as server:
        _stop_on_break(server.close)
        print(
            f"{PROG}: listening on {_format_peer((server.host, server.port))} "
            f"(backend: {server.backend_name})",
            flush=True,
        )
        helpers: list[asyncio.Task[None]] = []
        admin = None
        if options.admin_port is not None:
            admin = await start_admin(server, options.admin_port)
            admin_port = admin.sockets[0].getsockname()[1]
            print(f"{PROG}: admin snapshot on http://127.0.0.1:{admin_port}/", flush=True)
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


def _stop_on_break(stop: Callable[[], None]) -> None:
    """Ctrl-Break on Windows (SIGBREAK) and SIGTERM elsewhere stop the server gracefully.

    Ctrl-C needs nothing here: ``asyncio.Runner`` turns SIGINT into cancelling the main task,
    and ``serve_forever()`` closes the server when cancelled.
    """
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(stop)

    for name in ("SIGBREAK", "SIGTERM"):
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
        print(f"{PROG}: admin snapshot on http://127.0.0.1:{port}/", flush=True)

    pool.run(
        on_ready=ready,
        admin_port=options.admin_port,
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
