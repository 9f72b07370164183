"""``python -m benchmarks run [--quick]``: iocp_echo and its peers, same client, same run.

Every server is started, measured by the same load generator (``benchmarks/loadgen``, Go),
and stopped; the whole server list is repeated ``--repeats`` times in alternating order and
each figure is the median of its repeats.  Server and client are pinned to different cores
(the machine has two), so the client never steals the server's CPU.

Under Wine (Windows CPython 3.13): iocp_echo, the stock ProactorEventLoop with a Protocol echo,
asyncio streams, winloop, and Go's net echo built for Windows.  Natively on Linux: the stock
selector loop with the same Protocol, uvloop, Go's native echo, and iocp_echo on its io_uring
backend.

Writes ``benchmarks/results/latest.json``, ``latest.md`` and, with matplotlib, PNG charts
(``--quick`` writes them under ``benchmarks/results/quick/``, leaving the committed full results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report, stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import winpy  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
BIN = CACHE / "bin"
WINE_SITE = CACHE / "wine-site313"
VENV = ROOT / ".cache" / "venv" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
SERVER_CPU, CLIENT_CPU = {1}, {0}
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
)


@dataclasses.dataclass(frozen=True)
class Server:
    name: str
    runtime: str
    platform: str  # "wine" or "linux": servers are compared within one platform only
    command: tuple[str, ...]  # "{port}" is replaced; see _argv for how each kind starts


def servers() -> list[Server]:
    site = winpy.to_windows_path(WINE_SITE)
    asyncio_echo = "benchmarks/servers/asyncio_echo.py"
    return [
        Server(
            "iocp_echo",
            "wine-3.13",
            "wine",
            ("py", "examples/echo.py", "--port", "{port}", "--log-level", "ERROR"),
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
        ),
        Server(
            "go", "wine-go", "wine", ("exe", str(BIN / "goecho.exe"), "-addr", "127.0.0.1:{port}")
        ),
        Server(
            "iocp_echo",
            "linux-3.13",
            "linux",
            ("native-py", "examples/echo.py", "--port", "{port}", "--log-level", "ERROR"),
        ),
        Server(
            "asyncio-selector-protocol",
            "linux-3.13",
            "linux",
            ("native-py", asyncio_echo, "--port", "{port}"),
        ),
        Server(
            "uvloop",
            "linux-3.13",
            "linux",
            ("native-py", asyncio_echo, "--port", "{port}", "--loop", "uvloop"),
        ),
        Server(
            "go", "linux-go", "linux", ("native", str(BIN / "goecho"), "-addr", "127.0.0.1:{port}")
        ),
    ]


# -- provisioning ------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


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
        if not out.exists():
            say(f"building {target}")
            subprocess.run(
                ["go", "build", "-o", str(out), "."],
                check=True,
                cwd=Path(__file__).parent / source,
                env=dict(go_env, GOOS=goos),
            )
    winpy.provision("3.13")
    if not (WINE_SITE / "winloop").exists():
        say("installing winloop for Windows CPython 3.13")
        winpy.install_for_windows(WINE_SITE, "3.13", report.bench_requirements("wine"))
    import check  # tools/, on sys.path above

    check.ensure_venv("3.13", report.bench_requirements("linux"), name="bench")


# -- running servers ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pin(cpus: set[int]) -> Any:
    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def _argv(server: Server, port: int) -> tuple[list[str], dict[str, str] | None]:
    kind, *rest = [part.replace("{port}", str(port)) for part in server.command]
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


class Running:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = _free_port()
        argv, env = _argv(server, self.port)
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pin(SERVER_CPU),
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
                    probe.sendall(b"x")
                    if probe.recv(1) == b"x":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            for pid in reversed(_descendants(self.process.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.process.wait(15)


def loadgen(port: int, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / "loadgen"), "-addr", f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_pin(CLIENT_CPU),
        check=True,
    )
    raw: dict[str, Any] = json.loads(result.stdout)
    return raw


def measure_idle(running: Running, count: int) -> dict[str, Any]:
    before = _rss_kib(running.process.pid)
    process = subprocess.Popen(
        [
            str(BIN / "loadgen"),
            "-addr",
            f"127.0.0.1:{running.port}",
            "-mode",
            "idle",
            "-conns",
            str(count),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(CLIENT_CPU),
    )
    assert process.stderr is not None and process.stdin is not None
    ready = process.stderr.readline()
    opened = int(ready.split()[1]) if ready.startswith("READY") else 0
    time.sleep(1.0)  # let the server settle its buffers after the last echo
    after = _rss_kib(running.process.pid)
    process.stdin.close()
    process.wait(120)
    return {
        "mode": "idle",
        "concurrency": count,
        "msg_size": 1,
        "rss_kib_per_conn": (after - before) / opened if opened else None,
        "failures": count - opened,
    }


# -- the matrix ----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    sizes: list[int]
    concurrencies: list[int]
    duration: float
    warmup: float
    repeats: int
    churn_workers: int
    idle_counts: list[int]


QUICK = Plan([1024], [20], 2.0, 0.5, 1, 20, [1000])
FULL = Plan([64, 1024, 16384, 65536], [1, 20, 100, 1000], 2.5, 0.5, 3, 20, [1000, 5000])


def run_server(server: Server, plan: Plan, modes: set[str]) -> list[dict[str, Any]]:
    records = []
    base = {"server": server.name, "runtime": server.runtime, "platform": server.platform}
    for count in plan.idle_counts if "idle" in modes else []:
        # A fresh server each time: one that already served a load would reuse freed memory
        # for the idle connections, and the measured growth would read as zero.
        running = Running(server)
        try:
            record = {**base, **measure_idle(running, count)}
        finally:
            running.stop()
        say(
            f"{server.name:<27} {server.runtime:<10} idle {count}: "
            f"{record['rss_kib_per_conn']} KiB/conn"
        )
        records.append(record)
    if not modes & {"echo", "churn"}:
        return records
    running = Running(server)
    try:
        for size in plan.sizes if "echo" in modes else []:
            for conns in plan.concurrencies:
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
                record = {
                    **base,
                    "mode": "echo",
                    "msg_size": size,
                    "concurrency": conns,
                    **stats.summarize(raw),
                    "rss_kib_per_conn": None,
                }
                say(
                    f"{server.name:<27} {server.runtime:<10} echo {size:>6} B x {conns:>4}: "
                    f"{record['rps']:>9.0f} req/s p99 {record['p99_us']} us "
                    f"(client {record['client_cpu']:.2f} cores)"
                )
                records.append(record)
        if "churn" not in modes:
            return records
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
        record = {
            **base,
            "mode": "churn",
            "msg_size": 64,
            "concurrency": plan.churn_workers,
            **stats.summarize(raw),
            "rss_kib_per_conn": None,
        }
        say(f"{server.name:<27} {server.runtime:<10} churn: {record['rps']:.0f} conn/s")
        records.append(record)
    finally:
        running.stop()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: under 3 minutes")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument("--only", help="comma-separated server names")
    parser.add_argument(
        "--modes",
        default="echo,churn,idle",
        help="comma-separated modes to run (default: all); with fewer than all, the new "
        "records replace those of the same modes in results/latest.json",
    )
    options = parser.parse_args(argv)
    plan = dataclasses.replace(QUICK if options.quick else FULL)
    if options.repeats:
        plan.repeats = options.repeats
    provision()
    subprocess.run(
        [str(winpy.WINESERVER), "-k"], env=winpy.wine_environment(), capture_output=True
    )  # restart it pinned with the servers
    chosen = [s for s in servers() if not options.only or s.name in options.only.split(",")]
    modes = set(options.modes.split(","))
    started = time.monotonic()
    raw_records: list[dict[str, Any]] = []
    for repeat in range(plan.repeats):
        order = chosen if repeat % 2 == 0 else list(reversed(chosen))
        for server in order:
            raw_records.extend(run_server(server, plan, modes))
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in raw_records:
        key = (
            record["server"],
            record["runtime"],
            record["mode"],
            record["msg_size"],
            record["concurrency"],
        )
        grouped.setdefault(key, []).append(record)
    records = [stats.median_record(group, NUMERIC) for group in grouped.values()]
    # A smoke run must not overwrite the committed results of a full one.
    results = RESULTS / "quick" if options.quick else RESULTS
    if modes != {"echo", "churn", "idle"} and (results / "latest.json").exists():
        kept = json.loads((results / "latest.json").read_text())
        records = [r for r in kept if r["mode"] not in modes] + records
    machine = {
        "cpus": os.cpu_count(),
        "cpu": report.cpu_model(),
        "kernel": platform.release(),
        "wine": report.wine_version(),
        "linux_python": report.venv_python_version(VENV),
        "plan": dataclasses.asdict(plan),
        "quick": options.quick,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    if modes != {"echo", "churn", "idle"} and (results / "machine.json").exists():
        rerun = {k: machine[k] for k in ("minutes", "date")} | {"modes": sorted(modes)}
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
