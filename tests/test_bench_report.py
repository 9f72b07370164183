"""The benchmark's plan and report (benchmarks/run.py, benchmarks/report.py), on made-up
records: which points each round measures, where the measuring sticks come from, which
records a partial run keeps, and what the report says about them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, run

MACHINE: dict[str, Any] = {
    "cpus": 2,
    "cpu": "Test CPU",
    "kernel": "6.1",
    "wine": "wine-8.0",
    "linux_python": "3.13.0",
    "plan": {
        "repeats": 3,
        "headline": [[1024, 20], [1024, 1000]],
        "duration": 2.5,
        "warmup": 0.5,
        "throwaway": 1.0,
    },
    "quick": False,
    "minutes": 21.5,
    "date": "2026-11-27",
    "ceilings": "Measuring sticks run from /x/ceilings.",
    "errors": [],
}


def echo(server: str, platform: str, rps: float, conns: int = 20, **extra: Any) -> dict[str, Any]:
    return {
        "server": server,
        "runtime": f"{platform}-3.13",
        "platform": platform,
        "role": "ours" if server == "iocp_echo" else "peer",
        "mode": "echo",
        "msg_size": 1024,
        "concurrency": conns,
        "rps": rps,
        "p99_us": 1000,
        "client_cpu": 0.3,
        "repeats": 3,
    } | extra


def test_the_first_round_measures_the_grid_later_rounds_only_the_headline() -> None:
    plan = run.FULL
    peer = run.Server("peer", "linux-3.13", "linux", ("native-py", "x.py"))
    first = run.echo_points(peer, plan, first_round=True)
    assert len(first) == 16 and first[0] == (64, 1)
    assert run.echo_points(peer, plan, first_round=False) == [(1024, 20), (1024, 1000)]
    assert plan.repeats >= 3  # the headline points stay medians of three alternated runs
    assert plan.idle_counts == {"wine": [5000], "linux": [10000]}


def test_measuring_sticks_come_from_the_shared_folder_or_are_reported_absent(
    tmp_path: Path,
) -> None:
    absent = tmp_path / "ceilings"
    assert run.sticks(absent) == []
    assert run.ceilings_note(absent) == (
        f"Measuring sticks not measured: {absent} is absent on this machine."
    )
    absent.mkdir()
    (absent / "raw_iocp_echo.py").write_text("")
    (absent / "raw_uring_echo.py").write_text("")
    found = {s.name: s for s in run.sticks(absent)}
    assert set(found) == {"raw_iocp_echo", "raw_uring_echo"}
    assert found["raw_uring_echo"].command == (
        "native-py",
        str(absent / "raw_uring_echo.py"),
        "{port}",
    )
    assert found["raw_iocp_echo"].platform == "wine"
    for stick in found.values():
        assert stick.role == "stick" and not stick.graceful and stick.python
        assert stick.modes == {"echo", "calls"}
        assert run.echo_points(stick, run.FULL, first_round=True) == [
            (1024, 20),
            (1024, 1000),
            (65536, 20),
        ]
        assert run.echo_points(stick, run.FULL, first_round=False) == [(1024, 20), (1024, 1000)]
    assert run.ceilings_note(absent) == f"Measuring sticks run from {absent}."


def test_only_python_servers_are_wrapped_for_counting_calls() -> None:
    go = next(s for s in run.servers() if s.name == "go" and s.platform == "linux")
    ours = next(s for s in run.servers() if s.name == "iocp_echo" and s.platform == "wine")
    assert not go.python and "calls" not in go.modes
    argv, _ = run._argv(ours, 9000, control_port=9001)
    assert argv[-8:] == [
        run.CALLCOUNT,
        "--control-port",
        "9001",
        "examples/echo.py",
        "--port",
        "9000",
        "--log-level",
        "INFO",
    ]
    assert run.CALLCOUNT not in run._argv(ours, 9000)[0]
    with pytest.raises(ValueError, match="not Python"):
        run._argv(go, 9000, control_port=9001)


def test_a_partial_run_keeps_what_it_did_not_remeasure() -> None:
    old = [
        echo("iocp_echo", "wine", 1.0),
        echo("winloop", "wine", 2.0),
        echo("iocp_echo", "wine", 3.0) | {"mode": "idle"},
    ]
    chosen = [s for s in run.servers() if s.name == "iocp_echo"]
    kept = run.keep_unmeasured(old, chosen, {"echo"})
    assert [r["rps"] for r in kept] == [2.0, 3.0]


def test_headline_ratios_are_against_peers_and_sticks_of_the_same_platform() -> None:
    records = [
        echo("iocp_echo", "wine", 6000.0),
        echo("winloop", "wine", 5000.0),
        echo("raw_iocp_echo", "wine", 12000.0) | {"role": "stick"},
        echo("uvloop", "linux", 1.0),
    ]
    text = report.markdown(records, MACHINE)
    assert "| conns | iocp_echo req/s | runs | winloop | raw_iocp_echo (stick) |" in text
    assert "| 20 | 6,000 | 3 | 1.20× | 0.50× |" in text
    # The stick is labelled, and left out of the peer ratios.
    assert "| raw_iocp_echo (measuring stick) | wine-3.13 | echo |" in text
    ratios = text.split("## Ratios under Wine")[1]
    assert "| mode | size | conns | winloop |\n" in ratios
    assert "Measuring sticks run from /x/ceilings." in text
    assert "median of 3 alternated run(s); the other echo points: one run" in text


def test_calls_and_idle_memory_are_judged_against_their_goals() -> None:
    calls = {
        "mode": "calls",
        "msg_size": 1024,
        "concurrency": 20,
        "echoes": 10000,
        "c_calls_per_echo": 3.0,
        "calls_per_echo": 14.0,
        "loop_iterations_per_echo": 0.05,
        "profiled_rps": 4000.0,
        "top_python": [["Conn.on_read (engine.py:10)", 1.0]],
        "top_c": [["Overlapped.WSASend", 1.0]],
    }
    records = [
        echo("iocp_echo", "wine", 1.0) | calls | {"py_calls_per_echo": 12.004},
        echo("iocp_echo", "linux", 1.0) | calls | {"py_calls_per_echo": 12.01},
        echo("asyncio-proactor-protocol", "wine", 1.0) | calls | {"py_calls_per_echo": 39.3},
        echo("iocp_echo", "wine", 1.0, conns=5000)
        | {"mode": "idle", "rss_kib_per_conn": 3.9, "rss_base_kib": 61440},
        echo("iocp_echo", "linux", 1.0, conns=10000)
        | {"mode": "idle", "rss_kib_per_conn": 2.5, "rss_base_kib": 20480},
    ]
    text = report.markdown(records, MACHINE)
    # Judged at the precision shown (two decimals).
    ours_wine = "| wine | iocp_echo | 12.00 | 3.00 | 14.00 | 0.050 | 10,000 | 4,000 | met (≤ 12) |"
    ours_linux = (
        "| linux | iocp_echo | 12.01 | 3.00 | 14.00 | 0.050 | 10,000 | 4,000 | missed (≤ 12) |"
    )
    assert ours_wine in text and ours_linux in text
    assert "| wine | asyncio-proactor-protocol | 39.30 |" in text
    assert "`Conn.on_read (engine.py:10)` 1" in text
    assert "| wine | iocp_echo | 5,000 | 3.9 | 60.0 | met (≤ 4 KiB) |" in text
    assert "| linux | iocp_echo | 10,000 | 2.5 | 20.0 | missed (≤ 2 KiB) |" in text
    # The calls records are not throughput figures: they stay out of the main tables.
    assert "| iocp_echo | wine-3.13 | calls |" not in text


def test_iocp_echo_start_up_lines_show_its_engine_and_failures_are_listed() -> None:
    def log(port: int, at: str) -> list[str]:
        return [
            f"iocp-echo: listening on 127.0.0.1:{port} (backend: io_uring)",
            f"{at} INFO iocp_echo: engine: completion",
        ]

    records = [
        echo("iocp_echo", "linux", 1.0, server_log=log(9000, "07:10:01")),
        echo("iocp_echo", "linux", 1.0, conns=1000, server_log=log(9001, "07:12:31")),
        echo("iocp_echo", "wine", 1.0, server_log=log(9002, "07:14:00")[:1]),
    ]
    text = report.markdown(records, MACHINE | {"errors": ["winloop (wine-3.13), round 2: x"]})
    # One row per distinct start-up: sessions that differ only in port and time are one.
    assert text.count("| linux-3.13 | `07:10:01 INFO iocp_echo: engine: completion` |") == 1
    assert "07:12:31" not in text
    assert "`iocp-echo: listening on 127.0.0.1:PORT (backend: io_uring)`" in text
    assert "| wine-3.13 | none logged |" in text
    assert "- winloop (wine-3.13), round 2: x" in text
