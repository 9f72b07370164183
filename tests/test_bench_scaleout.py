"""Issue 15's benchmark rows (benchmarks/scaleout.py), on made-up inputs: the variables that
put examples/haproxy.cfg in front of two instances, reading HAProxy's ``show stat``, the
instances' shares, the order of the churn windows, which runs measure and replace which rows,
how repeated windows merge, and what the report says (ratios to direct, where the CPU went,
the load generator's headroom, the PROXY header's cost against the goal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, run, scaleout

from .test_bench_report import MACHINE

SHOW_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
    "wretr,wredis,status,weight,act\n"
    "echo,FRONTEND,,,1,2,4096,10,100,100,0,0,0,,,,,OPEN,,\n"
    "iocp_echo,echo1,0,0,1,1,,5,50,50,,0,,0,0,0,0,UP,1,1\n"
    "iocp_echo,echo2,0,0,0,1,,5,50,50,,0,,0,0,0,0,UP,1,1\n"
    "iocp_echo,echo3,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,0,1\n"
    "iocp_echo,BACKEND,0,0,1,2,410,10,100,100,0,0,,0,0,0,0,UP,2,2\n"
    "\n"
)


def test_two_instances_fill_the_config_and_its_third_server_gets_weight_zero() -> None:
    api = Path("/s/h.sock")
    env = scaleout.haproxy_environment(9000, [(9001, 9101), (9002, 9102)], api)
    assert env == {
        "IOCP_ECHO_BIND": "127.0.0.1:9000",
        "IOCP_ECHO_STATS_SOCKET": str(api),
        "IOCP_ECHO_SERVER1": "127.0.0.1:9001",
        "IOCP_ECHO_ADMIN1": "9101",
        "IOCP_ECHO_WEIGHT1": "1",
        "IOCP_ECHO_SERVER2": "127.0.0.1:9002",
        "IOCP_ECHO_ADMIN2": "9102",
        "IOCP_ECHO_WEIGHT2": "1",
        # A real instance, so that its health check passes; weight 0: sent nothing.
        "IOCP_ECHO_SERVER3": "127.0.0.1:9002",
        "IOCP_ECHO_ADMIN3": "9102",
        "IOCP_ECHO_WEIGHT3": "0",
    }
    for wrong in ([], [(1, 2)] * 4):
        with pytest.raises(ValueError, match="1 to 3 instances"):
            scaleout.haproxy_environment(9000, wrong, Path("/s/h.sock"))


def test_the_config_reads_every_variable_the_benchmark_sets() -> None:
    text = scaleout.CONFIG.read_text()
    env = scaleout.haproxy_environment(9000, [(9001, 9101), (9002, 9102)], Path("/s/h.sock"))
    for name in env:
        assert "${" + name + "-" in text, name
    assert f"backend {scaleout.BACKEND}" in text and "send-proxy-v2" in text
    assert text.count("\n    server echo") == scaleout.CONFIG_SERVERS


def test_show_stat_rows_of_the_backend_servers_only() -> None:
    rows = scaleout.parse_show_stat(SHOW_STAT)
    assert list(rows) == ["echo1", "echo2", "echo3"]
    assert rows["echo1"]["status"] == "UP" and rows["echo3"]["weight"] == "0"
    assert scaleout.parse_show_stat(SHOW_STAT, backend="other") == {}
    with pytest.raises(ValueError, match="not a 'show stat' answer"):
        scaleout.parse_show_stat("Unknown command\n")


def test_shares_of_the_bytes_sent_between_two_readings() -> None:
    assert scaleout.shares([100, 1000], [600, 1500]) == [0.5, 0.5]
    assert scaleout.shares([0, 0], [300, 100]) == [0.75, 0.25]
    assert scaleout.shares([5, 5], [5, 5]) == []  # nothing sent: no shares, not a division
    with pytest.raises(ValueError, match="zip"):  # readings of different servers
        scaleout.shares([1], [1, 2])


def test_churn_windows_alternate_within_and_across_rounds() -> None:
    forwards = ("plain", "v2", "v1", "v2-joined")
    backwards = ("v2-joined", "v1", "v2", "plain")
    assert scaleout.header_orders(3, 0) == [forwards, backwards, forwards]
    assert scaleout.header_orders(2, 1) == [backwards, forwards]
    # Over a round of an even number of passes, each row is as often first as last.
    assert run.FULL.proxy_churn_pairs % 2 == 0 and run.QUICK.proxy_churn_pairs % 2 == 0


def test_each_churn_row_asks_the_load_generator_for_its_header() -> None:
    common = ["-mode", "churn", "-conns", "20", "-size", "64", "-duration", "2.5", "-warmup"]
    assert scaleout.churn_args(run.FULL, "plain") == [*common, "0.5"]
    assert scaleout.churn_args(run.FULL, "v2") == [*common, "0.5", "-proxy", "v2"]
    assert scaleout.churn_args(run.FULL, "v1") == [*common, "0.5", "-proxy", "v1"]
    assert scaleout.churn_args(run.FULL, "v2-joined")[-3:] == ["-proxy", "v2", "-joined"]


def test_instances_run_the_cli_with_the_proxy_flag_only_where_asked() -> None:
    native = scaleout.instance("linux", proxy=True, admin_port=9101)
    assert native.command == (
        "native-py",
        "-m",
        "iocp_echo",
        "--port",
        "{port}",
        "--log-level",
        "INFO",
        "--admin-port",
        "9101",
        "--proxy-protocol",
    )
    assert native.proxy and native.runtime == "linux-3.13" and native.role == "ours"
    wine = scaleout.instance("wine", proxy=False)
    assert wine.command[:2] == ("py", "examples/echo.py") and wine.platform == "wine"
    assert not wine.proxy and "--proxy-protocol" not in wine.command
    assert "--admin-port" not in wine.command


def test_own_run_modes_by_modes_only_and_platform() -> None:
    modes = {"echo", "balanced", "proxy-churn", "workers"}
    assert run.extra_platforms(modes, None, None) == {
        "balanced": ["linux"],  # natively only
        "proxy-churn": ["wine", "linux"],
        "workers": ["wine", "linux"],
    }
    assert run.extra_platforms(modes, None, "wine") == {
        "proxy-churn": ["wine"],
        "workers": ["wine"],
    }
    assert run.extra_platforms(modes, {"winloop"}, None) == {}  # iocp_echo's rows only
    assert run.extra_platforms({"echo", "churn"}, None, None) == {}
    # In the default plan (about 5 minutes of a full run), beside the server list.
    assert run.SCALEOUT_MODES <= run.ALL_MODES & run.OWN_RUN_MODES
    assert not run.EXTRA_MODES & run.ALL_MODES  # workers: only when named


def test_a_run_replaces_the_own_run_rows_it_remeasured_only() -> None:
    kept = [
        {"mode": "balanced", "platform": "linux", "rps": 1},
        {"mode": "proxy-churn", "platform": "wine", "rps": 2},
        {"mode": "proxy-churn", "platform": "linux", "rps": 3},
        {"mode": "echo", "platform": "linux", "rps": 4},
    ]
    left = run.drop_remeasured(kept, {"proxy-churn": ["linux"]})
    assert [r["rps"] for r in left] == [1, 2, 4]


def window(setup: str, rps: float, **extra: Any) -> dict[str, Any]:
    return {
        "server": "iocp_echo",
        "runtime": "linux-3.13",
        "platform": "linux",
        "role": "ours",
        "mode": "proxy-churn",
        "setup": setup,
        "msg_size": 64,
        "concurrency": 20,
        "rps": rps,
        "p99_us": 100,
        "client_cpu": 0.5,
        "failures": 0,
        "server_cpu": 0.9,
    } | extra


def test_repeated_windows_merge_per_setup_into_medians() -> None:
    raw = [
        window("plain", 1000.0, server_us_per_conn=80.0),
        window("v2", 960.0, pair_rps_ratio=0.96, pair_cpu_ratio=1.02, server_us_per_conn=82.0),
        window("plain", 1100.0, server_us_per_conn=81.0),
        window("v2", 1078.0, pair_rps_ratio=0.98, pair_cpu_ratio=1.04, server_us_per_conn=84.0),
        window("plain", 900.0, server_us_per_conn=79.0),
        window("v2", 891.0, pair_rps_ratio=0.99, pair_cpu_ratio=1.01, server_us_per_conn=80.0),
    ]
    merged = {r["setup"]: r for r in run.merge_repeats(raw)}
    assert set(merged) == {"plain", "v2"}  # one record per setup, not one for both
    assert merged["plain"]["rps"] == 1000.0 and merged["plain"]["repeats"] == 3
    assert merged["v2"]["rps"] == 960.0
    assert merged["v2"]["pair_rps_ratio"] == 0.98 and merged["v2"]["pair_cpu_ratio"] == 1.02
    assert merged["v2"]["server_us_per_conn"] == 82.0


def balanced(setup: str, conns: int, rps: float, **extra: Any) -> dict[str, Any]:
    return {
        "server": "go" if setup == "go" else "iocp_echo",
        "runtime": "linux-go" if setup == "go" else "linux-3.13",
        "platform": "linux",
        "role": "reference" if setup == "go" else "ours",
        "mode": "balanced",
        "setup": setup,
        "msg_size": 1024,
        "concurrency": conns,
        "rps": rps,
        "p50_us": 500,
        "p99_us": 2000,
        "client_cpu": 0.6,
        "server_cpu": 0.95,
        "failures": 0,
        "repeats": 3,
        "duration": 2.5,
        "warmup": 0.5,
        "run": "2026-11-30 10:00",
    } | extra


def test_the_balanced_rows_show_the_ratio_to_direct_and_where_the_cpu_went() -> None:
    records = [
        balanced("direct", 100, 100000.0),
        balanced(
            "haproxy",
            100,
            60000.0,
            haproxy_cpu=0.7,
            other_cpu=0.05,
            share_min=0.49,
            haproxy="HAProxy version 2.6.12-1+deb12u4",
        ),
        balanced("go", 100, 180000.0, client_cpu=0.9),
        balanced("direct", 1000, 90000.0),
        balanced(
            "haproxy",
            1000,
            50000.0,
            haproxy_cpu=0.8,
            share_min=0.5,
            proxy_headers=[{"v1": 1, "v2": 2210, "malformed": 0}, {"v1": 1, "v2": 2205}],
        ),
        balanced("go", 1000, 95000.0, client_cpu=0.95),
        window("plain", 1.0),  # another mode's record: not in this section
    ]
    text = report.markdown(records, MACHINE)
    section = text.split("## Behind HAProxy")[1].split("\n## ")[0]
    assert "HAProxy version 2.6.12-1+deb12u4" in section
    assert "HAProxy is not pinned" in section and "2-core machine" in section
    assert "| 1 × iocp_echo, direct | 100 | 100,000 | 1.00× | 500 | 2,000 | 0.95 | – | 0.60 " in (
        section
    )
    assert (
        "| 2 × iocp_echo behind HAProxy | 100 | 60,000 | 0.60× | 500 | 2,000 | 0.95 | 0.70 "
        "| 0.60 | 2.25 | 0.05 | 49% | 0 | 3 |" in section
    )
    assert "| Go's native echo, direct | 1,000 | 95,000 | 1.06× |" in section
    # Headroom: 1.80x at 100 connections is clear, 1.06x at 1,000 is not.
    assert "at 180,000 req/s, 1.80× the fastest iocp_echo row" in section
    assert "not what limits the iocp_echo rows" in section
    assert "1.06× the fastest iocp_echo row" in section and "too close to call" in section
    assert "2.5 s after 0.5 s of warm-up" in section and "run 2026-11-30 10:00" in section
    assert "not quiet" not in section  # others used 0.05 cores at most: not worth a word
    assert "instance 1: v1 1, v2 2,210; instance 2: v1 1, v2 2,205." in section
    busy = [r | {"other_cpu": 0.4} if r["setup"] == "go" else r for r in records]
    assert "The rest of the machine used up to 0.40 cores" in report.markdown(busy, MACHINE)
    # These rows stay out of the suite's own tables.
    assert "| iocp_echo | linux-3.13 | balanced |" not in text


def test_other_processes_cores_are_the_machine_total_less_the_measured_ones() -> None:
    cores = {"machine_cpu": 1.9, "server_cpu": 0.9, "haproxy_cpu": 0.3, "client_cpu": 0.5}
    assert scaleout.other_cpu(cores) == pytest.approx(0.2)
    assert scaleout.other_cpu(cores | {"haproxy_cpu": None}) == pytest.approx(0.5)
    # Samples a few milliseconds apart can make the rest slightly negative: never below 0.
    assert scaleout.other_cpu(cores | {"machine_cpu": 1.6}) == 0.0
    assert scaleout.other_cpu({"server_cpu": 1.0}) is None


def test_the_proxy_header_cost_is_judged_against_five_percent_on_the_paired_ratio() -> None:
    assert report.proxy_goal(0.9504) == "met (costs 5.0%; goal ≤ 5%)"
    assert report.proxy_goal(0.9494) == "missed (costs 5.1%; goal ≤ 5%)"
    assert report.proxy_goal(1.02) == "met (costs -2.0%; goal ≤ 5%)"
    assert report.proxy_goal(None) == "–"
    # On the server's CPU per connection: what a saturated server's rate would lose.
    assert report.proxy_cpu_goal(1.25) == "missed (costs 20.0%; goal ≤ 5%)"
    assert report.proxy_cpu_goal(1.05) == "met (costs 4.8%; goal ≤ 5%)"
    assert report.proxy_cpu_goal(None) == "–"
    records = [
        window("plain", 12000.0, server_us_per_conn=60.0, server_cpu=0.58, repeats=6),
        window(
            "v2",
            11500.0,
            server_us_per_conn=63.0,
            pair_rps_ratio=0.97,
            pair_cpu_ratio=1.05,
            proxy_headers={"v1": 3, "v2": 40000, "malformed": 0},
        ),
        window("v1", 11000.0, server_us_per_conn=64.0, pair_rps_ratio=0.93, pair_cpu_ratio=1.07),
        window("v2-joined", 11900.0, pair_rps_ratio=0.992),
        window("plain", 1600.0, platform="wine", runtime="wine-3.13", server_cpu=0.98),
        window("v2", 1580.0, platform="wine", runtime="wine-3.13", pair_rps_ratio=0.99),
    ]
    text = report.markdown(records, MACHINE)
    section = text.split("## The PROXY header on connection churn")[1]
    native = section.split("### Native Linux")[1]
    assert "| v2 | 11,500 | 0.970× | 0.958× | – | 100 | 63.0 | 1.050× | 0.90 | 0.50 |" in native
    assert "| plain | 12,000 | – | – |" in native
    # A plain server below a core did not set the rate: said natively, not under Wine.
    assert "The server without the header used 0.58 of its core here" in native
    assert "of its core here" not in section.split("### Under Wine")[1].split("### Native")[0]
    assert "v1 3, v2 40,000." in native  # outcomes counted by the server; zeros left out
    assert (
        "| v2 | natively | met (costs 3.0%; goal ≤ 5%) | met (costs 4.8%; goal ≤ 5%) |" in section
    )
    assert (
        "| v1 | natively | missed (costs 7.0%; goal ≤ 5%) | missed (costs 6.5%; goal ≤ 5%) |"
        in section
    )
    assert "| v2 | under Wine | met (costs 1.0%; goal ≤ 5%) | – |" in section
    assert "| v2, in the request's write | 11,900 | 0.992× |" in native
    assert "| v2, in the request's write | natively | met (costs 0.8%; goal ≤ 5%) | – |" in section
    # Rows in a fixed order: plain, v2, v1, then v2 in one write.
    assert native.index("| plain |") < native.index("| v2 |") < native.index("| v1 |")
    assert "| iocp_echo | linux-3.13 | proxy-churn |" not in text


def test_a_run_leaves_a_running_wineserver_alone(tmp_path: Path) -> None:
    """The prefix's wineserver is shared by every Wine program (the tests' too, which start
    and stop Wine programs all the time): a run that stopped it broke theirs."""
    programs = {
        "101": b"C:\\windows\\system32\\services.exe\0",
        "102": b"C:\\windows\\system32\\winedevice.exe\0",
        "103": b"/work/main/.cache/wine/cp313/python.exe\0-m\0pytest\0",
        "104": b"/usr/lib/wine/wineserver64\0-p0\0",
        "105": b"",  # a kernel thread
        "self": b"not a process directory\0",
    }
    for pid, cmdline in programs.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(cmdline)
    (tmp_path / "106").mkdir()  # gone before its command line could be read
    running = run.wine_programs(tmp_path)
    assert sorted(running) == ["python.exe", "services.exe", "winedevice.exe", "wineserver64"]
    assert run.wine_users(running) == ["python.exe"]
    note = run.wineserver_note(running)
    assert note == (
        "already running at the start (shared with python.exe): used as it was, not "
        "restarted, not pinned with the servers"
    )
    assert run.wineserver_note(["wineserver64", "services.exe"]).startswith(
        "already running at the start (shared with Wine's own programs)"
    )
    assert run.wineserver_note([]) == "started by the run, pinned with the servers"
    text = report.markdown([], MACHINE | {"run": "2026-11-30 10:00", "wineserver": note})
    assert "Wine's server was already running at the start (shared with python.exe)" in text
    quiet = report.markdown([], MACHINE | {"wineserver": run.wineserver_note([])})
    assert "Wine's server was" not in quiet
