"""What ``test_haproxy.py`` runs: iocp_echo instances, a real HAProxy in front, and clients.

The instances are the command line (``python -m iocp_echo --proxy-protocol --drain-seconds S``),
natively or on Windows CPython under Wine (``tools/winpy.py``), each on ports the OS picked
(read back from the lines it prints).  HAProxy runs ``examples/haproxy.cfg`` itself, pointed at
them through the environment variables that file documents; the frontend's listening socket is
opened here and handed over as ``fd@N``, so no port is guessed.  Every wait is on something
observed (a printed line, HAProxy's server state read from its stats socket, an instance's
``/readyz``), with a deadline.

Clients use blocking sockets in threads and a selector per echo: they send and receive at once
(an echo client that sends everything first deadlocks once the payload exceeds the socket
buffers), then half-close and read to the end, so an echo is exact only if every byte came
back and nothing more.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import queue
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .helpers import wait_for as wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "haproxy.cfg"

# tools/ is a folder of scripts, not a package: check.py imports its neighbours the same way.
# ("as haproxy": the test module reaches it through this one.)
sys.path.insert(0, str(ROOT / "tools"))
import haproxy as haproxy  # noqa: E402
import winpy  # noqa: E402

LISTENING = re.compile(r"listening on (\S+):(\d+) \(backend: ([^)]+\))\)")
ADMIN = re.compile(r"admin snapshot on http://([^/]+):(\d+)/")
#: The backend and server names of examples/haproxy.cfg.
BACKEND = "iocp_echo"
SERVERS = ("echo1", "echo2", "echo3")


def haproxy_or_skip_reason() -> tuple[str | None, str]:
    """(path, "") when HAProxy can be used, else (None, why not): the tests' skip reason."""
    try:
        return haproxy.haproxy_path(), ""
    except haproxy.HAProxyUnavailable as exc:
        return None, str(exc)


# -- instances ---------------------------------------------------------------------------------


@functools.cache
def _windows_python(version: str) -> str:
    """Windows CPython *version*'s python.exe, provisioned once (tools/winpy.py)."""
    return str(winpy.provision(version))


class Instance:
    """One ``iocp-echo`` process, natively or under Wine, behind the balancer.

    Its stdout is read by a thread (the lines saying where it listens); its stderr, the log,
    goes to ``<name>.log`` in the test's folder, appended to across restarts, and is quoted
    when something fails.  Natively it is stopped with SIGTERM, as a service manager does;
    under Wine with SIGINT, which Wine delivers to the Windows process as a console Ctrl-C.

    Under Wine it runs as ``wine64 python.exe`` with tools/winpy.py's provisioning and
    environment, not through ``winpy.py``'s own runner: that one returns only once the
    Windows process's output has ended, and the first Wine process of a prefix hands its
    stdout and stderr down to the Wine services it starts (wineserver, services.exe,
    explorer.exe...), which keep them open until the last Wine process ends.  With two
    instances, the first to stop would look as if it never did.  Here the process waited for
    is the Windows process itself, and its output is copied by threads that may outlive it.
    """

    def __init__(
        self,
        name: str,
        folder: Path,
        *,
        drain_seconds: float,
        wine_python: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.log_path = folder / f"{name}.log"
        self.drain_seconds = drain_seconds
        self.wine_python = wine_python
        self.startup_timeout = startup_timeout
        self.stop_signal = signal.SIGINT if wine_python else signal.SIGTERM
        self.port = 0
        self.admin_port = 0
        self.backend = ""
        self.process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [
            "-m",
            "iocp_echo",
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--proxy-protocol",
            "--drain-seconds",
            str(self.drain_seconds),
        ]
        if self.wine_python is None:
            return [sys.executable, *args]
        return [str(winpy.WINE), _windows_python(self.wine_python), *args]

    def start(self) -> Instance:
        """Start it (on the ports it had, after a restart) and wait until both ports are open."""
        self.launch()
        return self.wait_started()

    def launch(self) -> None:
        """Start the process; :meth:`wait_started` waits for it (so several start at once)."""
        assert self.process is None or self.process.poll() is not None
        self._lines = queue.Queue()
        command = self.command()
        with open(self.log_path, "a") as log:
            log.write(f"--- {self.name}: {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                # Windows CPython under Wine cannot start with a file as stderr: a pipe, copied.
                stderr=log if self.wine_python is None else subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=ROOT,
                env=None if self.wine_python is None else winpy.wine_environment(),
                # A runner that started the suite with SIGINT ignored must not pass that on.
                preexec_fn=_default_signals,
            )
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()
        if self.wine_python is not None:
            threading.Thread(target=self._log, args=(self.process.stderr,), daemon=True).start()

    def wait_started(self) -> Instance:
        """Wait for the lines that say where it listens (its echo port, then its admin port)."""
        listening = LISTENING.search(self._expect(LISTENING))
        assert listening is not None
        admin = ADMIN.search(self._expect(ADMIN))
        assert admin is not None
        port, admin_port = int(listening.group(2)), int(admin.group(2))
        assert self.port in (0, port) and self.admin_port in (0, admin_port)
        self.port, self.admin_port, self.backend = port, admin_port, listening.group(3)
        return self

    def _pump(self, stream: TextIO | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _log(self, stream: TextIO | None) -> None:
        assert stream is not None
        with open(self.log_path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()

    def _expect(self, pattern: re.Pattern[str]) -> str:
        deadline = time.monotonic() + self.startup_timeout
        seen: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no line matching {pattern.pattern!r} within "
                    f"{self.startup_timeout} s; stdout {seen}; log:\n{self.log_tail()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.name} exited before printing {pattern.pattern!r}; stdout {seen}; "
                    f"log:\n{self.log_tail()}"
                )
            seen.append(line)
            if pattern.search(line):
                return line

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_stop_signal(self) -> None:
        assert self.process is not None
        self.process.send_signal(self.stop_signal)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        assert self.process is not None
        self.process.kill()

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {timeout} s later; log:\n{self.log_tail()}"
            ) from None

    def close(self) -> None:
        """Leave nothing running, quickly: the stop signal, and once the instance drains (its
        /readyz says so) a second one, which stops it at once; SIGKILL if it does not."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.send_signal(self.stop_signal)
            wait_for(lambda: process.poll() is not None or not self._ready(), 30, "a drain")
            if process.poll() is None:
                process.send_signal(self.stop_signal)
            process.wait(30)
            return
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        process.kill()
        process.wait(30)

    def _ready(self) -> bool:
        try:
            return self.readyz()[0] == 200
        except OSError:  # the admin endpoint is closed: it is stopping
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    # -- its admin endpoint --------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """GET *path* on the admin port: (status, body), whatever the status."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), bytes(error.read())

    def readyz(self) -> tuple[int, str]:
        status, body = self.get("/readyz")
        return status, body.decode(errors="replace")

    def snapshot(self) -> dict[str, Any]:
        status, body = self.get("/?limit=1000")
        assert status == 200, (status, body[:200])
        document = json.loads(body)
        assert isinstance(document, dict)
        return document

    def peers(self) -> set[tuple[str, int]]:
        """The peer of every pending operation that has one, as the instance reports it."""
        found = set()
        for operation in self.snapshot()["operations"]:
            if operation.get("peer"):
                host, port = operation["peer"][:2]
                found.add((str(host), int(port)))
        return found


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- HAProxy -----------------------------------------------------------------------------------


class HAProxy:
    """``haproxy -db -f examples/haproxy.cfg`` for up to three instances.

    *instances* fills the servers echo1..echo3 in order; a server with no instance gets weight
    0 (HAProxy sends it nothing) and an address where nothing listens (its check keeps it DOWN).
    """

    def __init__(
        self,
        executable: str,
        instances: Sequence[Instance],
        folder: Path,
        *,
        check_inter: str = "200ms",
    ) -> None:
        assert 1 <= len(instances) <= len(SERVERS)
        self.executable = executable
        self.instances = list(instances)
        self.folder = folder
        self.check_inter = check_inter
        self.stats_path = folder / "haproxy.sock"
        self.log_path = folder / "haproxy.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self, frontend_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            IOCP_ECHO_BIND=f"fd@{frontend_fd}",
            IOCP_ECHO_CHECK_INTER=self.check_inter,
            IOCP_ECHO_STATS_SOCKET=str(self.stats_path),
        )
        for number, _ in enumerate(SERVERS, 1):
            if number <= len(self.instances):
                instance = self.instances[number - 1]
                env[f"IOCP_ECHO_SERVER{number}"] = instance.address
                env[f"IOCP_ECHO_ADMIN{number}"] = str(instance.admin_port)
                env[f"IOCP_ECHO_WEIGHT{number}"] = "1"
            else:
                env[f"IOCP_ECHO_SERVER{number}"] = "127.0.0.1:1"
                env[f"IOCP_ECHO_ADMIN{number}"] = "1"
                env[f"IOCP_ECHO_WEIGHT{number}"] = "0"
        return env

    def start(self) -> HAProxy:
        frontend = socket.socket()
        try:
            frontend.bind(("127.0.0.1", 0))
            frontend.listen(1024)
            self.port = frontend.getsockname()[1]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [self.executable, "-db", "-f", str(CONFIG)],
                    env=self.environment(frontend.fileno()),
                    pass_fds=(frontend.fileno(),),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        finally:
            frontend.close()  # HAProxy has its own copy
        wait_for(self._answers, 30, f"HAProxy's stats socket; log:\n{self.log_tail()}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"haproxy exited with {self.process.returncode}; log:\n{self.log_tail()}"
            )
        try:
            self.command("show info")
        except OSError:
            return False
        return True

    def command(self, line: str) -> str:
        """One command on the runtime API (the stats socket); its whole answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: svname -> {column: value}."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] in SERVERS
        }

    def server(self, name: str) -> dict[str, str]:
        return self.servers()[name]

    def wait_state(
        self, name: str, status: str, timeout: float, check_status: str | None = None
    ) -> dict[str, str]:
        """Wait until server *name* reports *status* ("UP", "DOWN": settled, not "UP 1/2"),
        and, if given, *check_status* (L7OK, L7STS for a 503, L4CON for a refusal); return
        that row of ``show stat``."""
        found: dict[str, str] = {}

        def reached() -> bool:
            found.update(self.server(name))
            return found["status"] == status and check_status in (None, found["check_status"])

        wait_for(
            reached,
            timeout,
            f"{name} {status} {check_status or ''} (last: {found.get('status')} "
            f"{found.get('check_status')} {found.get('check_code')}); log:\n{self.log_tail()}",
        )
        return found

    def wait_all_up(self, timeout: float) -> None:
        for number, _ in enumerate(self.instances):
            self.wait_state(SERVERS[number], "UP", timeout, "L7OK")

    def sessions(self, name: str) -> int:
        """How many connections HAProxy has sent to server *name* so far (stot)."""
        return int(self.server(name)["stot"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


# -- clients -----------------------------------------------------------------------------------


def echo_once(
    port: int,
    payload: bytes,
    *,
    timeout: float = 30.0,
    prefix: bytes = b"",
    host: str = "127.0.0.1",
) -> bytes:
    """Connect, send *prefix* + *payload* while reading, half-close, read to the end.

    Returns everything that came back.  *prefix* (a PROXY header, for a direct connection to
    an instance) is sent but not echoed back.  Raises on a refusal, a reset or the deadline.
    """
    deadline = time.monotonic() + timeout
    outgoing = memoryview(prefix + payload)
    received = bytearray()
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        selectors.DefaultSelector() as selector,
    ):
        sock.setblocking(False)
        sent = 0
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        if not outgoing:
            sock.shutdown(socket.SHUT_WR)
            selector.modify(sock, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"echo of {len(payload)} bytes: {sent} sent, {len(received)} received in "
                    f"{timeout} s"
                )
            for _, mask in selector.select(remaining):
                if mask & selectors.EVENT_WRITE:
                    try:
                        sent += sock.send(outgoing[sent : sent + 65536])
                    except BlockingIOError:
                        pass
                    if sent == len(outgoing):
                        sock.shutdown(socket.SHUT_WR)
                        selector.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        if sent < len(outgoing):
                            raise ConnectionError(
                                f"EOF after {sent} of {len(outgoing)} bytes sent, "
                                f"{len(received)} received"
                            )
                        return bytes(received)
                    received += chunk


def wait_refused(port: int, timeout: float) -> float:
    """Connect to *port* until the connection is refused; return when that happened.

    A process that is reaped may not have closed its listener yet: on Linux, io_uring tears a
    ring down after the process has gone, and the listening socket that its pending accepts
    hold stays open for those few milliseconds (the kernel completes handshakes, then resets
    them).  A refusal is the moment nothing can connect any more.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        except ConnectionRefusedError:
            return time.monotonic()
        except OSError:
            pass  # accepted by the kernel, then reset: the listener is going
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still accepts connections {timeout} s later")
        time.sleep(0.001)


def proxy_v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY protocol v1 line, for talking to an instance directly (as its balancer would)."""
    return f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def hold_connection(port: int, greeting: bytes = b"hello") -> socket.socket:
    """A client that echoed *greeting* through the balancer and stays connected."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(greeting)
    received = b""
    while len(received) < len(greeting):
        chunk = sock.recv(len(greeting) - len(received))
        if not chunk:
            raise ConnectionError(f"EOF after {received!r}")
        received += chunk
    assert received == greeting
    return sock


@dataclass(frozen=True)
class Attempt:
    """One client connection of an :class:`EchoLoad`: when, how big, and what went wrong."""

    started: float
    ended: float
    size: int
    error: str | None


#: The sizes an EchoLoad client cycles through: small, a read's worth, and past it.
LOAD_SIZES = (1, 200, 1024, 8192, 65_536, 70_000)


class EchoLoad:
    """*clients* threads that each connect through the balancer, echo, close, again and again.

    Every attempt is recorded; a wrong echo, a refusal, a reset or a timeout is a failure.
    *pause* paces each client (it sets the load, it is not waited on for correctness), so a
    2-core machine running HAProxy, the instances and the clients keeps answering health checks.
    """

    def __init__(
        self,
        port: int,
        clients: int = 4,
        *,
        sizes: Iterable[int] = LOAD_SIZES,
        pause: float = 0.01,
        timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.sizes = tuple(sizes)
        self.pause = pause
        self.timeout = timeout
        self._attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(number,), daemon=True)
            for number in range(clients)
        ]

    def __enter__(self) -> EchoLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
            assert not thread.is_alive(), "an EchoLoad client did not finish"
        return self.attempts()

    def _client(self, number: int) -> None:
        rng = random.Random(number)
        turn = number
        while not self._stop.is_set():
            size = self.sizes[turn % len(self.sizes)]
            turn += 1
            payload = rng.randbytes(size)
            started = time.monotonic()
            error = None
            try:
                echoed = echo_once(self.port, payload, timeout=self.timeout)
                if echoed != payload:
                    error = f"wrong echo: {len(echoed)} bytes back for {size} (cut or changed)"
            except OSError as exc:  # refused, reset, timed out
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._attempts.append(Attempt(started, time.monotonic(), size, error))
            self._stop.wait(self.pause)

    def attempts(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts)

    def successes_since(self, moment: float) -> int:
        return sum(1 for a in self.attempts() if a.started >= moment and a.error is None)

    def wait_successes(self, count: int, since: float, timeout: float) -> None:
        """Wait until *count* echoes that started after *since* have succeeded."""
        wait_for(
            lambda: self.successes_since(since) >= count,
            timeout,
            f"{count} successful echoes through the balancer (failures so far: "
            f"{failures(self.attempts())[:5]})",
        )


def failures(attempts: Iterable[Attempt]) -> list[Attempt]:
    return [a for a in attempts if a.error is not None]
