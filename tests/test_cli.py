"""The command line: ``python examples/echo.py`` and ``python -m iocp_echo``.

The first group runs wherever the tests run (natively on Linux, and under Wine), the CLI
being a subprocess of the test's own interpreter.  ``wine_cli`` tests run on Linux and drive
the CLI running on Windows CPython under Wine (``tools/winpy.py``) with a Linux client and a
real SIGINT, which Wine delivers to the Windows process as a console Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iocp_echo import cli, inspector

ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo.py")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(backend: (.+)\)")


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    target = ["-m", "iocp_echo"] if module else [ECHO]
    return subprocess.run(
        [sys.executable, *target, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("module", [False, True], ids=["examples/echo.py", "-m iocp_echo"])
def test_help_documents_every_option(module: bool) -> None:
    result = run_cli("--help", module=module)
    assert result.returncode == 0
    for option in ("--host", "--port", "--max-connections", "--idle-timeout", "--log-level"):
        assert option in result.stdout
    assert "Ctrl-C" in result.stdout and "exit status" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "eighty"],
        ["--max-connections", "0"],
        ["--idle-timeout", "-1"],
        ["--log-level", "LOUD"],
        ["--no-such-option"],
    ],
)
def test_bad_argument_exits_2_with_argparse_message(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("port", ["80", "70000", "-5"])
def test_invalid_port_exits_1_with_one_line(port: str) -> None:
    result = run_cli("--port", port)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"iocp-echo: error: port {port} is out of range: use 1024-65535, or 0 to let the OS "
        "choose a free port"
    ]


def test_unsupported_platform_exits_1_with_one_line() -> None:
    """The CLI is told it runs on macOS, which has no completion backend."""
    pretend = "import sys; from iocp_echo.cli import main; sys.platform = 'darwin'; "
    result = subprocess.run(
        [sys.executable, "-c", pretend + "sys.exit(main(['--port', '0']))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no completion backend" in lines[0] and "winpy.py" in lines[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.backend
def test_ctrl_break_stops_the_server_gracefully(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-Break on Windows (SIGBREAK; SIGTERM elsewhere) shuts down and exits 0.

    Raised in-process: Wine cannot deliver a console Ctrl-Break to another process
    (GenerateConsoleCtrlEvent fails with WinError 12 there).
    """
    port = _free_port()
    stop_signal = getattr(signal, "SIGBREAK", signal.SIGTERM)
    echoed: list[bytes] = []

    def client() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"before break")
                    echoed.append(sock.recv(100))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)  # the server is still starting: poll, bounded by the deadline
        signal.raise_signal(stop_signal)

    thread = threading.Thread(target=client)
    thread.start()
    assert cli.main(["--port", str(port)]) == 0
    thread.join(10)
    assert echoed == [b"before break"]
    out = capsys.readouterr()
    assert LISTENING.search(out.out)
    assert "iocp-echo: stopped" in out.err


# -- the CLI under Wine, driven from Linux ----------------------------------------------------


def start_under_wine(version: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "winpy.py"), "--python", version, ECHO, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture
def wine_server(wine_python: str) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    process = start_under_wine(wine_python, "--port", "0", "--log-level", "DEBUG")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the server is ready (or exits)
        match = LISTENING.search(line)
        assert match, f"no 'listening on' line: {line!r} {process.stderr and process.stderr.read()}"
        yield process, int(match.group(1)), match.group(2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.mark.wine_cli
def test_wine_cli_echoes_for_a_linux_client_and_stops_on_ctrl_c(
    wine_server: tuple[subprocess.Popen[str], int, str],
) -> None:
    process, port, backend = wine_server
    assert backend == "IOCP (asyncio ProactorEventLoop)"
    payload = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"Hello, IOCP!")
        assert sock.recv(100) == b"Hello, IOCP!"
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            received += sock.recv(65536)
        sender.join(30)
        assert received == payload
    process.send_signal(signal.SIGINT)  # Wine turns it into a console Ctrl-C
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "iocp-echo: stopped" in err
    assert "Traceback" not in err
    assert "connection opened from 127.0.0.1:" in err  # DEBUG logs reach the console


@pytest.mark.wine_cli
def test_wine_cli_ctrl_c_with_clients_connected(
    wine_server: tuple[subprocess.Popen[str], int, str],
) -> None:
    process, port, _ = wine_server
    clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(10)]
    for sock in clients:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    for sock in clients:  # each connection was closed by the server: EOF
        assert sock.recv(1) == b""
        sock.close()


@pytest.mark.wine_cli
def test_wine_cli_port_in_use_exits_1_naming_the_port(wine_python: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = start_under_wine(wine_python, "--port", str(port))
        _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"port {port} is already in use" in lines[0]


@pytest.mark.wine_cli
@pytest.mark.parametrize("args", [["--port", "1000"], ["--port", "x"]])
def test_wine_cli_error_exits(wine_python: str, args: list[str]) -> None:
    process = start_under_wine(wine_python, *args)
    _, err = process.communicate(timeout=120)
    expected = 2 if args[1] == "x" else 1
    assert process.returncode == expected, err
    assert "Traceback" not in err
    assert "error:" in err


def test_inspect_formats_a_snapshot_as_a_table() -> None:
    snapshot = {
        "server": {"backend": "IOCP", "host": "127.0.0.1", "port": 9000, "python": "3.13.2"},
        "stats": {
            "open_connections": 1,
            "total_connections": 2,
            "bytes_received": 10,
            "bytes_sent": 10,
        },
        "operations": [
            {
                "kind": "accept",
                "state": "pending",
                "fileno": 100,
                "local": ["127.0.0.1", 9000],
                "peer": None,
                "nbytes": 0,
                "age": 1.5,
            },
            {
                "kind": "recv",
                "state": "pending",
                "fileno": 104,
                "local": ["127.0.0.1", 9000],
                "peer": ["127.0.0.1", 50000],
                "nbytes": 65535,
                "age": 0.25,
            },
        ],
        "operations_unavailable": None,
    }
    lines = inspector.format_snapshot(snapshot).splitlines()
    assert lines[1].split() == ["KIND", "STATE", "FD", "LOCAL", "PEER", "BYTES", "AGE"]
    assert lines[2].split() == ["accept", "pending", "100", "127.0.0.1:9000", "-", "0", "1.500s"]
    assert lines[3].split() == [
        "recv",
        "pending",
        "104",
        "127.0.0.1:9000",
        "127.0.0.1:50000",
        "65535",
        "0.250s",
    ]
    assert lines[-1] == "2 pending operation(s)"
    snapshot["operations_unavailable"] = "IocpProactor._cache is missing or not a dict"
    assert "unavailable: IocpProactor._cache" in inspector.format_snapshot(snapshot)


def test_inspect_shows_readiness_and_proxy_header_outcomes() -> None:
    """A draining server says so on the first line; PROXY header outcomes get a line."""
    snapshot: dict[str, Any] = {
        "server": {
            "backend": "IOCP",
            "host": "127.0.0.1",
            "port": 9000,
            "python": "3.13.2",
            "readiness": "draining",
        },
        "stats": {
            "open_connections": 0,
            "total_connections": 3,
            "bytes_received": 0,
            "bytes_sent": 0,
            "proxy_headers": {"v1": 1, "v2": 2, "malformed": 4},
        },
        "operations": [],
        "operations_unavailable": None,
    }
    lines = inspector.format_snapshot(snapshot).splitlines()
    assert lines[0].endswith("NOT READY: draining")
    assert lines[1] == "PROXY headers: v1=1 v2=2 malformed=4"
    snapshot["server"]["readiness"] = "ready"
    snapshot["stats"]["proxy_headers"] = {}
    assert "READY" not in inspector.format_snapshot(snapshot)
    assert "PROXY" not in inspector.format_snapshot(snapshot)


def test_inspect_without_a_server_exits_1_with_one_line() -> None:
    result = run_cli("inspect", f"127.0.0.1:{_free_port()}", module=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iocp-echo inspect: cannot read")


@pytest.mark.wine_cli
def test_wine_cli_admin_endpoint_inspect_and_stats(wine_python: str) -> None:
    process = start_under_wine(
        wine_python,
        "--port",
        "0",
        "--admin-port",
        "0",
        "--stats-every",
        "0.3",
        "--stuck-after",
        "0.5",
    )
    try:
        assert process.stdout is not None
        match = LISTENING.search(process.stdout.readline())
        assert match
        port = int(match.group(1))
        admin_line = process.stdout.readline()
        admin_match = re.search(r"admin snapshot on http://127\.0\.0\.1:(\d+)/", admin_line)
        assert admin_match, admin_line
        admin_port = admin_match.group(1)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            me = "{}:{}".format(*client.getsockname())
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/", timeout=30) as r:
                snapshot = json.load(r)
            assert snapshot["stats"]["open_connections"] == 1
            assert ["127.0.0.1", client.getsockname()[1]] in [
                op["peer"] for op in snapshot["operations"]
            ]
            inspect = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tools" / "winpy.py"),
                    "--python",
                    wine_python,
                    "-m",
                    "iocp_echo",
                    "inspect",
                    f"127.0.0.1:{admin_port}",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
            )
            assert inspect.returncode == 0, inspect.stderr
            rows = [line.split() for line in inspect.stdout.splitlines()]
            assert ["KIND", "STATE", "FD", "LOCAL", "PEER", "BYTES", "AGE"] in rows
            assert any(row[:2] == ["recv", "pending"] and row[4] == me for row in rows), rows
            # Wait, bounded, for the periodic report to call this client's read stuck.
            deadline = time.monotonic() + 30
            seen = ""
            assert process.stderr is not None
            # Raw reads: a text-mode read() of a non-blocking pipe that holds part of a line
            # fails inside the decoder (TypeError: can't concat NoneType to bytes).
            stderr_fd = process.stderr.fileno()
            os.set_blocking(stderr_fd, False)
            while time.monotonic() < deadline and f"peer {me}" not in seen:
                try:
                    seen += os.read(stderr_fd, 1 << 16).decode(errors="replace")
                except BlockingIOError:
                    pass
                time.sleep(0.1)
        assert "connections open=1" in seen
        assert "recv operation pending for" in seen and f"peer {me}" in seen
    finally:
        if process.stderr is not None:
            # communicate() reads blocking: a non-blocking pipe makes it get None (3.11).
            os.set_blocking(process.stderr.fileno(), True)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.backend
@pytest.mark.uring
def test_native_cli_serves_and_stops_on_sigint() -> None:
    """On Linux the CLI serves natively on io_uring; Ctrl-C (SIGINT) stops it with status 0.
    (Under Wine the same is shown by the wine_cli tests above.)"""
    process = subprocess.Popen(
        [sys.executable, ECHO, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        # A program started with SIGINT ignored (a job a non-interactive shell put in the
        # background, as a CI runner may) keeps ignoring Ctrl-C, as it should; the terminal
        # this test plays gives its program the default disposition.
        preexec_fn=_default_sigint,
    )
    try:
        assert process.stdout is not None
        match = LISTENING.search(process.stdout.readline())
        assert match, process.stderr and process.stderr.read()
        assert match.group(2) == "io_uring (asyncio BaseProactorEventLoop)"
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as sock:
            sock.sendall(b"Hello, io_uring!")
            assert sock.recv(100) == b"Hello, io_uring!"
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
            assert sock.recv(1) == b""  # the server closed the connection on its way out
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "iocp-echo: stopped" in err and "Traceback" not in err
