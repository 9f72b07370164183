"""``python -m iocp_echo inspect HOST:PORT [--watch]``: a server's pending operations, as a
table, read from its admin endpoint (``--admin-port``).  Standard library only, and plain
text, so it works in any terminal, a Windows console included."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["format_snapshot", "main"]

_COLUMNS = ("KIND", "STATE", "FD", "LOCAL", "PEER", "BYTES", "AGE")


def _address(value: Any) -> str:
    if isinstance(value, list) and len(value) >= 2:
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return "-" if value is None else str(value)


def format_snapshot(snapshot: dict[str, Any]) -> str:
    server, stats = snapshot["server"], snapshot["stats"]
    lines = [
        f"{server['backend']} on {server['host']}:{server['port']} (Python {server['python']})"
        f"  connections open={stats['open_connections']} total={stats['total_connections']}"
        f"  bytes in={stats['bytes_received']} out={stats['bytes_sent']}",
    ]
    if snapshot.get("operations_unavailable"):
        lines.append(f"pending operations unavailable: {snapshot['operations_unavailable']}")
        return "\n".join(lines)
    rows = [
        (
            op["kind"],
            op["state"],
            str(op["fileno"] if op["fileno"] is not None else "-"),
            _address(op["local"]),
            _address(op["peer"]),
            "-" if op["nbytes"] is None else str(op["nbytes"]),
            f"{op['age']:.3f}s",
        )
        for op in snapshot["operations"]
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    lines.append(f"{len(rows)} pending operation(s)")
    return "\n".join(lines)


def fetch(target: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{target}/", timeout=timeout) as response:
        result: dict[str, Any] = json.load(response)
        return result


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
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="refresh period with --watch (default: %(default)s)",
    )
    options = parser.parse_args(argv)
    try:
        while True:
            try:
                text = format_snapshot(fetch(options.target))
            except (OSError, ValueError, KeyError) as exc:
                print(f"iocp-echo inspect: cannot read {options.target}: {exc}", file=sys.stderr)
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
