"""PROXY protocol, readiness and drain under ``--workers``: the supervisor answers for all.

The pool runs in this process (its signal handlers need the main thread) with the client in a
thread, as in ``test_workers.py``: natively each worker accepts on its own ``SO_REUSEPORT``
listener and reads the header itself; on Windows (under Wine) the supervisor accepts and hands
each connection over with its address, and the worker checks that address against
``proxy_from`` and reads the header.
"""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from iocp_echo import workers
from iocp_echo.proxy_protocol import encode_v1, encode_v2

from .helpers import wait_for
from .test_workers import recv_exactly, run_pool, snapshot

pytestmark = pytest.mark.backend


def readyz(admin_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def closed_unechoed(sock: socket.socket) -> bool:
    """The server closed *sock* without sending a byte (a close with the client's bytes
    unread reaches the client as a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_client_named_by_the_header_is_the_peer_in_every_worker() -> None:
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        clients = []
        try:
            for i in range(40):
                sock = socket.create_connection(("127.0.0.1", pool.port), timeout=30)
                clients.append(sock)
                source = (f"203.0.113.{i + 1}", 40000 + i)
                header = (encode_v2 if i % 2 else encode_v1)(source, ("192.0.2.1", 8080))
                payload = f"client {i}".encode()
                sock.sendall(header + payload)
                assert recv_exactly(sock, len(payload)) == payload
            seen["document"] = snapshot(admin_port)
            seen["ready"] = readyz(admin_port)
        finally:
            for sock in clients:
                sock.close()

    run_pool(client, proxy_protocol=True)
    document = seen["document"]
    assert seen["ready"] == (200, "ready\n")
    assert document["stats"]["proxy_headers"]["v1"] == 20
    assert document["stats"]["proxy_headers"]["v2"] == 20
    peers = {
        tuple(op["peer"]) for op in document["operations"] if op["kind"] == "recv" and op["peer"]
    }
    assert peers == {(f"203.0.113.{i + 1}", 40000 + i) for i in range(40)}
    per_worker = [e["stats"]["proxy_headers"] for e in document["stats"]["workers"]]
    assert sum(w["v1"] + w["v2"] for w in per_worker) == 40


def test_untrusted_sources_are_refused_by_the_workers() -> None:
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", pool.port), timeout=30) as sock:
                sock.sendall(encode_v2(("203.0.113.9", 1), ("192.0.2.1", 8080)) + b"x")
                assert closed_unechoed(sock)
        wait_for(
            lambda: snapshot(admin_port)["stats"]["proxy_headers"].get("untrusted") == 6,
            30,
            "6 untrusted",
        )
        seen["stats"] = snapshot(admin_port)["stats"]

    run_pool(client, proxy_protocol=True, proxy_from="10.0.0.0/8")
    assert seen["stats"]["proxy_headers"]["untrusted"] == 6
    assert seen["stats"]["total_connections"] == 0
    assert seen["stats"]["bytes_sent"] == 0


def test_the_supervisor_drains_first_then_stops_on_a_second_signal() -> None:
    """The first signal: /readyz 503 while the workers still accept and echo; the second
    (raised by run_pool as it finishes) stops them."""
    seen: dict[str, Any] = {}

    def client(pool: workers.WorkerPool, admin_port: int) -> None:
        assert readyz(admin_port) == (200, "ready\n")
        signal.raise_signal(signal.SIGINT)
        wait_for(lambda: readyz(admin_port)[0] == 503, 30, "/readyz to go 503")
        seen["readyz"] = readyz(admin_port)
        with socket.create_connection(("127.0.0.1", pool.port), timeout=30) as sock:
            sock.sendall(b"during the drain")
            seen["echo"] = recv_exactly(sock, 16)

    pool = run_pool(client, drain_seconds=600)
    assert seen["readyz"] == (503, "draining\n")
    assert seen["echo"] == b"during the drain"
    assert pool.pids() == [None, None]  # stopped by the second signal, long before 600 s
