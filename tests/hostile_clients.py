"""Hostile and greedy clients for the tests, run as a separate process so that they compete with
the server for the machine, not for its interpreter's lock.

``python tests/hostile_clients.py PORT --flooders N --slow-readers M --pumps K``

* a *flooder* sends as fast as the server takes and never reads;
* a *slow reader* sends 256 KiB once, then reads one byte a second;
* a *pump* streams 64 KiB messages flat out and reads the echoes as they come.

It prints ``ready`` once every connection is open (and every pump has had one echo), then
runs until its standard input closes, and exits.  No ``select()``: Windows' is limited to 512
sockets, so the loop just tries every socket, non-blocking, each round.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

PUMP_MESSAGE = 64 * 1024
SLOW_READER_SENDS = 256 * 1024


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def _pump(port: int, stop: threading.Event, ready: threading.Semaphore) -> None:
    """Stream 64 KiB messages flat out, one thread sending and one reading, so the server
    always has bytes waiting on this connection."""
    message = bytes(range(256)) * (PUMP_MESSAGE // 256)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            try:
                while not stop.is_set():
                    sock.sendall(message)
            except OSError:
                pass

        threading.Thread(target=send, daemon=True).start()
        received = 0
        announced = False
        while not stop.is_set():
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            received += len(chunk)
            if not announced and received >= PUMP_MESSAGE:
                announced = True
                ready.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--flooders", type=int, default=0)
    parser.add_argument("--slow-readers", type=int, default=0)
    parser.add_argument("--pumps", type=int, default=0)
    options = parser.parse_args()
    stop = threading.Event()

    def wait_for_stdin_to_close() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_to_close, daemon=True).start()
    flooders = [_connect(options.port, rcvbuf=4096) for _ in range(options.flooders)]
    slow = [_connect(options.port, rcvbuf=4096) for _ in range(options.slow_readers)]
    ready = threading.Semaphore(0)
    pumps = [
        threading.Thread(target=_pump, args=(options.port, stop, ready), daemon=True)
        for _ in range(options.pumps)
    ]
    for pump in pumps:
        pump.start()
    for _ in pumps:
        ready.acquire(timeout=60)
    unsent = {sock: SLOW_READER_SENDS for sock in slow}
    print("ready", flush=True)
    chunk = b"f" * 65536
    next_read = time.monotonic() + 1
    # A flooder whose send would block tries again a little later: enough to keep the
    # server's side full, without a storm of failing calls (each one costs the wineserver).
    retry_at = {sock: 0.0 for sock in flooders}
    while not stop.is_set():
        now = time.monotonic()
        for sock in flooders:
            if retry_at[sock] > now:
                continue
            try:
                sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                retry_at[sock] = now + 0.25
            except OSError:
                retry_at[sock] = float("inf")  # reset by the server: nothing more to do
        for sock, left in list(unsent.items()):
            if left:
                try:
                    unsent[sock] = left - sock.send(chunk[:left])
                except (BlockingIOError, InterruptedError, OSError):
                    pass
        if time.monotonic() >= next_read:
            next_read += 1
            for sock in slow:
                try:
                    sock.recv(1)
                except (BlockingIOError, InterruptedError, OSError):
                    pass
        stop.wait(0.01)
    for sock in flooders + slow:
        sock.close()


if __name__ == "__main__":
    main()
