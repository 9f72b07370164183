"""The client-side benchmark: ``asyncio.open_connection`` ping-pong clients on one loop
against a fixed echo server (the harness starts Go's native echo), as a user's own client
code would be written: ``writer.write``, ``await writer.drain()``,
``await reader.readexactly``.

The loop is the thing measured, so this program holds no harness logic beyond timing.  It
first runs the same throwaway session every program of the benchmark gets (20 connections
echoing 1 KiB for ``--throwaway`` seconds, then closed), then for each ``--point SIZE CONNS
REQUESTS``: opens CONNS connections (each echoed once), warms up with a fifth of the
requests, prints ``MEASURING`` on stderr, and has every connection make REQUESTS / CONNS
round trips of SIZE bytes, one in flight per connection.  It prints one JSON line per point
on stdout, shaped as the Go load generator's (a 10 µs latency histogram, elapsed time,
requests, failures, CPU seconds of this process in the window), then closes the point's
connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path

# The embeddable Windows CPython (under Wine) does not put the script's folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loopchoice

BUCKET_NS = 10_000  # the load generator's 10 µs buckets
Pairs = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY, as every benchmark client and server here sets it (most loops set it
    already; a loop whose socket object refuses it keeps its own setting)."""
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError, NotImplementedError):
        pass


async def connect(port: int, count: int) -> tuple[Pairs, int]:
    """*count* connections, each echoed once; and how many failed."""
    pairs, failed = [], 0
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            _nodelay(writer)
            writer.write(b"x")
            await writer.drain()
            await reader.readexactly(1)
        except (OSError, asyncio.IncompleteReadError):
            failed += 1
            continue
        pairs.append((reader, writer))
    return pairs, failed


async def ping(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    message: bytes,
    count: int,
    histogram: Counter[int] | None,
) -> int:
    """*count* round trips; returns how many failed (0 or 1: a failure ends the connection)."""
    size = len(message)
    clock = time.perf_counter_ns
    try:
        for _ in range(count):
            began = clock()
            writer.write(message)
            await writer.drain()
            await reader.readexactly(size)
            if histogram is not None:
                histogram[(clock() - began) // BUCKET_NS] += 1
    except (OSError, asyncio.IncompleteReadError):
        return 1
    return 0


async def close(pairs: Pairs) -> None:
    for _, writer in pairs:
        writer.close()
    for _, writer in pairs:
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def throwaway(port: int, seconds: float) -> None:
    pairs, _ = await connect(port, 20)
    message = b"x" * 1024
    deadline = time.monotonic() + seconds

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while time.monotonic() < deadline:
            if await ping(reader, writer, message, 10, None):
                return

    await asyncio.gather(*(loop(r, w) for r, w in pairs))
    await close(pairs)


async def point(port: int, size: int, conns: int, requests: int) -> tuple[dict[str, object], Pairs]:
    pairs, failures = await connect(port, conns)
    per = max(1, requests // conns)
    message = b"x" * size
    warm = await asyncio.gather(*(ping(r, w, message, max(1, per // 5), None) for r, w in pairs))
    failures += sum(warm)
    print("MEASURING", size, conns, file=sys.stderr, flush=True)
    histogram: Counter[int] = Counter()
    cpu, started = time.process_time(), time.perf_counter()
    lost = await asyncio.gather(*(ping(r, w, message, per, histogram) for r, w in pairs))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    result = {
        "mode": "client",
        "conns": conns,
        "size": size,
        "elapsed": elapsed,
        "requests": sum(histogram.values()),
        "failures": failures + sum(lost),
        "bucket_us": BUCKET_NS // 1000,
        "histogram": sorted(histogram.items()),
        "client_cpu_s": cpu,
        "connections": len(pairs),
        "requests_per_conn": per,
    }
    return result, pairs


async def main(options: argparse.Namespace) -> None:
    print("LOOP", loopchoice.describe(asyncio.get_running_loop()), file=sys.stderr, flush=True)
    if options.throwaway > 0:
        await throwaway(options.port, options.throwaway)
    for size, conns, requests in options.point:
        result, pairs = await asyncio.wait_for(
            point(options.port, size, conns, requests), options.timeout
        )
        print(json.dumps(result), flush=True)  # before closing: the window ends here
        await close(pairs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=loopchoice.NAMES, default="default")
    parser.add_argument("--site", help="extra folder for sys.path (winloop under Wine)")
    parser.add_argument(
        "--point",
        nargs=3,
        type=int,
        action="append",
        required=True,
        metavar=("SIZE", "CONNS", "REQUESTS"),
        help="message size, connections, round trips measured in all (repeatable)",
    )
    parser.add_argument("--throwaway", type=float, default=1.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per point")
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=loopchoice.factory(options.loop, options.site)) as runner:
        runner.run(main(options))
