"""The loop rows of the benchmark (issue 14: a user's own streams and Protocol servers and
ping-pong clients on each event loop), on made-up records: which loops each platform
measures and against which baseline, how a run chooses them when a loop cannot be used,
how a loop that breaks is reported and left out of later rounds, and what the report says
(ratios to the stock loop, the goals, the headroom)."""

from __future__ import annotations

import types
from typing import Any

import pytest

from benchmarks import report, run

from .test_bench_report import MACHINE


def row(
    loop: str, platform: str, mode: str, rps: float, size: int = 1024, conns: int = 20, **extra: Any
) -> dict[str, Any]:
    return {
        "server": loop,
        "runtime": f"{platform}-3.13",
        "platform": platform,
        "role": "ours" if loop == "iocp_echo" else "peer",
        "mode": mode,
        "msg_size": size,
        "concurrency": conns,
        "rps": rps,
        "p99_us": 900,
        "client_cpu": 0.4,
        "failures": 0,
        "repeats": 3,
    } | extra


def ceiling(rps: float, size: int = 1024, conns: int = 20) -> dict[str, Any]:
    return row("go", "linux", "ceiling", rps, size, conns) | {
        "runtime": "linux-go",
        "role": "reference",
    }


def test_each_platform_runs_the_same_programs_on_its_loops() -> None:
    loops = {(s.platform, s.name): s for s in run.loop_servers()}
    assert set(loops) == {
        ("wine", "iocp_echo"),
        ("wine", "asyncio-proactor"),
        ("wine", "winloop"),
        ("linux", "iocp_echo"),
        ("linux", "asyncio-selector"),
        ("linux", "uvloop"),
        ("linux", "rloop"),
        ("linux", "uringcore"),
    }
    for server in loops.values():
        assert server.modes == run.LOOP_MODES
        assert server.command[1:4] == ("benchmarks/servers/asyncio_echo.py", "--loop", server.loop)
        assert server.command[-2:] == ("--port", "{port}")
        assert server.role == ("ours" if server.name == "iocp_echo" else "peer")
    # The stock loops run the default loop: no factory, as an app that sets none.
    assert loops[("linux", "asyncio-selector")].loop == "default"
    assert loops[("wine", "asyncio-proactor")].loop == "default"
    assert loops[("wine", "iocp_echo")].command[0] == "py"
    assert loops[("linux", "iocp_echo")].command[0] == "native-py"
    assert "--site" in loops[("wine", "winloop")].command
    # The report's baselines and expected loops are the run's.
    for where, names in run.LOOPS.items():
        assert report.LOOPS[where] == tuple(name for name, _, _ in names)
        assert report.BASELINE[where] == names[1][0]
    # The echo matrix keeps its servers, with rloop and uringcore beside uvloop natively.
    echo = {s.name for s in run.servers() if s.platform == "linux" and "echo" in s.modes}
    assert {"uvloop", "rloop", "uringcore", "asyncio-selector-protocol", "go"} <= echo


def test_the_first_round_measures_every_loop_point_later_rounds_the_headline() -> None:
    assert run.loop_points(run.FULL, True) == [(1024, 20), (1024, 1000), (65536, 20)]
    assert run.loop_points(run.FULL, False) == [(1024, 20), (1024, 1000)]
    assert run.loop_points(run.QUICK, True) == [(1024, 20)]


def test_clients_make_a_fixed_count_of_round_trips_fewer_for_large_messages() -> None:
    plan = run.FULL
    assert run.client_requests(plan, "linux", 1024, 20) == 80000
    assert run.client_requests(plan, "linux", 65536, 20) == 10000
    assert run.client_requests(plan, "wine", 1024, 1000) == 16000
    # Never fewer than one round trip per connection.
    assert run.client_requests(plan, "wine", 1 << 24, 1000) == 1000


def test_a_loop_that_cannot_be_installed_is_left_out_with_a_note() -> None:
    listed = run.servers()
    unusable = {"uringcore": "uringcore==0.9.1 unusable: No module named 'uringcore'"}
    chosen, notes = run.choose(listed, None, None, set(run.ALL_MODES), unusable)
    assert not [s for s in chosen if s.loop == "uringcore"]
    # One note for the loop, though both its echo peer and its loop rows were left out.
    assert notes == [
        "uringcore: uringcore==0.9.1 unusable: No module named 'uringcore'; "
        "its rows are left out of this run"
    ]
    assert {s.name for s in chosen if s.loop == "rloop"} == {"rloop"}


def test_loop_modes_always_bring_the_go_ceiling() -> None:
    listed = run.servers()
    chosen, _ = run.choose(listed, {"iocp_echo"}, "wine", {"streams"}, {})
    assert [s.name for s in chosen] == ["iocp_echo", "iocp_echo", "go"]
    go = chosen[-1]
    assert (go.runtime, go.modes) == ("linux-go", frozenset({run.CEILING}))
    # With the native Go server chosen anyway, it measures the ceiling in its own session.
    chosen, _ = run.choose(listed, None, "linux", {"echo", "client"}, {})
    assert [s for s in chosen if s.name == "go"] == [run.go_native()]
    assert run.CEILING in run.go_native().modes
    # No loop mode: no ceiling.
    chosen, _ = run.choose(listed, {"iocp_echo"}, None, {"echo"}, {})
    assert "go" not in {s.name for s in chosen}


def test_a_loop_that_breaks_is_reported_and_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    server = next(s for s in run.loop_servers() if s.name == "uringcore")
    calls: list[str] = []

    def serve(server: run.Server, plan: run.Plan, mode: str, points: list[run.Point]) -> Any:
        calls.append(mode)
        if mode == "protocol":
            raise RuntimeError("uringcore did not answer within 60 s")
        return [row("uringcore", "linux", mode, 0.0, failures=20)], "RuntimeError: No buffers"

    def clients(server: run.Server, plan: run.Plan, points: list[run.Point]) -> Any:
        calls.append("client")
        return [row("uringcore", "linux", "client", 5000.0)], ""

    monkeypatch.setattr(run, "serve_on_loop", serve)
    monkeypatch.setattr(run, "measure_clients", clients)
    errors: list[str] = []
    broken: set[tuple[str, str, str]] = set()
    first = run.run_server(server, run.FULL, run.ALL_MODES, True, errors, broken)
    assert calls == ["protocol", "streams", "client"]
    assert [(r["mode"], r["loop"]) for r in first] == [
        ("streams", "uringcore"),
        ("client", "uringcore"),
    ]
    assert errors == [
        "uringcore (linux-3.13) protocol: uringcore did not answer within 60 s",
        "uringcore (linux-3.13) streams: failed requests or connections "
        "(20 at 1024 B x 20); it said: RuntimeError: No buffers",
    ]
    assert broken == {
        ("uringcore", "linux-3.13", "protocol"),
        ("uringcore", "linux-3.13", "streams"),
    }
    calls.clear()
    run.run_server(server, run.FULL, run.ALL_MODES, False, errors, broken)
    assert calls == ["client"]


def test_said_keeps_the_last_lines_without_wines_noise() -> None:
    lines = ["Traceback", '  File "x.py"', "0024:fixme:ntdll:NtQuery stub", "RuntimeError: boom"]
    assert run._said(lines) == 'Traceback /   File "x.py" / RuntimeError: boom'
    assert run._said([]) == "(nothing)"


def test_a_partial_run_of_the_loop_rows_replaces_only_them() -> None:
    old = [
        row("iocp_echo", "linux", "echo", 1.0),
        row("iocp_echo", "linux", "streams", 2.0),
        row("uvloop", "linux", "streams", 3.0),
        ceiling(4.0),
        row("go", "linux", "echo", 5.0) | {"runtime": "linux-go"},
    ]
    chosen, _ = run.choose(run.servers(), {"iocp_echo"}, "linux", {"streams"}, {})
    kept = run.keep_unmeasured(old, chosen, {"streams", run.CEILING})
    assert [r["rps"] for r in kept] == [1.0, 3.0, 5.0]


def test_repeated_client_runs_take_the_median_of_the_servers_cores_too() -> None:
    runs = [
        row("rloop", "linux", "client", rps, server_cpu=cpu)
        for rps, cpu in ((1, 0.1), (3, 0.3), (2, 0.9))
    ]
    (merged,) = run.merge_repeats(runs)
    assert (merged["rps"], merged["server_cpu"], merged["repeats"]) == (2, 0.3, 3)


def loop_records() -> list[dict[str, Any]]:
    return [
        row("iocp_echo", "linux", "streams", 30000.0),
        row("asyncio-selector", "linux", "streams", 25000.0),
        row("uvloop", "linux", "streams", 40000.0, server_log=["READY uvloop.Loop"]),
        row("iocp_echo", "linux", "streams", 9000.0, conns=1000),
        row("asyncio-selector", "linux", "streams", 9500.0, conns=1000),
        row("uringcore", "linux", "streams", 0.0, failures=20),
        row("iocp_echo", "linux", "protocol", 60000.0),
        row("asyncio-selector", "linux", "protocol", 50000.0),
        row("iocp_echo", "wine", "streams", 6500.0),
        row("asyncio-proactor", "wine", "streams", 5000.0),
        row("winloop", "wine", "streams", 7000.0),
        row("iocp_echo", "linux", "client", 20000.0, server_cpu=0.2),
        row("asyncio-selector", "linux", "client", 15000.0, server_cpu=0.15),
        row("rloop", "linux", "client", 30000.0, server_cpu=0.3),
        ceiling(150000.0),
        ceiling(140000.0, conns=1000),
    ]


def test_the_loop_tables_give_each_loop_its_ratio_to_the_stock_loop() -> None:
    text = report.markdown(loop_records(), MACHINE | {"loops": {"rloop": "0.5.0"}})
    section = text.split("## A user's own servers and clients on each event loop")[1]
    assert "Loop versions: rloop 0.5.0." in section
    # Wine's tables first, as everywhere in the report.
    streams = section.split("### Streams echo server")[2].split("###")[0]
    assert "natively" in streams.splitlines()[0]
    assert (
        "| loop | 1 KiB × 20 req/s | ÷ asyncio-selector | p99 µs "
        "| 1 KiB × 1,000 req/s | ÷ asyncio-selector | p99 µs | runs |"
    ) in streams
    assert "| **iocp_echo** | 30,000 | 1.20× | 900 | 9,000 | 0.95× | 900 | 3 |" in streams
    assert "| uvloop | 40,000 | 1.60× | 900 | – | – | – | 3 |" in streams
    # A loop that broke shows its failures, not a ratio.
    assert "| uringcore | 0 (20 failed) | – | 900 | – | – | – | 3 |" in streams
    assert "Not measured here in this run: rloop (see the failures at the top)." in streams
    assert "Loop classes that ran: uvloop `uvloop.Loop`." in streams
    client = section.split("### Ping-pong clients")[1].split("###")[0]
    assert "1 KiB × 20 round trips/s" in client
    assert "| rloop | 30,000 | 2.00× | 900 | 3 |" in client
    wine = section.split("### Streams echo server")[1].split("###")[0]
    assert "under Wine" in wine.splitlines()[0]
    assert "| **iocp_echo** | 6,500 | 1.30× | 900 | 3 |" in wine
    # The loop rows stay out of the echo server's tables.
    echo_part = text.split("## A user's own servers")[0]
    assert "## Native Linux" not in echo_part and "## Ratios natively" not in echo_part
    assert "| ceiling |" not in echo_part


def test_goals_are_met_only_at_every_point_at_the_precision_shown() -> None:
    records = loop_records()
    assert report.loop_goal(records, "streams", "linux") == (
        "missed (≥ 1.0×) at 1 KiB × 1,000: 0.95×"
    )
    assert report.loop_goal(records, "protocol", "linux") == "met (≥ 1.0×) at 1 of 1 point(s)"
    # 6,500 / 5,000 = 1.30: the Wine streams goal (>= 1.3x) is met at two decimals.
    assert report.loop_goal(records, "streams", "wine") == "met (≥ 1.3×) at 1 of 1 point(s)"
    nearly = [r | {"rps": 6499.0} if r["server"] == "iocp_echo" else r for r in records]
    assert report.loop_goal(nearly, "streams", "wine") == "met (≥ 1.3×) at 1 of 1 point(s)"
    short = [r | {"rps": 6470.0} if r["server"] == "iocp_echo" else r for r in records]
    assert report.loop_goal(short, "streams", "wine").startswith("missed (≥ 1.3×)")
    # No goal stated for the Protocol echo under Wine; no figure, no verdict.
    assert report.loop_goal(records, "protocol", "wine") == ""
    assert report.loop_goal([], "streams", "linux") == ""
    text = report.markdown(records, MACHINE)
    assert (
        "| protocol | natively | ≥ 1.0× asyncio-selector | met (≥ 1.0×) at 1 of 1 point(s) |"
        in text
    )


def test_the_headroom_of_the_loop_rows_is_shown_per_point() -> None:
    text = report.markdown(loop_records(), MACHINE)
    section = text.split("### Is the load generator or the fixed server the bottleneck?")[1]
    assert "| streams | natively | 1024 | 20 | 150,000 | 40,000 (uvloop) | 3.8× | 0.40 |" in section
    assert (
        "| streams | natively | 1024 | 1000 | 140,000 | 9,500 (asyncio-selector) | 14.7× | 0.40 |"
        in section
    )
    # Clients: the fixed Go server's cores, not the Python client's.
    assert "| client | natively | 1024 | 20 | 150,000 | 30,000 (rloop) | 5.0× | 0.30 |" in section
    # Under Wine, against the same native Go ceiling.
    assert (
        "| streams | under Wine | 1024 | 20 | 150,000 | 7,000 (winloop) | 21.4× | 0.40 |" in section
    )


def test_a_server_that_fails_its_throwaway_session_is_stopped_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = types.SimpleNamespace(
        server=run.loop_servers()[0],
        port=1,
        stderr=types.SimpleNamespace(tail=["RuntimeError: No buffers available for recv"]),
    )
    answers = {"requests": 0, "failures": 20}
    monkeypatch.setattr(run, "loadgen", lambda *args, **kwargs: answers)
    monkeypatch.setattr(run, "SETTLE", 0)
    with pytest.raises(run.ThrowawayFailed, match=r"20 failures.*No buffers available for recv"):
        run.throwaway(quiet, run.QUICK)  # type: ignore[arg-type]
    answers["requests"] = 5  # a few answered, then every connection failed
    with pytest.raises(run.ThrowawayFailed, match=r"5 requests answered, 20 failures on 20"):
        run.throwaway(quiet, run.QUICK)  # type: ignore[arg-type]
    answers["failures"] = 19  # one connection went on: measured as usual
    run.throwaway(quiet, run.QUICK)  # type: ignore[arg-type]
