"""Issue 15's rows: iocp_echo behind a real HAProxy, and what a PROXY protocol header costs.

``balanced`` (natively): two iocp_echo instances (``python -m iocp_echo --proxy-protocol``,
each with an admin port for HAProxy's ``/readyz`` check) behind Debian's HAProxy running
``examples/haproxy.cfg`` itself (``send-proxy-v2``, round robin; the file's third server gets
weight 0), beside one instance reached directly (no balancer, no PROXY header), and beside Go's
native echo reached directly (what the load generator can drive).  At 1 KiB x 100 and
1 KiB x 1,000 connections, each setup on freshly started processes with the same throwaway
session and warm-up as every echo server of the suite, the order alternating from round to
round.  Pinning: every iocp_echo instance on the server core and the load generator on its own
core, as in the rest of the suite, so the instances behind HAProxy share the one core a direct
instance has; HAProxy is not pinned (the kernel runs its threads where it likes).  Its CPU time
is measured, not hidden: on a 2-core machine it takes CPU from the servers or the load
generator, and the report says how much.

``proxy-churn`` (natively and under Wine): connection churn (a new connection per 64-byte
request, as the ``churn`` mode) against one instance started with ``--proxy-protocol``, the
load generator opening each connection with a PROXY v2 header (and, in other rows, v1, and v2
in the same write as the request), and against the same server started without it, with plain
churn.  Both servers run at once, each after its throwaway session, and the measuring windows
alternate between them (plain, v2, v1, v2-joined, then back), so that neither is measured on
a warmer or a quieter machine.  Besides the rates, the server's own CPU time per connection
over each window: natively the load generator and the kernel set much of the churn rate (Go's
own echo churns at about the same rate), so the server's CPU per connection is the figure that
shows what the header costs the server.

Both modes measure CPU over exactly the load generator's window: it prints ``MEASURING`` and
``MEASURED`` on stderr (``loadgen/main.go``), and the processes' CPU time is read from
``/proc`` at each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from . import stats
from .run import (
    BALANCED,
    BIN,
    CLIENT_CPU,
    PROXY_CHURN,
    ROOT,
    SERVER_CPU,
    Lines,
    Plan,
    Point,
    Running,
    Server,
    _cpu_seconds,
    _free_port,
    _prepare,
    _said,
    go_native,
    say,
    throwaway_at,
)

#: The points of the balanced rows (issue 15: 1 KiB x 100 and x 1,000 through HAProxy).
BALANCED_POINTS: tuple[Point, ...] = ((1024, 100), (1024, 1000))
#: Instances behind HAProxy; ``examples/haproxy.cfg`` names three servers, the ones beyond
#: these get weight 0 (checked, sent nothing).
INSTANCES = 2
CONFIG_SERVERS = 3
CONFIG = ROOT / "examples" / "haproxy.cfg"
#: The backend of ``examples/haproxy.cfg`` (its servers: echo1, echo2, echo3).
BACKEND = "iocp_echo"
#: The setups of the balanced rows, in a round's order (the next round reverses it).
SETUPS = ("direct", "haproxy", "go")
#: The rows of the churn comparison: no header (a server without ``--proxy-protocol``), and
#: each header version (the server with it), sent in a write of its own as a balancer does
#: when it connects before the client has sent anything; and v2 sent in the same write as the
#: first request (``v2-joined``), which tells the header's parsing from the extra receive its
#: own segment costs.  A round's windows run in this order, then back.
HEADERS = ("plain", "v2", "v1", "v2-joined")
#: What the instances log at: start-up lines, nothing per connection.
LOG_LEVEL = "INFO"


def instance(platform_name: str, *, proxy: bool, admin_port: int | None = None) -> Server:
    """iocp_echo's CLI as a user runs it: ``python -m iocp_echo`` natively, ``examples/echo.py``
    (the same CLI from the checkout) under Wine."""
    if platform_name == "wine":
        command: tuple[str, ...] = ("py", "examples/echo.py")
    else:
        command = ("native-py", "-m", "iocp_echo")
    command += ("--port", "{port}", "--log-level", LOG_LEVEL)
    if admin_port is not None:
        command += ("--admin-port", str(admin_port))
    if proxy:
        command += ("--proxy-protocol",)
    return Server(
        "iocp_echo",
        "wine-3.13" if platform_name == "wine" else "linux-3.13",
        platform_name,
        command,
        role="ours",
        modes=frozenset({BALANCED, PROXY_CHURN}),
        proxy=proxy,
    )


# -- measuring ------------------------------------------------------------------------------


Meter = Callable[[], float]


def measure_window(
    port: int, args: Sequence[str], meters: Mapping[str, Meter]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the load generator against *port* (pinned to its core) and read each meter (CPU
    seconds used so far by some processes) as its measuring window opens and closes.

    Returns the load generator's raw result and, per meter, the cores used over the window,
    with the whole machine's (``machine_cpu``).
    """
    meters = {**meters, "machine_cpu": machine_cpu}
    process = subprocess.Popen(
        [str(BIN / "loadgen"), "-addr", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_prepare(CLIENT_CPU),
    )
    assert process.stdout is not None and process.stderr is not None
    messages = Lines(process.stderr, keep=5, follow=True)
    results = Lines(process.stdout, follow=True)
    try:
        before, opened = _read_at(messages, "MEASURING", meters)
        after, closed = _read_at(messages, "MEASURED", meters)
        line = results.next(timeout=120)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(15)
    if process.returncode != 0 or line is None:
        raise RuntimeError(
            f"the load generator exited with {process.returncode}: {_said(messages.tail)}"
        )
    wall = closed - opened
    cores = {name: (after[name] - before[name]) / wall for name in meters} if wall > 0 else {}
    raw: dict[str, Any] = json.loads(line)
    return raw, cores


def _read_at(
    messages: Lines, marker: str, meters: Mapping[str, Meter]
) -> tuple[dict[str, float], float]:
    """Wait for the load generator's *marker* line; then read every meter and the clock."""
    line = messages.next(timeout=300)  # dialing 1,000 connections comes first
    while line is not None and line != marker:
        line = messages.next(timeout=300)
    if line is None:
        raise RuntimeError(f"the load generator ended before {marker}: {_said(messages.tail)}")
    return {name: meter() for name, meter in meters.items()}, time.monotonic()


def machine_cpu() -> float:
    """CPU seconds every process of the machine has used so far (``/proc/stat``: all but
    idle and I/O wait), to tell how much of a window went to processes not measured."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def other_cpu(cores: Mapping[str, float | None]) -> float | None:
    """Cores that processes other than the measured ones (server, HAProxy, load generator)
    used over a window: the machine's total less theirs; None without the total."""
    total = cores.get("machine_cpu")
    if total is None:
        return None
    measured = ("server_cpu", "haproxy_cpu", "client_cpu")
    return max(0.0, total - sum(cores.get(name) or 0.0 for name in measured))


def cpu_meter(*processes: subprocess.Popen[bytes], wine: bool = False) -> Meter:
    """CPU seconds used so far by *processes* and their children (under Wine, with the
    wineserver, which does every Wine process's socket work)."""
    return lambda: sum(_cpu_seconds(p.pid, wine, set()) for p in processes)


def admin_stats(admin_port: int) -> dict[str, Any]:
    """An instance's counters from its admin endpoint (no pending operations listed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/?limit=0", timeout=30) as reply:
        document: dict[str, Any] = json.load(reply)
    stats_: dict[str, Any] = document["stats"]
    return stats_


def shares(before: Sequence[int], after: Sequence[int]) -> list[float]:
    """Each instance's share of the bytes all of them sent between two readings (empty when
    none sent anything)."""
    sent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(sent)
    return [s / total for s in sent] if total > 0 else []


# -- HAProxy ----------------------------------------------------------------------------------


def haproxy_environment(
    bind_port: int, instances: Sequence[tuple[int, int]], stats_socket: Path
) -> dict[str, str]:
    """``examples/haproxy.cfg``'s variables for *instances* (echo port, admin port): each of
    the file's servers beyond them repeats the last instance with weight 0, so that its health
    check passes and it is sent nothing."""
    if not 0 < len(instances) <= CONFIG_SERVERS:
        raise ValueError(f"examples/haproxy.cfg has room for 1 to {CONFIG_SERVERS} instances")
    env = {
        "IOCP_ECHO_BIND": f"127.0.0.1:{bind_port}",
        "IOCP_ECHO_STATS_SOCKET": str(stats_socket),
    }
    for number in range(1, CONFIG_SERVERS + 1):
        port, admin = instances[min(number, len(instances)) - 1]
        env[f"IOCP_ECHO_SERVER{number}"] = f"127.0.0.1:{port}"
        env[f"IOCP_ECHO_ADMIN{number}"] = str(admin)
        env[f"IOCP_ECHO_WEIGHT{number}"] = "1" if number <= len(instances) else "0"
    return env


def parse_show_stat(text: str, backend: str = BACKEND) -> dict[str, dict[str, str]]:
    """The servers of *backend* in the runtime API's ``show stat`` answer (CSV whose header
    line starts with ``# ``), by server name: each row as a column -> value mapping."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not a 'show stat' answer: {text[:200]!r}")
    columns = lines[0][2:].split(",")
    servers = {}
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
            servers[row["svname"]] = row
    return servers


def ask(stats_socket: Path, command: str) -> str:
    """One command to HAProxy's runtime API; its whole answer."""
    with socket.socket(socket.AF_UNIX) as api:
        api.settimeout(10)
        api.connect(str(stats_socket))
        api.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := api.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class Balancer:
    """HAProxy in the foreground on ``examples/haproxy.cfg``, in front of *instances* (echo
    port, admin port), not pinned; started once every instance it is given is UP."""

    def __init__(self, executable: str, instances: Sequence[tuple[int, int]], folder: Path):
        self.port = _free_port()
        self.stats_socket = folder / "haproxy.sock"
        env = dict(os.environ) | haproxy_environment(self.port, instances, self.stats_socket)
        every_cpu = set(range(os.cpu_count() or 1))
        self.process = subprocess.Popen(
            [executable, "-db", "-f", str(CONFIG)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # a log line per connection: drained, counted
            stderr=subprocess.PIPE,
            preexec_fn=_prepare(every_cpu),
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.log = Lines(self.process.stdout, keep=3)
        self.stderr = Lines(self.process.stderr, keep=8)
        try:
            self.states = self._wait_up([f"echo{n}" for n in range(1, len(instances) + 1)])
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, names: list[str]) -> dict[str, dict[str, str]]:
        """Wait (30 s at most) until the runtime API shows every one of *names* UP and the
        frontend answers; the servers' rows then."""
        deadline = time.monotonic() + 30
        states: dict[str, dict[str, str]] = {}
        while True:
            if self.process.poll() is not None:
                self.stderr.join(5)
                raise RuntimeError(
                    f"haproxy exited with {self.process.returncode}: {_said(self.stderr.tail)}"
                )
            try:
                states = parse_show_stat(ask(self.stats_socket, "show stat"))
                if all(states.get(name, {}).get("status") == "UP" for name in names):
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
                        probe.sendall(b"x")
                        if probe.recv(1) == b"x":
                            return states
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                seen = {name: row.get("status") for name, row in states.items()}
                raise RuntimeError(f"haproxy: servers not UP within 30 s: {seen}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.log.join(5)
        self.stderr.join(5)


def haproxy_executable() -> tuple[str, str]:
    """Debian's HAProxy, installed by ``tools/haproxy.py`` (as the test command does) when it
    is missing: its path and the first line of ``haproxy -v``.  RuntimeError saying why it
    cannot be used."""
    try:
        import haproxy  # tools/, on sys.path (benchmarks/run.py puts it there)
    except ImportError as exc:
        raise RuntimeError(f"balanced rows not measured: tools/haproxy.py: {exc}") from None
    haproxy.provision()
    try:
        executable = str(haproxy.haproxy_path())
    except haproxy.HAProxyUnavailable as exc:
        raise RuntimeError(f"balanced rows not measured: {exc}") from None
    said = subprocess.run([executable, "-v"], capture_output=True, text=True, timeout=30)
    return executable, (said.stdout.splitlines() or ["HAProxy (version unknown)"])[0]


@contextmanager
def started(server: Server, cpus: set[int] = SERVER_CPU) -> Iterator[Running]:
    running = Running(server, cpus=cpus)
    try:
        yield running
    finally:
        running.stop()


def _echo_args(plan: Plan, size: int, conns: int, proxy: str = "") -> list[str]:
    args = ["-mode", "echo", "-conns", str(conns), "-size", str(size)]
    args += ["-duration", str(plan.duration), "-warmup", str(plan.warmup)]
    return args + (["-proxy", proxy] if proxy else [])


def balanced_setup(
    setup: str, plan: Plan, executable: str, version: str = ""
) -> list[dict[str, Any]]:
    """One setup's records at :data:`BALANCED_POINTS`, on processes started for it."""
    base: dict[str, Any] = {
        "server": "go" if setup == "go" else "iocp_echo",
        "runtime": "linux-go" if setup == "go" else "linux-3.13",
        "platform": "linux",
        "role": "reference" if setup == "go" else "ours",
        "mode": BALANCED,
        "setup": setup,
        "instances": INSTANCES if setup == "haproxy" else 1,
        "duration": plan.duration,
        "warmup": plan.warmup,
    }
    if setup == "haproxy":
        base["haproxy"] = version
    records: list[dict[str, Any]] = []
    with ExitStack() as stack:
        admins: list[int] = []
        if setup == "haproxy":
            admins = [_free_port() for _ in range(INSTANCES)]
            servers = [
                stack.enter_context(started(instance("linux", proxy=True, admin_port=admin)))
                for admin in admins
            ]
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
            balancer = Balancer(
                executable, [(s.port, a) for s, a in zip(servers, admins, strict=True)], folder
            )
            stack.callback(balancer.stop)
            port, name = balancer.port, "2 x iocp_echo behind HAProxy"
            meters = {"server_cpu": cpu_meter(*(s.process for s in servers))}
            meters["haproxy_cpu"] = cpu_meter(balancer.process)

            def said() -> str:
                return _said([*balancer.stderr.tail, *servers[0].stderr.tail])

        else:
            server = go_native() if setup == "go" else instance("linux", proxy=False)
            servers = [stack.enter_context(started(server))]
            port, name = servers[0].port, f"{base['server']} direct"
            meters = {"server_cpu": cpu_meter(servers[0].process)}

            def said() -> str:
                return _said(servers[0].stderr.tail)

        throwaway_at(port, plan, name, said)
        for size, conns in BALANCED_POINTS:
            sent = [admin_stats(a)["bytes_sent"] for a in admins]
            raw, cores = measure_window(port, _echo_args(plan, size, conns), meters)
            split = shares(sent, [admin_stats(a)["bytes_sent"] for a in admins])
            record = base | {"msg_size": size, "concurrency": conns, **stats.summarize(raw)}
            record |= cores | ({"share_min": min(split), "shares": split} if split else {})
            record["other_cpu"] = other_cpu(record)
            if admins and (not split or min(split) == 0):
                raise RuntimeError(f"{name}: an instance was sent nothing (shares {split})")
            say(
                f"balanced {setup:<8} {size} B x {conns:>4}: {record['rps']:>9.0f} req/s "
                f"p99 {record['p99_us']} us; cores: servers {cores.get('server_cpu', 0):.2f}, "
                f"haproxy {cores.get('haproxy_cpu', 0):.2f}, client {record['client_cpu']:.2f}"
            )
            records.append(record)
        if admins:
            headers = [admin_stats(a).get("proxy_headers", {}) for a in admins]
            for record in records:
                record["proxy_headers"] = headers
        log = servers[0].log() if setup != "go" else {}
    return [r | log for r in records]


def run_balanced_round(plan: Plan, repeat: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One round of the balanced rows: every setup, the order reversed every other round.
    Returns the records and the failures (a setup that fails costs only its own rows)."""
    executable, version = haproxy_executable()
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    for setup in SETUPS if repeat % 2 == 0 else tuple(reversed(SETUPS)):
        try:
            records += balanced_setup(setup, plan, executable, version)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            error = f"balanced {setup}, round {repeat + 1}: {exc}"
            say(f"FAILED {error}")
            errors.append(error)
    return records, errors


# -- the PROXY header on churn ----------------------------------------------------------------


def churn_args(plan: Plan, header: str) -> list[str]:
    """The load generator's arguments for a churn window of row *header* (:data:`HEADERS`)."""
    args = ["-mode", "churn", "-conns", str(plan.churn_workers), "-size", "64"]
    args += ["-duration", str(plan.duration), "-warmup", str(plan.warmup)]
    if header == "plain":
        return args
    version, _, joined = header.partition("-")
    return args + ["-proxy", version] + (["-joined"] if joined else [])


def header_orders(pairs: int, repeat: int) -> list[tuple[str, ...]]:
    """The order of the windows of one round: :data:`HEADERS` forwards, then backwards, ...,
    *pairs* times, starting backwards in odd rounds."""
    return [HEADERS if (repeat + i) % 2 == 0 else HEADERS[::-1] for i in range(pairs)]


def _last_words(running: Running) -> Callable[[], str]:
    return lambda: _said(running.stderr.tail)


def proxy_churn_session(plan: Plan, platform_name: str, repeat: int) -> list[dict[str, Any]]:
    """One round on one platform: the server without and the server with --proxy-protocol,
    both running, their windows alternated; each window's rate and server CPU, and its ratio
    to the plain window of the same pass (``pair_rps_ratio``, ``pair_cpu_ratio``)."""
    wine = platform_name == "wine"
    admins = {"plain": _free_port(), "proxy": _free_port()}
    records: list[dict[str, Any]] = []
    with ExitStack() as stack:
        plain = stack.enter_context(
            started(instance(platform_name, proxy=False, admin_port=admins["plain"]))
        )
        proxied = stack.enter_context(
            started(instance(platform_name, proxy=True, admin_port=admins["proxy"]))
        )
        for running in (plain, proxied):
            throwaway_at(
                running.port,
                plan,
                f"iocp_echo{' --proxy-protocol' if running.server.proxy else ''}",
                _last_words(running),
                proxy="v2" if running.server.proxy else "",
            )
        for order in header_orders(plan.proxy_churn_pairs, repeat):
            window = {}
            for header in order:
                running = plain if header == "plain" else proxied
                meters = {"server_cpu": cpu_meter(running.process, wine=wine)}
                raw, cores = measure_window(running.port, churn_args(plan, header), meters)
                summary = stats.summarize(raw)
                cpu = cores.get("server_cpu")
                window[header] = {
                    "server": "iocp_echo",
                    "runtime": running.server.runtime,
                    "platform": platform_name,
                    "role": "ours",
                    "mode": PROXY_CHURN,
                    "setup": header,
                    "msg_size": 64,
                    "concurrency": plan.churn_workers,
                    "duration": plan.duration,
                    "warmup": plan.warmup,
                    **summary,
                    "server_cpu": cpu,
                    "server_us_per_conn": cpu / summary["rps"] * 1e6
                    if cpu is not None and summary["rps"]
                    else None,
                    "machine_cpu": cores.get("machine_cpu"),
                }
                window[header]["other_cpu"] = other_cpu(window[header])
                say(
                    f"proxy-churn {platform_name:<5} {header:<9}: {summary['rps']:>7.0f} conn/s, "
                    f"server {window[header]['server_us_per_conn'] or 0:.0f} us CPU/conn, "
                    f"client {summary['client_cpu']:.2f} cores"
                )
            for header in HEADERS[1:]:
                window[header]["pair_rps_ratio"] = stats.ratio(
                    window[header]["rps"], window["plain"]["rps"]
                )
                window[header]["pair_cpu_ratio"] = stats.ratio(
                    window[header]["server_us_per_conn"], window["plain"]["server_us_per_conn"]
                )
            records += window.values()
        outcomes = admin_stats(admins["proxy"]).get("proxy_headers")
        log = proxied.log()
    for record in records:
        if record["setup"] != "plain":
            record["proxy_headers"] = outcomes
    return [r | log for r in records]


def run_proxy_churn_round(
    plan: Plan, platforms: Sequence[str], repeat: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """One round of the churn comparison on each platform; a platform that fails costs only
    its own rows."""
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    for platform_name in platforms:
        try:
            records += proxy_churn_session(plan, platform_name, repeat)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            error = f"proxy-churn {platform_name}, round {repeat + 1}: {exc}"
            say(f"FAILED {error}")
            errors.append(error)
    return records, errors
