"""``examples/app.py``, the README's application example: a subprocess, a signal handler and
an echo server on one iocp_echo loop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend

APP = Path(__file__).resolve().parent.parent / "examples" / "app.py"


def _start() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(APP)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # blocks until the child ran (or the app died)
    assert first.startswith("child says ") and first.rstrip().endswith("exits with 0"), (
        first + proc.stderr.read() if proc.stderr else first
    )
    serving = proc.stdout.readline()
    assert serving.startswith("echo on port "), serving
    return proc, int(serving.split()[-1])


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"through the app's loop")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no SIGTERM to deliver")
def test_app_runs_a_child_serves_and_stops_on_sigterm() -> None:
    proc, port = _start()
    try:
        assert _echo(port) == b"through the app's loop"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip().endswith("stopped"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_app_runs_a_child_and_serves() -> None:
    proc, port = _start()
    try:
        assert _echo(port) == b"through the app's loop"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
