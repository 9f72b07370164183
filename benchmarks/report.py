"""The Markdown report: tables of medians and ratios (iocp_echo / each peer), machine facts."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

from . import stats

ROOT = Path(__file__).resolve().parent.parent


def bench_requirements(where: str) -> list[str]:
    """The ``bench`` extra for *where* ("linux" or "wine"), markers resolved by hand."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
    chosen = []
    for requirement in extra:
        name, _, marker = requirement.partition(";")
        windows_only = "sys_platform == 'win32'" in marker
        if windows_only == (where == "wine"):
            chosen.append(name.strip())
    return chosen


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def wine_version() -> str:
    try:
        out = subprocess.run(
            ["/usr/lib/wine/wine64", "--version"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip()
    except OSError:
        return "unknown"


def venv_python_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine['cpus']} × {machine['cpu']}, Linux {machine['kernel']}, "
        f"{machine['wine']}, Windows CPython 3.13.2 under Wine, Linux CPython "
        f"{machine['linux_python']}. Server pinned to core 1, load generator to core 0. "
        f"Each figure is the median of {machine['plan']['repeats']} alternated run(s) of "
        f"{machine['plan']['duration']} s after {machine['plan']['warmup']} s of warm-up. "
        f"Run of {machine['date']}, {machine['minutes']} minutes"
        f"{' (--quick)' if machine['quick'] else ''}"
        + (
            f"; {', '.join(machine['rerun']['modes'])} re-measured on {machine['rerun']['date']}"
            if "rerun" in machine
            else ""
        )
        + ".",
        "",
        "Compare servers only within one platform: Wine's socket layer dominates every "
        "figure under Wine.",
        "",
    ]
    for platform_name in ("wine", "linux"):
        group = [r for r in records if r["platform"] == platform_name]
        if not group:
            continue
        lines += [f"## {'Under Wine' if platform_name == 'wine' else 'Native Linux'}", ""]
        lines += [
            "| server | runtime | mode | size | conns | req/s | MiB/s | p50 µs | p99 µs "
            "| p99.9 µs | KiB/idle conn | client cores |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(
            group, key=lambda r: (r["mode"], r["msg_size"], r["concurrency"], -(r["rps"] or 0))
        ):
            lines.append(
                f"| {r['server']} | {r['runtime']} | {r['mode']} | {r['msg_size']} "
                f"| {r['concurrency']} | {_fmt(r.get('rps'))} | {_fmt(r.get('mib_s'), 1)} "
                f"| {_fmt(r.get('p50_us'))} | {_fmt(r.get('p99_us'))} "
                f"| {_fmt(r.get('p999_us'))} | {_fmt(r.get('rss_kib_per_conn'), 1)} "
                f"| {_fmt(r.get('client_cpu'), 2)} |"
            )
        lines.append("")
    lines += ratio_table(records)
    lines += headroom(records)
    return "\n".join(lines) + "\n"


def ratio_table(records: list[dict[str, Any]]) -> list[str]:
    ours = {
        (r["mode"], r["msg_size"], r["concurrency"]): r
        for r in records
        if r["server"] == "iocp_echo" and r["platform"] == "wine"
    }
    peers = sorted({r["server"] for r in records if r["platform"] == "wine"} - {"iocp_echo"})
    if not ours or not peers:
        return []
    lines = [
        "## Ratios under Wine: iocp_echo / peer",
        "",
        "Throughput (req/s or conn/s; > 1 means iocp_echo is faster), p99 latency "
        "(< 1 means iocp_echo is faster) and memory per idle connection (< 1 means "
        "iocp_echo uses less).",
        "",
        "| mode | size | conns | " + " | ".join(peers) + " |",
        "|---|---:|---:|" + "---:|" * len(peers),
    ]
    for key in sorted(ours):
        mine = ours[key]
        cells = []
        for peer in peers:
            theirs = next(
                (
                    r
                    for r in records
                    if r["server"] == peer
                    and r["platform"] == "wine"
                    and (r["mode"], r["msg_size"], r["concurrency"]) == key
                ),
                None,
            )
            if theirs is None:
                cells.append("–")
            elif key[0] == "idle":
                value = stats.ratio(mine.get("rss_kib_per_conn"), theirs.get("rss_kib_per_conn"))
                cells.append(f"mem {_fmt(value, 2)}")
            else:
                rps = stats.ratio(mine.get("rps"), theirs.get("rps"))
                p99 = stats.ratio(mine.get("p99_us"), theirs.get("p99_us"))
                cells.append(f"{_fmt(rps, 2)}× (p99 {_fmt(p99, 2)})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def headroom(records: list[dict[str, Any]]) -> list[str]:
    """Show whether the load generator, not the server, set the pace."""
    lines = [
        "## Is the load generator the bottleneck?",
        "",
        "The same client, pinned to its own core, drives Go's native echo at the rate in "
        "the third column. Every server under Wine is measured far below that rate while "
        "the client uses a fraction of its core, so those figures are the servers'. "
        "Natively, the fastest servers bring the client close to a full core: the native "
        "figures are a floor for those servers, not a ceiling (a 2-core machine cannot "
        "give the client more).",
        "",
        "| size | conns | Go native req/s | fastest under Wine | headroom | most client "
        "cores (Wine) | most client cores (native) |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    echo = [r for r in records if r["mode"] == "echo"]
    for key in sorted({(r["msg_size"], r["concurrency"]) for r in echo}):
        here = [r for r in echo if (r["msg_size"], r["concurrency"]) == key]
        go = next((r for r in here if r["runtime"] == "linux-go"), None)
        wine = [r for r in here if r["platform"] == "wine"]
        best = max(wine, key=lambda r: r["rps"] or 0, default=None)
        if go is None or best is None:
            continue
        wine_cpu = max((r["client_cpu"] or 0 for r in wine), default=None)
        native_cpu = max(
            (r["client_cpu"] or 0 for r in here if r["platform"] == "linux"), default=None
        )
        lines.append(
            f"| {key[0]} | {key[1]} | {_fmt(go['rps'])} | {_fmt(best['rps'])} "
            f"({best['server']}) | {_fmt(stats.ratio(go['rps'], best['rps']), 1)}× "
            f"| {_fmt(wine_cpu, 2)} | {_fmt(native_cpu, 2)} |"
        )
    return [*lines, ""]
