"""``python -m iocp_echo inspect HOST:PORT [--watch]``: a server's pending operations, as a
table, read from its admin endpoint (``--admin-port``).  Standard library only, and plain
text, so it works in any terminal, a Windows console included.

The endpoint is trusted for nothing.  Whatever answers on HOST:PORT (a broken server,
another program that took the port) gets one total deadline and a size limit, its JSON is
checked field by field before anything is printed, and every string it supplies is printed
with control characters escaped, so that it cannot move the cursor or retitle the terminal.
Anything wrong ends in one line on stderr and exit status 1.  The request goes straight to
HOST:PORT over a socket: a proxy configured for the user's web traffic (``http_proxy``) is no
way to reach a loopback endpoint, and would see the server's peer addresses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["InspectError", "fetch", "format_snapshot", "main"]

_COLUMNS = ("KIND", "STATE", "FD", "LOCAL", "PEER", "BYTES", "AGE")
DEFAULT_TIMEOUT = 10.0
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # the endpoint's admin.MAX_OPERATIONS_LIMIT; this module imports nothing
#: Bytes accepted from the endpoint: MAX_LIMIT operations are about 200 KB.
MAX_RESPONSE = 4 * 1024 * 1024
_MAX_CELL = 60


class InspectError(Exception):
    """What went wrong reading or understanding the endpoint, in one line."""


def _clean(text: str, limit: int = _MAX_CELL) -> str:
    """*text* with anything but printable ASCII escaped, cut to about *limit* characters."""
    out = []
    for char in text:
        if " " <= char <= "~":
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    cleaned = "".join(out)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# Typed access to the endpoint's JSON: each raises InspectError naming the field.


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise InspectError(f"{where}.{key} is missing")
    return obj[key]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InspectError(f"{where} is not a JSON object")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise InspectError(f"{where} is not a whole number from 0 to 2**64")
    return value


def _optional_count(value: Any, where: str) -> int | None:
    return None if value is None else _count(value, where)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InspectError(f"{where} is not a string")
    return _clean(value)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InspectError(f"{where} is not a number")
    # Compared before float(), which a huge int would overflow; NaN compares false.
    if not 0 <= value < 1e9:
        raise InspectError(f"{where} is out of range")
    return float(value)


def _address(value: Any, where: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list) and len(value) >= 2 and isinstance(value[0], str):
        host, port = _clean(value[0]), _count(value[1], where + "[1]")
        return _clean(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    raise InspectError(f"{where} is not an address")


def format_snapshot(snapshot: Any) -> str:
    """The endpoint's answer as a table; :class:`InspectError` if it is not one."""
    snapshot = _object(snapshot, "the answer")
    server = _object(_field(snapshot, "server", "answer"), "server")
    stats = _object(_field(snapshot, "stats", "answer"), "stats")
    lines = [
        f"{_text(_field(server, 'backend', 'server'), 'server.backend')} on "
        f"{_text(_field(server, 'host', 'server'), 'server.host')}:"
        f"{_count(_field(server, 'port', 'server'), 'server.port')} "
        f"(Python {_text(_field(server, 'python', 'server'), 'server.python')})"
        + "".join(
            f"  {label}={_count(_field(stats, key, 'stats'), 'stats.' + key)}"
            for label, key in (
                ("connections open", "open_connections"),
                ("total", "total_connections"),
                ("bytes in", "bytes_received"),
                ("out", "bytes_sent"),
            )
        )
    ]
    readiness = server.get("readiness")
    if readiness is not None and readiness != "ready":
        lines[0] += f"  NOT READY: {_text(readiness, 'server.readiness')}"
    proxy = stats.get("proxy_headers")
    if proxy:
        counts = _object(proxy, "stats.proxy_headers")
        lines.append(
            "PROXY headers: "
            + " ".join(
                f"{_clean(str(outcome))}={_count(count, 'stats.proxy_headers')}"
                for outcome, count in counts.items()
            )
        )
    lines += _worker_lines(stats)
    unavailable = snapshot.get("operations_unavailable")
    if unavailable is not None:
        reason = _text(unavailable, "operations_unavailable")
        lines.append(f"pending operations unavailable: {reason}")
        return "\n".join(lines)
    operations = _field(snapshot, "operations", "answer")
    if not isinstance(operations, list):
        raise InspectError("operations is not a JSON array")
    # A server with worker processes labels each operation with its worker and pid.
    labelled = any(isinstance(op, dict) and "worker" in op for op in operations)
    columns = ("WORKER", *_COLUMNS) if labelled else _COLUMNS
    rows: list[tuple[str, ...]] = []
    for i, op in enumerate(operations):
        where = f"operations[{i}]"
        op = _object(op, where)
        fileno = _optional_count(_field(op, "fileno", where), where + ".fileno")
        nbytes = _optional_count(_field(op, "nbytes", where), where + ".nbytes")
        label: tuple[str, ...] = ()
        if labelled:
            worker = _count(_field(op, "worker", where), where + ".worker")
            pid = _optional_count(op.get("pid"), where + ".pid")
            label = (f"{worker}/{'-' if pid is None else pid}",)
        rows.append(
            (
                *label,
                _text(_field(op, "kind", where), where + ".kind"),
                _text(_field(op, "state", where), where + ".state"),
                "-" if fileno is None else str(fileno),
                _address(_field(op, "local", where), where + ".local"),
                _address(_field(op, "peer", where), where + ".peer"),
                "-" if nbytes is None else str(nbytes),
                f"{_seconds(_field(op, 'age', where), where + '.age'):.3f}s",
            )
        )
    total = snapshot.get("operations_total", len(rows))
    total = _count(total, "operations_total")
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    for row in [columns, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if total > len(rows):
        lines.append(f"{len(rows)} of {total} pending operation(s), oldest first")
    else:
        lines.append(f"{len(rows)} pending operation(s)")
    return "\n".join(lines)


def _worker_lines(stats: dict[str, Any]) -> list[str]:
    """One line per worker process, when the server has them (``stats.workers``)."""
    entries = stats.get("workers")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InspectError("stats.workers is not a JSON array")
    lines = []
    for i, entry in enumerate(entries):
        where = f"stats.workers[{i}]"
        entry = _object(entry, where)
        worker = _count(_field(entry, "worker", where), where + ".worker")
        pid = _optional_count(_field(entry, "pid", where), where + ".pid")
        state = _text(_field(entry, "state", where), where + ".state")
        restarts = _count(_field(entry, "restarts", where), where + ".restarts")
        own = entry.get("stats")
        if own is None:
            error = entry.get("error")
            detail = _text(error, where + ".error") if error is not None else "no stats"
        else:
            own = _object(own, where + ".stats")
            detail = "".join(
                f"{label}={_count(_field(own, key, where + '.stats'), where + '.stats.' + key)}  "
                for label, key in (
                    ("connections open", "open_connections"),
                    ("total", "total_connections"),
                    ("bytes in", "bytes_received"),
                    ("out", "bytes_sent"),
                )
            ).rstrip()
        lines.append(
            f"  worker {worker} pid {'-' if pid is None else pid} {state} "
            f"(restarts {restarts}): {detail}"
        )
    return lines


def _split_target(target: str) -> tuple[str, int]:
    host, colon, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InspectError("expected HOST:PORT, e.g. 127.0.0.1:9001")
    return host, int(port)


def fetch(
    target: str, timeout: float = DEFAULT_TIMEOUT, limit: int = DEFAULT_LIMIT
) -> dict[str, Any]:
    """``GET /?limit=LIMIT`` from the endpoint at *target*, all of it within *timeout* s.

    Raises :class:`InspectError` for an answer that is not the endpoint's, and ``OSError``
    (``TimeoutError`` included) when the connection fails.
    """
    host, port = _split_target(target)
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {timeout:g} s")
        return left

    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (
        f"GET /?limit={limit} HTTP/1.0\r\nHost: {host_header}\r\n"
        "Accept: application/json\r\nConnection: close\r\n\r\n"
    ).encode("ascii", "replace")
    received = bytearray()
    try:
        with socket.create_connection((host, port), timeout=remaining()) as sock:
            sock.settimeout(remaining())
            sock.sendall(request)
            while True:
                sock.settimeout(remaining())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if len(received) > MAX_RESPONSE:
                    raise InspectError(f"the answer is larger than {MAX_RESPONSE} bytes")
    except TimeoutError:
        remaining()  # the total deadline passed: say so
        raise
    return _parse_response(bytes(received))


def _parse_response(data: bytes) -> dict[str, Any]:
    head, separator, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if not separator or len(status) < 2 or not status[0].startswith("HTTP/"):
        raise InspectError("the answer is not HTTP")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise InspectError("the answer has a malformed Content-Length")
            length = int(value)
    if length is not None and length != len(body):
        raise InspectError(f"the answer was cut short ({len(body)} of {length} bytes)")
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if status[1] != "200":
            raise InspectError(f"HTTP {_clean(' '.join(status[1:]))}") from None
        raise InspectError(f"the answer is not JSON ({_clean(str(exc), 80)})") from None
    if status[1] != "200":
        message = document.get("error") if isinstance(document, dict) else None
        detail = f": {_clean(message, 120)}" if isinstance(message, str) else ""
        raise InspectError(f"HTTP {_clean(' '.join(status[1:]))}{detail}")
    if not isinstance(document, dict):
        raise InspectError("the answer is not a JSON object")
    return document


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _limit(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_LIMIT}, got {text}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iocp-echo inspect",
        description="Show a running server's pending overlapped operations, read from its "
        "admin endpoint (start the server with --admin-port PORT).",
    )
    parser.add_argument(
        "target", metavar="HOST:PORT", help="the admin endpoint, e.g. 127.0.0.1:9001"
    )
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="refresh period with --watch (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show the N oldest operations, 0 to {MAX_LIMIT} (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up on an endpoint that has not answered completely within SECONDS "
        "(default: %(default)s)",
    )
    options = parser.parse_args(argv)
    try:
        while True:
            try:
                text = format_snapshot(fetch(options.target, options.timeout, options.limit))
            except (OSError, InspectError, ValueError) as exc:  # ValueError: a host name
                print(
                    f"iocp-echo inspect: cannot read {_clean(options.target)}: "
                    f"{_clean(str(exc) or type(exc).__name__, 200)}",
                    file=sys.stderr,
                )
                return 1
            if options.watch:
                if os.name == "nt":
                    os.system("cls")  # the Windows console's own clear
                else:
                    print("\x1b[2J\x1b[H", end="")
            print(text, flush=True)
            if not options.watch:
                return 0
            time.sleep(options.interval)
    except KeyboardInterrupt:
        return 0
