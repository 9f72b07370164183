"""Client-side helpers for the tests: real sockets, bounded waits, no sleeps."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait, yielding to the loop, until *predicate* holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *predicate* from a plain thread (no loop to yield to) until it holds; fail naming
    *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def connect(
    port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None
) -> socket.socket:
    """A raw non-blocking client socket, connected through the loop (ConnectEx on Windows).

    *rcvbuf* sets a small receive buffer before connecting (so the window stays small): the
    way to make a server's echoes back up without relying on how much a kernel buffers."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
    return sock


async def recv_exactly(sock: socket.socket, size: int, timeout: float = 30.0) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = bytearray()
    async with asyncio.timeout(timeout):
        while len(chunks) < size:
            chunk = await loop.sock_recv(sock, min(size - len(chunks), 1 << 20))
            if not chunk:
                raise AssertionError(f"EOF after {len(chunks)} of {size} bytes")
            chunks += chunk
    return bytes(chunks)


async def recv_until_eof(sock: socket.socket, timeout: float = 30.0) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 1 << 16):
            chunks += chunk
    return bytes(chunks)


async def connect_not_to_itself(port: int) -> socket.socket:
    """A connection to *port*, or ConnectionRefusedError.

    The port was the kernel's to give (bind to port 0), and once free it may be given again as
    a client's own port: a client connecting from the very port it connects to is connected to
    itself (TCP simultaneous open) and hears its own bytes, which looks like an echo server.
    Such a connection is no server's: it is dropped and the connect tried again.  (Seen
    under Wine 3.13 only, twice in full runs: in test_shutdown and test_resets.)
    """
    for _ in range(3):
        sock = await connect(port)
        if sock.getsockname() != sock.getpeername():
            return sock  # someone accepted it: the caller's pytest.raises says so
        sock.close()
    raise AssertionError(f"connected to itself three times in a row on port {port}")


async def echo(port: int, payload: bytes) -> bytes:
    """Send *payload* on a new connection and return what comes back.

    Sending and receiving run together: an echo client that sends everything before reading
    deadlocks against any flow-controlled server once the payload exceeds the socket buffers.
    """
    sock = await connect(port)
    try:
        sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(sock, payload))
        try:
            received = await recv_exactly(sock, len(payload))
        except BaseException:
            sending.cancel()
            raise
        await sending  # done: every byte it sent has come back
        return received
    finally:
        sock.close()


def reset(sock: socket.socket) -> None:
    """Close abortively: SO_LINGER with a zero timeout makes the close send RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
