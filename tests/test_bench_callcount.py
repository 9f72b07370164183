"""benchmarks/servers/callcount.py: an exact profiling window, opened and closed over TCP.

The wrapped server here is a blocking one-connection echo whose work per request is known
exactly: one Python call (``handle``) and two built-in calls (``sendall``, then the next
``recv``).  So the counts prove the window is exact: nothing from before ``start`` (the
warm-up echoes) or after ``stop`` leaks in, and the control thread's own calls are not
counted.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALLCOUNT = ROOT / "benchmarks" / "servers" / "callcount.py"

SERVER = """\
import socket
import sys


def handle(conn, data):
    conn.sendall(data)


if __name__ == "__main__":
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print("READY", listener.getsockname()[1], *sys.argv[1:], flush=True)
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        handle(conn, data)
"""

TIMEOUT = 60.0


def _lines(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


class Wrapped:
    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "blocking_echo.py"
        script.write_text(SERVER)
        self.process = subprocess.Popen(
            [sys.executable, str(CALLCOUNT), "--control-port", "0", str(script), "a", "-b"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        control_line = _lines(self.process.stderr).get(timeout=TIMEOUT)
        assert control_line.startswith("callcount: control on 127.0.0.1:")
        self.control_port = int(control_line.rsplit(":", 1)[1])
        self.ready = _lines(self.process.stdout).get(timeout=TIMEOUT).split()
        self.client = socket.create_connection(("127.0.0.1", int(self.ready[1])), TIMEOUT)
        self.control = socket.create_connection(("127.0.0.1", self.control_port), TIMEOUT)
        self.commands = self.control.makefile("rwb", buffering=0)

    def echo(self, times: int) -> None:
        for _ in range(times):
            self.client.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                chunk = self.client.recv(100 - len(got))
                assert chunk, "the wrapped server closed the connection"
                got += chunk

    def command(self, text: str) -> bytes:
        self.commands.write(text.encode() + b"\n")
        return self.commands.readline().strip()

    def window(self, echoes: int) -> dict[str, Any]:
        assert self.command("start") == b"started"
        self.echo(echoes)
        answer: dict[str, Any] = json.loads(self.command("stop"))
        return answer

    def close(self) -> None:
        self.commands.close()
        self.control.close()
        self.client.close()
        self.process.wait(TIMEOUT)


@pytest.fixture
def wrapped(tmp_path: Path) -> Iterator[Wrapped]:
    server = Wrapped(tmp_path)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.close()


def _by_name(window: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    python = {name: n for name, _, _, n in window["python"]}
    builtin = {name: n for name, n in window["builtin"]}
    return python, builtin


def test_the_script_runs_as_main_with_its_own_arguments(wrapped: Wrapped) -> None:
    assert wrapped.ready[0] == "READY" and wrapped.ready[2:] == ["a", "-b"]


def test_the_window_holds_exactly_the_calls_between_start_and_stop(wrapped: Wrapped) -> None:
    wrapped.echo(30)  # warm-up echoes, before the window: not counted
    window = wrapped.window(200)
    python, builtin = _by_name(window)
    assert window["python_calls"] == 200 and python == {"handle": 200}
    assert builtin["socket.sendall"] == 200
    # The server calls recv again right after each reply, and the client sends "start" or
    # "stop" as soon as it has that reply: whether the recv at each edge of the window falls
    # inside is a race the client cannot observe.  Everything else is exact.
    assert 199 <= builtin["socket.recv"] <= 201
    assert window["c_calls"] == builtin["socket.sendall"] + builtin["socket.recv"]
    assert window["python"][0][1:3] == ["blocking_echo.py", 5]
    assert window["method"] == ("gated" if sys.version_info < (3, 12) else "window")


def test_each_window_counts_from_zero_and_nothing_after_stop(wrapped: Wrapped) -> None:
    wrapped.echo(1)  # the server has accepted and sits in its echo loop
    assert wrapped.window(50)["python_calls"] == 50
    wrapped.echo(40)  # between windows: not counted
    second = wrapped.window(7)
    assert second["python_calls"] == 7 and 7 + 6 <= second["c_calls"] <= 7 + 8


def test_commands_out_of_order_are_refused(wrapped: Wrapped) -> None:
    wrapped.echo(1)
    assert json.loads(wrapped.command("stop")) == {"error": "no window is open"}
    assert wrapped.command("start") == b"started"
    assert json.loads(wrapped.command("start")) == {"error": "a window is already open"}
    assert json.loads(wrapped.command("jump")) == {"error": "unknown command 'jump'"}
    assert "python_calls" in json.loads(wrapped.command("stop"))
