"""``python -m benchmarks run [--quick]``: iocp_echo and its peers, same client, same run.

Every server is started, measured by the same load generator (``benchmarks/loadgen``, Go),
and stopped.  Server and client are pinned to different cores (the machine has two), so the
client never steals the server's CPU.

Under Wine (Windows CPython 3.13): iocp_echo, the stock ProactorEventLoop with a Protocol echo,
asyncio streams, winloop, and Go's net echo built for Windows.  Natively on Linux: the stock
selector loop with the same Protocol, uvloop, Go's native echo, and iocp_echo on its io_uring
backend.  Beside them, when ``../shared/reference/ceilings/`` exists, two *measuring sticks*:
bare completion loops in pure Python with no asyncio (``raw_iocp_echo.py`` under Wine,
``raw_uring_echo.py`` natively), run from where they are, never copied here.  They show what
pure Python can reach on each platform; they are not peers.

The run is a number of alternated *rounds* (the server list forwards, then backwards, ...):

* the first round measures everything: every echo point, churn, memory per idle connection
  (on a fresh server each), and Python calls per echo (``servers/callcount.py``);
* every later round re-measures only the headline echo points and churn, so that those are
  medians of ``repeats`` runs while the rest of the grid costs one run.

Each throughput session starts with a throwaway session (connect, echo, disconnect): a
freshly started stock asyncio server serves its very first connections about 3x slower for
as long as they live, so every server, ours included, gets the same throwaway first.

Writes ``benchmarks/results/latest.json``, ``latest.md``, ``machine.json`` and, with
matplotlib, PNG charts (``--quick`` writes under ``benchmarks/results/quick/``, ``--out DIR``
anywhere: both leave the committed full results alone).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from . import report, stats

Point = tuple[int, int]  # (message size, connections)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import winpy  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
BIN = CACHE / "bin"
WINE_SITE = CACHE / "wine-site313"
VENV = ROOT / ".cache" / "venv" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
#: The measuring sticks live outside the repository, next to the checkout.
CEILINGS = ROOT.parent / "shared" / "reference" / "ceilings"
CALLCOUNT = "benchmarks/servers/callcount.py"
SERVER_CPU, CLIENT_CPU = {1}, {0}
#: The echo server's modes (iocp_echo's serve_echo and its peers).
ECHO_MODES = frozenset({"echo", "churn", "idle", "calls"})
#: A user's own programs on each event loop (issue 14): the streams echo server
#: (``start_server``), the Protocol echo server (``create_server``), and ping-pong clients
#: (``open_connection``) against a fixed server, Go's native echo.
LOOP_MODES = frozenset({"streams", "protocol", "client"})
#: Go's native echo driven by the load generator at the loop points: the rate the load
#: generator can drive and the fixed server can serve, measured whenever a loop mode runs.
CEILING = "ceiling"
#: Issue 15's rows (``benchmarks/scaleout.py``): iocp_echo instances behind a real HAProxy
#: beside one instance direct, and connection churn with and without a PROXY protocol header.
#: About 5 minutes of a full run (1.2 of a quick one).
BALANCED, PROXY_CHURN = "balanced", "proxy-churn"
SCALEOUT_MODES = frozenset({BALANCED, PROXY_CHURN})
#: The default plan's modes.
ALL_MODES = ECHO_MODES | LOOP_MODES | SCALEOUT_MODES
#: Modes run only when asked for (``--modes workers``): not part of the default plan.
EXTRA_MODES = frozenset({"workers"})
#: iocp_echo's modes that run beside the server list, each on its own processes, rather than
#: per server of the list.
OWN_RUN_MODES = EXTRA_MODES | SCALEOUT_MODES
#: The workers run: iocp_echo with 1 and with 2 worker processes at these points, server and
#: client both free to use every core (pinning the server to one core would defeat workers).
WORKER_COUNTS = (1, 2)
WORKER_POINTS: tuple[Point, ...] = ((1024, 100), (1024, 1000))
WORKER_NUMERIC = ("server_cores", "rps_per_server_core")
#: The numeric fields of the scale-out rows (see ``scaleout.NUMERIC``).
SCALEOUT_NUMERIC = (
    "haproxy_cpu",
    "machine_cpu",
    "other_cpu",
    "share_min",
    "server_us_per_conn",
    "pair_rps_ratio",
    "pair_cpu_ratio",
)
#: How long to let a server finish what it was doing before a profiling window opens or
#: closes (the last echoes' send completions, a settling accept queue).
SETTLE = 0.3
#: The throwaway first session: this many 1 KiB connections for ``Plan.throwaway`` seconds.
THROWAWAY_CONNS = 20
NUMERIC = (
    "rps",
    "mib_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "rss_kib_per_conn",
    "client_cpu",
    "failures",
    "server_cpu",
)


@dataclasses.dataclass(frozen=True)
class Server:
    name: str
    runtime: str
    platform: str  # "wine" or "linux": servers are compared within one platform only
    command: tuple[str, ...]  # "{port}" is replaced; see _argv for how each kind starts
    role: str = "peer"  # "ours", "peer" or "stick" (a measuring stick, not a peer)
    modes: frozenset[str] = ECHO_MODES
    #: The echo points it serves (None: all of the plan's).
    points: frozenset[Point] | None = None
    #: False for the sticks, which have no shutdown: they are killed.
    graceful: bool = True
    #: For the programs of ``servers/asyncio_echo.py`` and ``servers/pingpong.py``: the
    #: ``loopchoice.py`` name of the loop they run on (None for the others).
    loop: str | None = None
    #: Started with ``--proxy-protocol``: every connection made to it (the start-up probe's,
    #: the load generator's) first sends a PROXY protocol header, as a balancer would.
    proxy: bool = False

    @property
    def python(self) -> bool:
        """Python code whose calls per echo ``servers/callcount.py`` can count."""
        return self.command[0] in ("py", "native-py")


def servers(ceilings: Path = CEILINGS) -> list[Server]:
    site = winpy.to_windows_path(WINE_SITE)
    asyncio_echo = "benchmarks/servers/asyncio_echo.py"
    no_calls = ECHO_MODES - {"calls"}
    # iocp_echo logs at INFO so that its start-up lines (which engine it runs) are captured;
    # it logs nothing at INFO per connection or per request.
    listed = [
        Server(
            "iocp_echo",
            "wine-3.13",
            "wine",
            ("py", "examples/echo.py", "--port", "{port}", "--log-level", "INFO"),
            role="ours",
        ),
        Server(
            "asyncio-proactor-protocol",
            "wine-3.13",
            "wine",
            ("py", asyncio_echo, "--port", "{port}"),
        ),
        Server(
            "asyncio-proactor-streams",
            "wine-3.13",
            "wine",
            ("py", asyncio_echo, "--port", "{port}", "--streams"),
        ),
        Server(
            "winloop",
            "wine-3.13",
            "wine",
            ("py", asyncio_echo, "--port", "{port}", "--loop", "winloop", "--site", site),
            loop="winloop",
        ),
        Server(
            "go",
            "wine-go",
            "wine",
            ("exe", str(BIN / "goecho.exe"), "-addr", "127.0.0.1:{port}"),
            modes=no_calls,
        ),
        Server(
            "iocp_echo",
            "linux-3.13",
            "linux",
            ("native-py", "examples/echo.py", "--port", "{port}", "--log-level", "INFO"),
            role="ours",
        ),
        Server(
            "asyncio-selector-protocol",
            "linux-3.13",
            "linux",
            ("native-py", asyncio_echo, "--port", "{port}"),
        ),
        *(
            Server(
                name,
                "linux-3.13",
                "linux",
                ("native-py", asyncio_echo, "--port", "{port}", "--loop", name),
                loop=name,
            )
            for name in ("uvloop", *NATIVE_LOOPS)
        ),
        go_native(),
    ]
    return listed + loop_servers() + sticks(ceilings)


def go_native(modes: frozenset[str] = (ECHO_MODES - {"calls"}) | {CEILING}) -> Server:
    """Go's native echo: a peer of the echo, the fixed server of the client rows, and (in
    the ceiling mode) what shows the load generator's headroom for the loop rows."""
    return Server(
        "go",
        "linux-go",
        "linux",
        ("native", str(BIN / "goecho"), "-addr", "127.0.0.1:{port}"),
        modes=modes,
    )


#: The Rust loops measured natively beside uvloop (issue 14): pip requirement, installed
#: into the bench venv on their own (``provision_loops``) so that one that fails to install
#: costs only its own rows.
NATIVE_LOOPS = {"rloop": "rloop==0.5.0", "uringcore": "uringcore==0.9.1"}
#: Each platform's loops for the loop rows, as (row name, ``loopchoice.py`` name, role);
#: the first peer is the baseline the ratios are taken against.
LOOPS = {
    "wine": (
        ("iocp_echo", "iocp_echo", "ours"),
        ("asyncio-proactor", "default", "peer"),
        ("winloop", "winloop", "peer"),
    ),
    "linux": (
        ("iocp_echo", "iocp_echo", "ours"),
        ("asyncio-selector", "default", "peer"),
        ("uvloop", "uvloop", "peer"),
        ("rloop", "rloop", "peer"),
        ("uringcore", "uringcore", "peer"),
    ),
}


def loop_servers() -> list[Server]:
    """One entry per loop and platform for the loop rows.  Its command starts the Protocol
    echo on that loop; the streams echo adds ``--streams``, and the client rows run
    ``servers/pingpong.py`` on the same loop (see :func:`loop_command`)."""
    return [
        Server(
            name,
            "wine-3.13" if where == "wine" else "linux-3.13",
            where,
            (*loop_command(where, "benchmarks/servers/asyncio_echo.py", loop), "--port", "{port}"),
            role=role,
            modes=LOOP_MODES,
            loop=loop,
        )
        for where, loops in LOOPS.items()
        for name, loop, role in loops
    ]


def loop_command(where: str, script: str, loop: str) -> tuple[str, ...]:
    """A Python program of ``servers/`` on *loop* (winloop under Wine needs its folder)."""
    command: tuple[str, ...] = ("py" if where == "wine" else "native-py", script, "--loop", loop)
    if loop == "winloop":
        command += ("--site", winpy.to_windows_path(WINE_SITE))
    return command


#: The points the bare loops are asked to serve: the headline 1 KiB points and 64 KiB x 20.
STICK_POINTS = frozenset({(1024, 20), (1024, 1000), (65536, 20)})


def sticks(ceilings: Path) -> list[Server]:
    """The measuring sticks found in *ceilings* (none when it is absent)."""
    found = []
    uring, iocp = ceilings / "raw_uring_echo.py", ceilings / "raw_iocp_echo.py"
    if iocp.is_file():
        found.append(
            Server(
                "raw_iocp_echo",
                "wine-3.13",
                "wine",
                ("py", winpy.to_windows_path(iocp), "{port}"),
                role="stick",
                modes=frozenset({"echo", "calls"}),
                points=STICK_POINTS,
                graceful=False,
            )
        )
    if uring.is_file():
        found.append(
            Server(
                "raw_uring_echo",
                "linux-3.13",
                "linux",
                ("native-py", str(uring), "{port}"),
                role="stick",
                modes=frozenset({"echo", "calls"}),
                points=STICK_POINTS,
                graceful=False,
            )
        )
    return found


def ceilings_note(ceilings: Path = CEILINGS) -> str:
    """One line for the report on where the measuring sticks came from, or why they are
    missing."""
    names = [
        name for name in ("raw_iocp_echo.py", "raw_uring_echo.py") if (ceilings / name).exists()
    ]
    if len(names) == 2:
        return f"Measuring sticks run from {ceilings}."
    if not ceilings.is_dir():
        return f"Measuring sticks not measured: {ceilings} is absent on this machine."
    return f"Measuring sticks: only {', '.join(names) or 'none'} found in {ceilings}."


# -- provisioning ------------------------------------------------------------------------


_STARTED = time.monotonic()


def say(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - _STARTED), 60)
    print(f"bench: [{minutes:2d}:{seconds:02d}] {message}", file=sys.stderr, flush=True)


def provision() -> None:
    """Go (Debian's), the binaries, winloop for Windows, a venv with uvloop and matplotlib."""
    if shutil.which("go") is None:
        say("installing Debian's golang-go")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "golang-go"],
            check=True,
            env=env,
        )
    BIN.mkdir(parents=True, exist_ok=True)
    go_env = dict(os.environ, GOFLAGS="-mod=mod", GOCACHE=str(CACHE / "gocache"), CGO_ENABLED="0")
    for source, target, goos in (
        ("loadgen", "loadgen", "linux"),
        ("servers/goecho", "goecho", "linux"),
        ("servers/goecho", "goecho.exe", "windows"),
    ):
        out = BIN / target
        folder = Path(__file__).parent / source
        newest = max(path.stat().st_mtime for path in folder.iterdir())
        if not out.exists() or out.stat().st_mtime < newest:
            say(f"building {target}")
            subprocess.run(
                ["go", "build", "-o", str(out), "."],
                check=True,
                cwd=folder,
                env=dict(go_env, GOOS=goos),
            )
    winpy.provision("3.13")
    if not (WINE_SITE / "winloop").exists():
        say("installing winloop for Windows CPython 3.13")
        winpy.install_for_windows(WINE_SITE, "3.13", report.bench_requirements("wine"))
    import check  # tools/, on sys.path above

    check.ensure_venv("3.13", report.bench_requirements("linux"), name="bench")


def provision_loops() -> dict[str, str]:
    """rloop and uringcore in the bench venv, each on its own (kept there once installed:
    the venv is remade, without them, only when the ``bench`` extra changes).  Returns the
    loops that cannot be used, with why: their rows are left out of the run, which goes on.
    """
    python = str(VENV / "bin" / "python")
    unusable = {}
    for name, requirement in NATIVE_LOOPS.items():
        probe = [python, "-c", f"import {name}"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            continue
        say(f"installing {requirement} into {VENV.relative_to(ROOT)}")
        install = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
            capture_output=True,
            text=True,
        )
        imported = subprocess.run(probe, capture_output=True, text=True)
        if imported.returncode != 0:
            said = (install.stderr or imported.stderr).strip().splitlines()
            unusable[name] = f"{requirement} unusable: {said[-1] if said else 'no output'}"
    return unusable


def loop_versions() -> dict[str, str]:
    """Installed versions of the native loop packages, for machine.json."""
    names = ["uvloop", *NATIVE_LOOPS]
    script = (
        "import importlib.metadata as m\n"
        f"for n in {names!r}:\n"
        "    try: print(n, m.version(n))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script], capture_output=True, text=True
    ).stdout
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


# -- running servers ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prepare(cpus: set[int]) -> Callable[[], None]:
    """In the child: pin to *cpus*, and allow as many descriptors as the hard limit (10,000
    idle connections need more than a common soft limit of 1,024)."""

    def prepare() -> None:
        import resource  # Unix only; this module is imported by tests on Windows too

        os.sched_setaffinity(0, cpus)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return prepare


def _argv(
    server: Server, port: int, control_port: int | None = None
) -> tuple[list[str], dict[str, str] | None]:
    kind, *rest = [part.replace("{port}", str(port)) for part in server.command]
    if control_port is not None:
        if kind not in ("py", "native-py"):
            raise ValueError(f"{server.name} is not Python: its calls cannot be counted")
        rest = [CALLCOUNT, "--control-port", str(control_port), *rest]
    if kind == "py":
        return [sys.executable, str(ROOT / "tools" / "winpy.py"), "--python", "3.13", *rest], None
    if kind == "exe":
        return [str(winpy.WINE), *rest], winpy.wine_environment()
    if kind == "native-py":
        return [str(VENV / "bin" / "python"), *rest], None
    return rest, None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _rss_kib(pid: int) -> int:
    """Resident memory of the server's process tree (Wine's shared wineserver excluded)."""
    total = 0
    for member in _descendants(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            if "wineserver" in Path(f"/proc/{member}/comm").read_text():
                continue
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def proxy_v1(sock: socket.socket) -> bytes:
    """The PROXY protocol v1 header a balancer would send on *sock*'s connection (the
    start-up probe of a server run with ``--proxy-protocol``; the load generator sends its
    own headers, ``-proxy``)."""
    source, destination = sock.getsockname(), sock.getpeername()
    family = "TCP6" if sock.family == socket.AF_INET6 else "TCP4"
    line = f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


class Lines:
    """A child's output read on a thread: the first and the last *keep* lines kept, every
    line counted, and (with *follow*) each line handed to :meth:`next`.  Draining the pipe
    matters: a server that logs more than a pipe holds would otherwise block."""

    def __init__(self, stream: IO[bytes], keep: int = 0, follow: bool = False) -> None:
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0
        self._keep, self._follow = keep, follow
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self.count += 1
            if len(self.head) < self._keep:
                self.head.append(line[:200])
            self.tail.append(line[:300])
            if self._follow:
                self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line (None at end of output); TimeoutError after *timeout* seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output for {timeout} s") from None

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Running:
    """A started server, listening and answering; ``control_port`` wraps it in callcount.py."""

    def __init__(
        self, server: Server, control_port: int | None = None, cpus: set[int] = SERVER_CPU
    ) -> None:
        self.server = server
        self.port = _free_port()
        argv, env = _argv(server, self.port, control_port)
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_prepare(cpus),
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = Lines(self.process.stdout, keep=5)
        self.stderr = Lines(self.process.stderr, keep=5)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                self.stderr.join(5)
                raise RuntimeError(
                    f"{server.name} exited with {self.process.returncode}: "
                    + " / ".join(self.stderr.head)
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
                    probe.sendall(proxy_v1(probe) + b"x" if server.proxy else b"x")
                    if probe.recv(1) == b"x":
                        break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._kill()
                    self.stderr.join(5)
                    raise RuntimeError(
                        f"{server.name} did not answer within 60 s ({exc}): "
                        + " / ".join(self.stderr.head)
                    ) from None
                time.sleep(0.1)

    def log(self) -> dict[str, Any]:
        """The server's first output lines so far (stdout, then stderr; callcount.py's own
        line left out) and how many it wrote.  Taken before stopping it, so that what it
        prints when interrupted is not mistaken for start-up lines."""
        head = [
            line
            for line in self.stdout.head + self.stderr.head
            if not line.startswith("callcount: ")
        ]
        return {
            "server_log": head,
            "server_log_lines": self.stdout.count + self.stderr.count,
        }

    def stop(self) -> None:
        if self.server.graceful:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self._kill()
        else:
            self._kill()
        self.stdout.join(5)
        self.stderr.join(5)

    def _kill(self) -> None:
        for pid in reversed(_descendants(self.process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.process.wait(15)


def loadgen(port: int, *args: str, cpus: set[int] = CLIENT_CPU) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / "loadgen"), "-addr", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_prepare(cpus),
        check=True,
    )
    raw: dict[str, Any] = json.loads(result.stdout)
    return raw


def _loadgen_process(port: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "loadgen"), "-addr", f"127.0.0.1:{port}", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_prepare(CLIENT_CPU),
    )


def _finish(process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    """Let a held load generator go (its stdin closes) and wait; kill it if it hangs."""
    assert process.stdin is not None
    try:
        process.stdin.close()
        process.wait(timeout)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait(15)


def _ready_count(line: str | None) -> int:
    """The N of the load generator's ``READY N`` line (0 for anything else)."""
    if line is None or not line.startswith("READY"):
        return 0
    return int(line.split()[1])


class ThrowawayFailed(RuntimeError):
    """A server that failed every connection of its throwaway session (or answered nothing):
    it is not measured further, in this round or later ones."""


def throwaway(running: Running, plan: Plan) -> None:
    """The same first session for every server: connect, echo, disconnect.  Raises
    :class:`ThrowawayFailed` if every connection failed or nothing was answered."""
    throwaway_at(
        running.port,
        plan,
        running.server.name,
        lambda: _said(running.stderr.tail),
        proxy="v2" if running.server.proxy else "",
    )


def throwaway_at(
    port: int, plan: Plan, name: str, said: Callable[[], str], proxy: str = ""
) -> None:
    """:func:`throwaway` on *port* (a server's, or a balancer's in front of servers), each
    connection opening with a PROXY header of version *proxy* ("v1", "v2"; "": none);
    *said* gives the last lines of what serves it, for the error."""
    raw = loadgen(
        port,
        "-mode",
        "echo",
        "-conns",
        str(THROWAWAY_CONNS),
        "-size",
        "1024",
        "-duration",
        str(plan.throwaway),
        "-warmup",
        "0",
        *(("-proxy", proxy) if proxy else ()),
    )
    if raw["failures"]:
        say(f"{name}: {raw['failures']} failure(s) in the throwaway session")
    if not raw["requests"] or raw["failures"] >= THROWAWAY_CONNS:
        time.sleep(SETTLE)  # the server's last words
        raise ThrowawayFailed(
            f"failed its throwaway session ({raw['requests']} requests answered, "
            f"{raw['failures']} failures on {THROWAWAY_CONNS} connections); "
            f"it said: {said()}"
        )


def measure_echo(running: Running, plan: Plan, size: int, conns: int) -> dict[str, Any]:
    """Throughput and latency, and the server's resident memory while the point runs: its
    peak over what it held just before, per connection (memory per *busy* connection)."""
    before = _rss_kib(running.process.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _rss_kib(running.process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        raw = loadgen(
            running.port,
            "-mode",
            "echo",
            "-conns",
            str(conns),
            "-size",
            str(size),
            "-duration",
            str(plan.duration),
            "-warmup",
            str(plan.warmup),
        )
    finally:
        done.set()
        sampler.join()
    return {
        "mode": "echo",
        "msg_size": size,
        "concurrency": conns,
        "busy_rss_kib_per_conn": (peak[0] - before) / conns,
        **stats.summarize(raw),
    }


def measure_churn(running: Running, plan: Plan) -> dict[str, Any]:
    raw = loadgen(
        running.port,
        "-mode",
        "churn",
        "-conns",
        str(plan.churn_workers),
        "-size",
        "64",
        "-duration",
        str(plan.duration),
        "-warmup",
        str(plan.warmup),
    )
    return {
        "mode": "churn",
        "msg_size": 64,
        "concurrency": plan.churn_workers,
        **stats.summarize(raw),
    }


def measure_idle(running: Running, count: int) -> dict[str, Any]:
    """Resident memory per idle connection over the fresh server's own baseline."""
    time.sleep(SETTLE)  # let the server finish starting before taking its baseline
    before = _rss_kib(running.process.pid)
    process = _loadgen_process(running.port, "-mode", "idle", "-conns", str(count))
    assert process.stderr is not None
    try:
        opened = _ready_count(Lines(process.stderr, follow=True).next(timeout=600))
        time.sleep(1.0)  # let the server settle its buffers after the last echo
        after = _rss_kib(running.process.pid)
    finally:
        _finish(process)
    return {
        "mode": "idle",
        "concurrency": count,
        "msg_size": 1,
        "rss_kib_per_conn": (after - before) / opened if opened else None,
        "rss_base_kib": before,
        "rss_kib": after,
        "failures": count - opened,
    }


def measure_calls(running: Running, control_port: int, plan: Plan) -> dict[str, Any]:
    """Python calls per echo: a profiling window around exactly ``calls_conns`` x
    ``calls_requests`` echoes of 1 KiB, after the throughput runs' warm-up."""
    conns, per = plan.calls_conns, plan.calls_requests
    process = _loadgen_process(
        running.port,
        "-mode",
        "count",
        "-conns",
        str(conns),
        "-size",
        "1024",
        "-requests",
        str(per),
        "-warmup",
        str(plan.warmup),
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        opened = _ready_count(Lines(process.stderr, follow=True).next(timeout=300))
        result = Lines(process.stdout, follow=True)
        time.sleep(SETTLE)  # the warm-up's last send completions, outside the window
        control = socket.create_connection(("127.0.0.1", control_port), timeout=60)
        with control, control.makefile("rwb", buffering=0) as stream:
            stream.write(b"start\n")
            if stream.readline().strip() != b"started":
                raise RuntimeError(f"{running.server.name}: callcount did not start")
            process.stdin.write(b"go\n")
            process.stdin.flush()
            line = result.next(timeout=600)
            if line is None:
                raise RuntimeError(f"{running.server.name}: the load generator gave no result")
            raw = json.loads(line)
            time.sleep(SETTLE)  # the last echoes' send completions, inside the window
            stream.write(b"stop\n")
            window = json.loads(stream.readline())
        if "error" in window:
            raise RuntimeError(f"{running.server.name}: callcount: {window['error']}")
    finally:
        _finish(process)
    echoes = int(raw["requests"])
    return {
        "mode": "calls",
        "msg_size": 1024,
        "concurrency": conns,
        **stats.calls_per_echo(window, echoes),
        "failures": raw["failures"],
        "connections": opened,
        "profiled_rps": echoes / raw["elapsed"] if raw["elapsed"] else None,
        "profile_method": window["method"],
    }


# -- the matrix ----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    sizes: list[int]
    concurrencies: list[int]
    #: Points measured in every round (the others only in the first).
    headline: list[Point]
    duration: float
    warmup: float
    #: Rounds, alternating the server order: headline points and churn are medians of this
    #: many runs.
    repeats: int
    churn_workers: int
    #: Connections held for the idle-memory measurement, per platform.
    idle_counts: dict[str, list[int]]
    calls_conns: int
    calls_requests: int  # per connection
    throwaway: float  # seconds of the throwaway first session
    #: The points of the loop rows (streams, protocol, client): all in the first round, those
    #: among ``headline`` in every round.
    loop_points: list[Point]
    #: Round trips each client point makes in all, per platform, for messages up to 8 KiB
    #: (fewer for larger ones: see :func:`client_requests`).  A fixed count, the same for
    #: every loop.
    client_requests: dict[str, int]
    #: proxy-churn (``scaleout.py``): passes per round over plain, v2 and v1 churn windows.
    proxy_churn_pairs: int = 2


QUICK = Plan(
    sizes=[1024],
    concurrencies=[20],
    headline=[(1024, 20)],
    duration=2.0,
    warmup=0.5,
    repeats=1,
    churn_workers=20,
    idle_counts={"wine": [1000], "linux": [1000]},
    calls_conns=20,
    calls_requests=100,
    throwaway=1.0,
    loop_points=[(1024, 20)],
    client_requests={"linux": 20000, "wine": 4000},
)
FULL = Plan(
    sizes=[64, 1024, 16384, 65536],
    concurrencies=[1, 20, 100, 1000],
    headline=[(1024, 20), (1024, 1000)],
    duration=2.5,
    warmup=0.5,
    repeats=3,
    churn_workers=20,
    idle_counts={"wine": [5000], "linux": [10000]},
    calls_conns=20,
    calls_requests=500,
    throwaway=1.0,
    loop_points=[(1024, 20), (1024, 1000), (65536, 20)],
    client_requests={"linux": 80000, "wine": 16000},
)


def echo_points(server: Server, plan: Plan, first_round: bool) -> list[Point]:
    """The echo points *server* is measured at in a round, in the plan's order."""
    grid = [(size, conns) for size in plan.sizes for conns in plan.concurrencies]
    chosen = grid if first_round else [point for point in grid if point in plan.headline]
    return [p for p in chosen if server.points is None or p in server.points]


def loop_points(plan: Plan, first_round: bool) -> list[Point]:
    """The loop rows' points in a round, in the plan's order."""
    return [p for p in plan.loop_points if first_round or p in plan.headline]


def client_requests(plan: Plan, platform_name: str, size: int, conns: int) -> int:
    """Round trips a client point makes in all: the plan's count up to 8 KiB messages, a
    proportional share above (64 KiB: an eighth), at least one per connection."""
    return max(conns, plan.client_requests[platform_name] * 8192 // max(size, 8192))


def _line(server: Server, what: str) -> str:
    return f"{server.name:<27} {server.runtime:<10} {what}"


def run_server(
    server: Server,
    plan: Plan,
    modes: Iterable[str],
    first_round: bool,
    errors: list[str] | None = None,
    broken: set[tuple[str, str, str]] | None = None,
) -> list[dict[str, Any]]:
    """One server's share of one round (a loop's rows: :func:`run_loop`, whose failures go
    to *errors* and *broken*)."""
    modes = set(modes) & server.modes
    if server.modes <= LOOP_MODES:
        return run_loop(
            server,
            plan,
            modes,
            first_round,
            [] if errors is None else errors,
            set() if broken is None else broken,
        )
    records: list[dict[str, Any]] = []
    base = {
        "server": server.name,
        "runtime": server.runtime,
        "platform": server.platform,
        "role": server.role,
    }
    # The throughput session first: a server that fails its throwaway session
    # (ThrowawayFailed) costs no idle or calls session either.
    points = echo_points(server, plan, first_round) if "echo" in modes else []
    if points or modes & {"churn", CEILING}:
        records += echo_session(server, plan, modes, points, first_round, base)
    idle_counts = plan.idle_counts.get(server.platform, []) if "idle" in modes else []
    for count in idle_counts if first_round else []:
        # A fresh server each time: one that already served a load would reuse freed memory
        # for the idle connections, and the measured growth would read as zero.
        running = Running(server)
        try:
            record = base | measure_idle(running, count) | running.log()
        finally:
            running.stop()
        records.append(record)
        say(_line(server, f"idle {count}: {record['rss_kib_per_conn']} KiB/conn"))
    if first_round and "calls" in modes and server.python:
        control_port = _free_port()
        running = Running(server, control_port)
        try:
            throwaway(running, plan)
            record = base | measure_calls(running, control_port, plan) | running.log()
        finally:
            running.stop()
        records.append(record)
        say(
            _line(
                server,
                f"calls per echo: {record['py_calls_per_echo']:.1f} Python + "
                f"{record['c_calls_per_echo']:.1f} C ({record['echoes']} echoes)",
            )
        )
    return records


def echo_session(
    server: Server,
    plan: Plan,
    modes: set[str],
    points: list[Point],
    first_round: bool,
    base: dict[str, Any],
) -> list[dict[str, Any]]:
    """One server session: the throwaway session, the echo points, the ceiling points (Go's
    native echo), churn."""
    running = Running(server)
    session: list[dict[str, Any]] = []
    log: dict[str, Any] = {}
    try:
        throwaway(running, plan)
        for size, conns in points:
            record = base | measure_echo(running, plan, size, conns)
            say(
                _line(
                    server,
                    f"echo {size:>6} B x {conns:>4}: {record['rps']:>9.0f} req/s "
                    f"p99 {record['p99_us']} us (client {record['client_cpu']:.2f} cores)",
                )
            )
            session.append(record)
        for size, conns in loop_points(plan, first_round) if CEILING in modes else []:
            record = base | measure_echo(running, plan, size, conns) | {"mode": CEILING}
            record["role"] = "reference"
            say(_line(server, f"ceiling {size:>6} B x {conns:>4}: {record['rps']:>9.0f} req/s"))
            session.append(record)
        if "churn" in modes:
            record = base | measure_churn(running, plan)
            say(_line(server, f"churn: {record['rps']:.0f} conn/s"))
            session.append(record)
        log = running.log()
    finally:
        running.stop()
    return [record | log for record in session]


def run_loop(
    server: Server,
    plan: Plan,
    modes: set[str],
    first_round: bool,
    errors: list[str],
    broken: set[tuple[str, str, str]],
) -> list[dict[str, Any]]:
    """One loop's rows in one round, each mode in a session of its own: a loop that breaks
    in one mode (its error and the failed requests go to *errors*) keeps the others, and
    that mode is not tried again in later rounds (it is added to *broken*)."""
    base = {
        "server": server.name,
        "runtime": server.runtime,
        "platform": server.platform,
        "role": server.role,
        "loop": server.loop,
    }
    points = loop_points(plan, first_round)
    records: list[dict[str, Any]] = []
    for mode in ("protocol", "streams", "client"):
        if mode not in modes or (server.name, server.runtime, mode) in broken:
            continue
        what = f"{server.name} ({server.runtime}) {mode}"
        try:
            if mode == "client":
                session, said = measure_clients(server, plan, points)
            else:
                session, said = serve_on_loop(server, plan, mode, points)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            say(f"FAILED {what}: {exc}")
            errors.append(f"{what}: {exc}")
            broken.add((server.name, server.runtime, mode))
            continue
        failed = [r for r in session if r.get("failures")]
        if failed:
            where = ", ".join(
                f"{r['failures']} at {r['msg_size']} B x {r['concurrency']}" for r in failed
            )
            errors.append(f"{what}: failed requests or connections ({where}); it said: {said}")
            broken.add((server.name, server.runtime, mode))
        records += [base | r for r in session]
    return records


def _said(lines: Iterable[str]) -> str:
    """A program's last lines, for an error message (Wine's fixme noise left out)."""
    kept = [line for line in lines if line and ":fixme:" not in line and line[:6] != "fixme:"]
    return " / ".join(kept[-3:]) or "(nothing)"


def serve_on_loop(
    server: Server, plan: Plan, mode: str, points: list[Point]
) -> tuple[list[dict[str, Any]], str]:
    """The Protocol or streams echo on the server's loop, measured as every echo server is
    (the same throwaway session, warm-up and load generator).  Returns the records and the
    server's last lines."""
    command = server.command + (("--streams",) if mode == "streams" else ())
    running = Running(dataclasses.replace(server, command=command))
    session = []
    try:
        throwaway(running, plan)
        for size, conns in points:
            record = measure_echo(running, plan, size, conns) | {"mode": mode}
            say(
                _line(
                    server,
                    f"{mode} {size:>6} B x {conns:>4}: {record['rps']:>9.0f} req/s "
                    f"p99 {record['p99_us']} us (client {record['client_cpu']:.2f} cores)",
                )
            )
            session.append(record)
        log = running.log()
    finally:
        running.stop()
    return [r | log for r in session], _said(running.stderr.tail)


def measure_clients(
    server: Server, plan: Plan, points: list[Point]
) -> tuple[list[dict[str, Any]], str]:
    """``servers/pingpong.py`` on the server's loop, pinned where the servers run, against
    Go's native echo pinned to the load generator's core: round trips/s of the Python
    client, and the fixed server's CPU over each measuring window (it must stay well below
    a core for the client, not the server, to set the pace)."""
    fixed = Running(go_native(), cpus=CLIENT_CPU)
    command = loop_command(server.platform, "benchmarks/servers/pingpong.py", server.loop or "")
    command += ("--port", "{port}", "--throwaway", str(plan.throwaway))
    for size, conns in points:
        requests = client_requests(plan, server.platform, size, conns)
        command += ("--point", str(size), str(conns), str(requests))
    argv, env = _argv(dataclasses.replace(server, command=command), fixed.port)
    client = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_prepare(SERVER_CPU),
    )
    assert client.stdout is not None and client.stderr is not None
    results = Lines(client.stdout, follow=True)
    messages = Lines(client.stderr, keep=8, follow=True)
    session = []
    try:
        for size, conns in points:
            line = messages.next(timeout=300)  # Wine's start and the throwaway first
            while line is not None and not line.startswith("MEASURING"):
                line = messages.next(timeout=300)
            if line is None:
                client.wait(15)
                raise RuntimeError(
                    f"the client exited with {client.returncode}: {_said(messages.tail)}"
                )
            cpu, wall = _cpu_seconds(fixed.process.pid, False, set()), time.monotonic()
            out = results.next(timeout=600)
            while out is not None and not out.startswith("{"):
                out = results.next(timeout=600)
            if out is None:
                client.wait(15)
                raise RuntimeError(
                    f"the client exited with {client.returncode}: {_said(messages.tail)}"
                )
            cpu = _cpu_seconds(fixed.process.pid, False, set()) - cpu
            wall = time.monotonic() - wall
            record = {
                "mode": "client",
                "msg_size": size,
                "concurrency": conns,
                **stats.summarize(json.loads(out)),
                "server_cpu": cpu / wall if wall > 0 else None,
                "server_log": [m for m in messages.head if m.startswith("LOOP")],
            }
            say(
                _line(
                    server,
                    f"client {size:>6} B x {conns:>4}: {record['rps']:>9.0f} round trips/s "
                    f"p99 {record['p99_us']} us (Go server {record['server_cpu'] or 0:.2f} "
                    f"cores)",
                )
            )
            session.append(record)
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(15)
        fixed.stop()
    return session, _said(messages.tail)


#: Wine's own programs, started with the wineserver: not a user's.
WINE_SYSTEM = frozenset(
    {
        "conhost.exe",
        "explorer.exe",
        "plugplay.exe",
        "rpcss.exe",
        "services.exe",
        "start.exe",
        "svchost.exe",
        "wineboot.exe",
        "winedevice.exe",
        "winemenubuilder.exe",
    }
)


def wine_programs(proc: Path = Path("/proc")) -> list[str]:
    """The names of the programs running under Wine, and of a running wineserver: a Wine
    process's command line starts with its Windows program (``C:\\windows\\...\\services.exe``,
    or a Unix path ending in ``python.exe``)."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                program = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            name = program.decode(errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
            if name.lower().endswith(".exe") or name.startswith("wineserver"):
                found.append(name)
    return found


def wine_users(running: list[str]) -> list[str]:
    """The programs of *running* (:func:`wine_programs`) that are not Wine's own."""
    return sorted(
        {
            name
            for name in running
            if name.lower() not in WINE_SYSTEM and not name.startswith("wineserver")
        }
    )


def wineserver_note(running: list[str]) -> str:
    """What the run does with Wine's server, given what runs under Wine (:func:`wine_programs`):
    one already running is shared by every Wine program of the prefix (the tests' too, which
    start and stop Wine programs all the time), so it is left alone, unpinned, and the report
    says so; otherwise the run's first server starts it, pinned with the servers."""
    if not running:
        return "started by the run, pinned with the servers"
    users = wine_users(running)
    return (
        "already running at the start (shared"
        + (f" with {', '.join(users)}" if users else " with Wine's own programs")
        + "): used as it was, not restarted, not pinned with the servers"
    )


def _wine_workers() -> set[int]:
    """Unix pids of running Wine worker processes: Wine starts a Windows child process
    detached (its Unix parent is init), so workers are not the server's descendants."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"_workers_child" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _cpu_seconds(pid: int, wine: bool, foreign: set[int]) -> float:
    """CPU time used so far by the server's processes: its process tree, and under Wine its
    worker processes (those not in *foreign*, the ones running before it started) and the
    wineserver, which does the socket work of every Wine process."""
    members = set(_descendants(pid))
    if wine:
        members |= _wine_workers() - foreign
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "comm").read_text().startswith("wineserver"):
                        members.add(int(entry.name))
                except OSError:
                    continue
    ticks = 0
    for member in members:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def workers_server(platform_name: str, count: int) -> Server:
    """iocp_echo with *count* worker processes (1: the default, one process serving)."""
    kind = "py" if platform_name == "wine" else "native-py"
    return Server(
        f"iocp_echo --workers {count}",
        "wine-3.13" if platform_name == "wine" else "linux-3.13",
        platform_name,
        (kind, "examples/echo.py", "--port", "{port}", "--workers", str(count)),
        role="ours",
        modes=EXTRA_MODES,
    )


def run_workers_round(plan: Plan, platforms: list[str], repeat: int) -> list[dict[str, Any]]:
    """One round of the workers run: 1 vs 2 workers at WORKER_POINTS on each platform.

    Server and load generator share both cores here, so the 2-worker figure is bounded by
    the machine, not by the server; the server's CPU time over each session gives req/s
    per server core, the figure that projects to a machine with more cores.
    """
    every_cpu = set(range(os.cpu_count() or 1))
    records = []
    counts = WORKER_COUNTS if repeat % 2 == 0 else tuple(reversed(WORKER_COUNTS))
    for platform_name in platforms:
        for count in counts:
            server = workers_server(platform_name, count)
            foreign = _wine_workers()
            running = Running(server, cpus=every_cpu)
            try:
                throwaway(running, plan)
                for size, conns in WORKER_POINTS:
                    cpu_before, wall_before = (
                        _cpu_seconds(running.process.pid, platform_name == "wine", foreign),
                        time.monotonic(),
                    )
                    raw = loadgen(
                        running.port,
                        "-mode",
                        "echo",
                        "-conns",
                        str(conns),
                        "-size",
                        str(size),
                        "-duration",
                        str(plan.duration),
                        "-warmup",
                        str(plan.warmup),
                        cpus=every_cpu,
                    )
                    wall = time.monotonic() - wall_before
                    cpu = (
                        _cpu_seconds(running.process.pid, platform_name == "wine", foreign)
                        - cpu_before
                    )
                    summary = stats.summarize(raw)
                    cores = cpu / wall if wall > 0 else None
                    record = {
                        "server": server.name,
                        "runtime": server.runtime,
                        "platform": platform_name,
                        "role": "ours",
                        "mode": "workers",
                        "workers": count,
                        "msg_size": size,
                        "concurrency": conns,
                        **summary,
                        "server_cores": cores,
                        "rps_per_server_core": summary["rps"] / cores if cores else None,
                    }
                    say(
                        _line(
                            server,
                            f"workers {size} B x {conns}: {record['rps']:.0f} req/s, server "
                            f"{cores or 0:.2f} cores, client {record['client_cpu']:.2f} cores",
                        )
                    )
                    records.append(record)
                records = [r | running.log() for r in records]
            finally:
                running.stop()
    return records


def merge_repeats(raw_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per server x runtime x mode x size x connections (x setup, for the rows of
    ``scaleout.py``): the median of its runs."""
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in raw_records:
        key = (
            record["server"],
            record["runtime"],
            record["mode"],
            record["msg_size"],
            record["concurrency"],
            record.get("setup"),
        )
        grouped.setdefault(key, []).append(record)
    extra = {"workers": WORKER_NUMERIC, BALANCED: SCALEOUT_NUMERIC, PROXY_CHURN: SCALEOUT_NUMERIC}
    return [
        stats.median_record(group, NUMERIC + extra.get(group[0]["mode"], ()))
        for group in grouped.values()
    ]


def choose(
    listed: list[Server],
    names: set[str] | None,
    platform_name: str | None,
    modes: set[str],
    unusable: dict[str, str],
) -> tuple[list[Server], list[str]]:
    """The servers a run measures (by ``--only`` and ``--platform``), and one note for each
    loop left out because it cannot be used (``provision_loops``).  Whenever a loop mode
    runs, Go's native echo is measured at the loop points too (the ceiling that shows the
    load generator's headroom), whatever ``--only`` and ``--platform`` say."""
    chosen, notes = [], {}
    for server in listed:
        if names is not None and server.name not in names:
            continue
        if platform_name is not None and server.platform != platform_name:
            continue
        if server.loop in unusable:
            if modes & server.modes:
                notes[server.loop] = (
                    f"{server.loop}: {unusable[server.loop]}; its rows are left out of this run"
                )
            continue
        chosen.append(server)
    if modes & LOOP_MODES and not any(CEILING in server.modes for server in chosen):
        chosen.append(go_native(frozenset({CEILING})))
    return chosen, list(notes.values())


def keep_unmeasured(
    kept: list[dict[str, Any]], chosen: list[Server], modes: set[str]
) -> list[dict[str, Any]]:
    """The records of an earlier run that a partial run (fewer servers or modes) did not
    re-measure."""
    covered = {(s.name, s.runtime, mode) for s in chosen for mode in modes & s.modes}
    return [r for r in kept if (r["server"], r["runtime"], r["mode"]) not in covered]


def extra_platforms(
    modes: set[str], names: set[str] | None, platform_name: str | None
) -> dict[str, list[str]]:
    """The platforms on which each mode of :data:`OWN_RUN_MODES` (workers, balanced,
    proxy-churn) is measured, by ``--modes``, ``--only`` and ``--platform``.  The balanced
    rows are native only."""
    if names is not None and not names & {"iocp_echo"}:
        return {}
    chosen = {}
    for mode in sorted(modes & OWN_RUN_MODES):
        where = [
            name
            for name, _, _ in report.PLATFORMS
            if platform_name in (None, name) and (mode != BALANCED or name == "linux")
        ]
        if where:
            chosen[mode] = where
    return chosen


def drop_remeasured(
    kept: list[dict[str, Any]], remeasured: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The records of an earlier run left once this run's own-run modes (*remeasured*: mode
    -> platforms, :func:`extra_platforms`) replace theirs."""
    return [r for r in kept if r["platform"] not in remeasured.get(r["mode"], ())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: about 4 minutes")
    parser.add_argument("--repeats", type=int, help="override the number of rounds")
    parser.add_argument(
        "--only",
        help="comma-separated server names (iocp_echo, asyncio-proactor-protocol, ..., "
        "raw_iocp_echo, raw_uring_echo)",
    )
    parser.add_argument("--platform", choices=["wine", "linux"], help="one platform only")
    parser.add_argument(
        "--modes",
        default=",".join(sorted(ALL_MODES)),
        help="comma-separated modes to run: echo, churn, idle, calls, streams, protocol, client, "
        "balanced (2 instances behind HAProxy vs 1 direct, natively), proxy-churn (churn with "
        "and without a PROXY header) (default: all nine), and workers (1 vs 2 worker "
        "processes, only when named); a run replaces only the records it re-measures in the "
        "results folder",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default: benchmarks/results, or results/quick with --quick)",
    )
    options = parser.parse_args(argv)
    from . import scaleout  # it imports this module: only once this one is loaded

    plan = dataclasses.replace(QUICK if options.quick else FULL)
    if options.repeats:
        plan.repeats = options.repeats
    modes = set(options.modes.split(","))
    if modes - ALL_MODES - EXTRA_MODES:
        parser.error(f"unknown mode(s): {', '.join(sorted(modes - ALL_MODES - EXTRA_MODES))}")
    provision()
    unusable = provision_loops()
    running = wine_programs()
    deadline = time.monotonic() + 20
    while running and not wine_users(running) and time.monotonic() < deadline:
        time.sleep(0.5)  # one that served only provisioning: it exits once idle a few seconds
        running = wine_programs()
    wineserver = wineserver_note(running)
    say(f"wineserver: {wineserver}")
    names = set(options.only.split(",")) if options.only else None
    chosen, left_out = choose(servers(), names, options.platform, modes, unusable)
    remeasured = extra_platforms(modes, names, options.platform)
    if not chosen and not remeasured:
        parser.error("no server matches --only/--platform")
    worker_platforms = remeasured.get("workers", [])
    partial = modes != ALL_MODES or names is not None or options.platform is not None
    if modes & LOOP_MODES:
        modes.add(CEILING)
    started = time.monotonic()
    run_id = time.strftime("%Y-%m-%d %H:%M")
    raw_records: list[dict[str, Any]] = []
    errors: list[str] = list(left_out)
    broken: set[tuple[str, str, str]] = set()  # loop rows that failed: not tried again
    dead: list[Server] = []  # servers that failed their throwaway session: not tried again
    for note in left_out:
        say(f"LEFT OUT {note}")
    for repeat in range(plan.repeats):
        order = chosen if repeat % 2 == 0 else list(reversed(chosen))
        for server in order:
            if server in dead:
                continue
            try:
                failed: list[str] = []
                raw_records.extend(run_server(server, plan, modes, repeat == 0, failed, broken))
                errors += [f"{error}, round {repeat + 1}" for error in failed]
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                # One server that fails must not cost the whole run: the report lists it.
                error = f"{server.name} ({server.runtime}), round {repeat + 1}: {exc}"
                if isinstance(exc, ThrowawayFailed):
                    dead.append(server)
                    error += " (not tried again)"
                say(f"FAILED {error}")
                errors.append(error)
        if worker_platforms:
            try:
                raw_records.extend(run_workers_round(plan, worker_platforms, repeat))
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                error = f"workers run, round {repeat + 1}: {exc}"
                say(f"FAILED {error}")
                errors.append(error)
        if BALANCED in remeasured:
            try:
                measured_now, failed = scaleout.run_balanced_round(plan, repeat)
                raw_records += measured_now
                errors += failed
            except RuntimeError as exc:  # no HAProxy here: said once, not tried again
                say(f"FAILED {exc}")
                errors.append(str(exc))
                del remeasured[BALANCED]
        if PROXY_CHURN in remeasured:
            measured_now, failed = scaleout.run_proxy_churn_round(
                plan, remeasured[PROXY_CHURN], repeat
            )
            raw_records += measured_now
            errors += failed
    records = [r | {"run": run_id} for r in merge_repeats(raw_records)]
    measured = sorted({f"{r['server']} ({r['runtime']})" for r in records})
    # A smoke run must not overwrite the committed results of a full one.
    results = options.out or (RESULTS / "quick" if options.quick else RESULTS)
    if (results / "latest.json").exists():
        kept = drop_remeasured(json.loads((results / "latest.json").read_text()), remeasured)
        if partial:
            records = keep_unmeasured(kept, chosen, modes) + records
        else:  # a full run keeps only the rows of the modes it never runs
            records = [r for r in kept if r["mode"] in EXTRA_MODES - modes] + records
    machine = {
        "cpus": os.cpu_count(),
        "cpu": report.cpu_model(),
        "kernel": platform.release(),
        "wine": report.wine_version(),
        "linux_python": report.venv_python_version(VENV),
        "plan": dataclasses.asdict(plan),
        "quick": options.quick,
        "ceilings": ceilings_note(),
        "loops": loop_versions(),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
        "run": run_id,
        "errors": errors,
        "wineserver": wineserver,
    }
    if partial and (results / "machine.json").exists():
        rerun = {k: machine[k] for k in ("minutes", "date", "run", "errors", "wineserver")} | {
            "modes": sorted(modes),
            "servers": measured,  # what this run measured (a workers run: iocp_echo only)
        }
        machine = json.loads((results / "machine.json").read_text()) | {"rerun": rerun}
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(json.dumps(records, indent=1) + "\n")
    (results / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
    (results / "latest.md").write_text(report.markdown(records, machine))
    charts = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "benchmarks.charts", str(results)], cwd=ROOT
    )
    if charts.returncode != 0:
        say("charts failed (matplotlib missing?)")
    print((results / "latest.md").read_text())
    return 0
