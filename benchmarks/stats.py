"""The benchmark's arithmetic: rates and latency percentiles from the load generator's raw
counts and histogram.  Kept apart (and unit-tested in tests/test_bench_stats.py) so that the
numbers in the report can be trusted."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

MIB = 1024 * 1024


def percentile(histogram: Sequence[Sequence[int]], q: float, bucket_us: float) -> float | None:
    """The latency, in microseconds, under which *q* percent of requests completed.

    *histogram* is sparse ``[bucket, count]`` pairs, a bucket being ``bucket_us`` wide; the
    answer is the upper edge of the bucket holding the request of rank ``ceil(q% * total)``,
    so it never understates.  None when there were no requests.
    """
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    total = sum(count for _, count in histogram)
    if total == 0:
        return None
    rank = math.ceil(q / 100 * total)
    seen = 0
    for bucket, count in sorted(histogram, key=lambda pair: pair[0]):
        seen += count
        if seen >= rank:
            return (bucket + 1) * bucket_us
    raise AssertionError("unreachable: rank <= total")


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Requests/s, MiB/s (one direction, as vmbench) and p50/p90/p99/p99.9 from one run."""
    elapsed = raw["elapsed"]
    requests = raw["requests"]
    histogram, bucket = raw["histogram"], raw["bucket_us"]
    return {
        "rps": requests / elapsed,
        "mib_s": requests * raw["size"] / MIB / elapsed,
        "p50_us": percentile(histogram, 50, bucket),
        "p90_us": percentile(histogram, 90, bucket),
        "p99_us": percentile(histogram, 99, bucket),
        "p999_us": percentile(histogram, 99.9, bucket),
        "failures": raw["failures"],
        "client_cpu": raw["client_cpu_s"] / elapsed,  # cores the client used
    }


def median_record(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Merge repeated runs: the median of each numeric key (None values ignored)."""
    records = list(records)
    merged = dict(records[0])
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["repeats"] = len(records)
    return merged


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if not ours or not theirs:
        return None
    return ours / theirs


def calls_per_echo(window: dict[str, Any], echoes: int, top: int = 12) -> dict[str, Any]:
    """Per-echo figures from one profiling window (``servers/callcount.py``'s answer to
    ``stop``) that held exactly *echoes* echoed requests.

    ``loop_iterations_per_echo`` counts calls of functions named ``_run_once`` (asyncio's
    loop iteration): None where the loop iterates in C (uvloop, winloop) or has no such
    function (the bare measuring sticks).  ``top_python`` and ``top_c`` name the most
    called functions with their calls per echo.
    """
    if echoes <= 0:
        raise ValueError(f"a window needs at least one echo, got {echoes}")
    python = window["python"]  # [qualified name, file, first line, calls], most called first
    iterations = sum(n for name, _, _, n in python if name.rsplit(".", 1)[-1] == "_run_once")
    return {
        "py_calls_per_echo": window["python_calls"] / echoes,
        "c_calls_per_echo": window["c_calls"] / echoes,
        "calls_per_echo": (window["python_calls"] + window["c_calls"]) / echoes,
        "loop_iterations_per_echo": iterations / echoes if iterations else None,
        "echoes": echoes,
        "top_python": [
            [f"{name} ({file}:{line})", round(n / echoes, 3)]
            for name, file, line, n in python[:top]
        ],
        "top_c": [[name, round(n / echoes, 3)] for name, n in window["builtin"][:top]],
    }
