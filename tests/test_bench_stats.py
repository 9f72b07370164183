"""The load generator's arithmetic (benchmarks/stats.py): percentiles and rates."""

from __future__ import annotations

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
