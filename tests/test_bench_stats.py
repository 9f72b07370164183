"""The load generator's arithmetic (benchmarks/stats.py): percentiles and rates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import stats


def test_percentiles_use_the_upper_edge_of_the_rank_bucket() -> None:
    histogram = [[0, 50], [9, 40], [99, 9], [999, 1]]  # 10 us buckets
    assert stats.percentile(histogram, 50, 10) == 10
    assert stats.percentile(histogram, 51, 10) == 100
    assert stats.percentile(histogram, 90, 10) == 100
    assert stats.percentile(histogram, 99, 10) == 1000
    assert stats.percentile(histogram, 99.9, 10) == 10000
    assert stats.percentile(histogram, 100, 10) == 10000
    assert stats.percentile([], 50, 10) is None
    with pytest.raises(ValueError, match="percentile"):
        stats.percentile(histogram, 0, 10)


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=300))
def test_percentiles_agree_with_sorting_the_samples(samples: list[int]) -> None:
    counts: dict[int, int] = {}
    for sample in samples:
        counts[sample] = counts.get(sample, 0) + 1
    histogram = [[bucket, count] for bucket, count in counts.items()]
    ordered = sorted(samples)
    for q in (50, 90, 99, 99.9, 100):
        rank = -(-q * len(samples) // 100)  # ceil
        assert stats.percentile(histogram, q, 1) == ordered[int(rank) - 1] + 1


def test_summary_rates() -> None:
    raw = {
        "elapsed": 2.0,
        "requests": 4096,
        "size": 1024,
        "histogram": [[5, 4096]],
        "bucket_us": 10,
        "failures": 0,
        "client_cpu_s": 0.5,
    }
    summary = stats.summarize(raw)
    assert summary["rps"] == 2048
    assert summary["mib_s"] == 2.0  # 4096 KiB in 2 s
    assert summary["p50_us"] == summary["p999_us"] == 60
    assert summary["client_cpu"] == 0.25


def test_median_of_repeats_and_ratios() -> None:
    merged = stats.median_record(
        [{"rps": 1.0, "p99_us": None}, {"rps": 3.0, "p99_us": 5}, {"rps": 2.0, "p99_us": 7}],
        ["rps", "p99_us"],
    )
    assert merged["rps"] == 2.0 and merged["p99_us"] == 6 and merged["repeats"] == 3
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(None, 2.0) is None


def test_calls_per_echo_from_a_profiling_window() -> None:
    window: dict[str, Any] = {
        "python_calls": 2400,
        "c_calls": 1800,
        "python": [
            ["EchoProtocol.data_received", "echo.py", 14, 200],
            ["Handle._run", "events.py", 87, 150],
            ["BaseEventLoop._run_once", "base_events.py", 1922, 50],
        ],
        "builtin": [["socket.send", 200], ["builtins.len", 100]],
    }
    per = stats.calls_per_echo(window, 200, top=2)
    assert per["py_calls_per_echo"] == 12 and per["c_calls_per_echo"] == 9
    assert per["calls_per_echo"] == 21 and per["echoes"] == 200
    assert per["loop_iterations_per_echo"] == 0.25  # counted beyond the top entries too
    assert per["top_python"] == [
        ["EchoProtocol.data_received (echo.py:14)", 1.0],
        ["Handle._run (events.py:87)", 0.75],
    ]
    assert per["top_c"] == [["socket.send", 1.0], ["builtins.len", 0.5]]
    no_loop = stats.calls_per_echo(window | {"python": window["python"][:1]}, 200)
    assert no_loop["loop_iterations_per_echo"] is None  # a loop in C, or a bare loop
    with pytest.raises(ValueError, match="at least one echo"):
        stats.calls_per_echo(window, 0)
