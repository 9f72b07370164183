"""The PROXY headers the benchmark sends (benchmarks/loadgen ``-proxy``, and the start-up
probe's in benchmarks/run.py), read by iocp_echo's own parser: each names the connection's
real ends (the load generator's local address as the source, the server's as the
destination), and the request follows the header unchanged, whether the header went out in a
write of its own or with the request (``-joined``).

The load generator is a Linux program (the benchmarks run it natively, beside the servers
under Wine), built here with Go as ``python3 -m benchmarks run`` builds it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run
from iocp_echo.proxy_protocol import ProxyHeader, parse_header

needs_loadgen = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("go") is None,
    reason="the load generator is a Linux program built with Go (Debian's golang-go, which "
    "python3 -m benchmarks run installs): no Go toolchain here"
    if sys.platform != "win32"
    else "the load generator is a Linux program: the benchmarks run it natively, never under Wine",
)


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("loadgen") / "loadgen"
    env = dict(
        os.environ,
        GOFLAGS="-mod=mod",
        GOCACHE=str(run.CACHE / "gocache"),
        CGO_ENABLED="0",
    )
    subprocess.run(
        ["go", "build", "-o", str(target), "."],
        cwd=Path(run.__file__).parent / "loadgen",
        env=env,
        check=True,
        timeout=300,
    )
    return target


def receive_header(conn: socket.socket) -> tuple[ProxyHeader, bytes]:
    """Read until a whole header and at least one byte after it have arrived."""
    data = b""
    while True:
        chunk = conn.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
        header = parse_header(data)
        if header is not None and len(data) > header.length:
            return header, data[header.length :]


@needs_loadgen
@pytest.mark.parametrize(
    ("flags", "version"),
    [(["-proxy", "v2"], 2), (["-proxy", "v1"], 1), (["-proxy", "v2", "-joined"], 2)],
)
def test_each_connection_opens_with_a_header_naming_its_real_ends(
    loadgen: Path, flags: list[str], version: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        address = listener.getsockname()
        command = [str(loadgen), "-addr", f"127.0.0.1:{address[1]}", "-mode", "idle"]
        client = subprocess.Popen(
            [*command, "-conns", "1", *flags],
            stdin=subprocess.DEVNULL,  # idle mode holds its connections until stdin closes
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(30)
                header, rest = receive_header(conn)
                conn.sendall(rest)  # the idle mode's one-byte echo
                out, err = client.communicate(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(15)
    assert client.returncode == 0, err
    assert header.version == version and header.command == "PROXY"
    assert header.source == peer and header.destination == address
    assert rest == b"x"
    assert b'"connections":1' in out and b'"failures":0' in out


@needs_loadgen
def test_an_unknown_header_version_is_refused(loadgen: Path) -> None:
    said = subprocess.run(
        [str(loadgen), "-proxy", "v3"], capture_output=True, text=True, timeout=30
    )
    assert said.returncode == 2 and '-proxy must be v1 or v2, got "v3"' in said.stderr


def test_the_start_up_probe_sends_a_v1_header_naming_its_ends() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        with socket.create_connection(listener.getsockname(), timeout=30) as probe:
            conn, _ = listener.accept()
            with conn:
                line = run.proxy_v1(probe)
                conn.settimeout(30)
                probe.sendall(line + b"x")
                header, rest = receive_header(conn)
                assert header.version == 1 and header.length == len(line)
                assert header.source == probe.getsockname()
                assert header.destination == probe.getpeername() == listener.getsockname()
                assert rest == b"x"
