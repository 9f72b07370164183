"""LogLimiter: a remote peer can cause at most ``burst + 1`` lines per kind per interval, and
every line it holds back is counted in a summary.  Deterministic: a fake clock, no sleeps."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iocp_echo import _logflood
from iocp_echo._logflood import LogLimiter

LOGGER_NAME = "iocp_echo.test_logflood"
LOST = "connection lost"
REFUSED = "connection refused"
STRUCTURED = ("logflood_kind", "logflood_suppressed", "logflood_by_class")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    return logging.getLogger(LOGGER_NAME)


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER_NAME]


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in lines(caplog) if hasattr(record, "logflood_kind")]


def kind_of(record: logging.LogRecord) -> str:
    """The kind of a summary record, or of a record logged by the property test's script."""
    kind = getattr(record, "logflood_kind", None)
    if kind is None:
        assert isinstance(record.args, tuple)
        kind = record.args[0]
    assert isinstance(kind, str)
    return kind


def lost(limiter: LogLimiter, error_class: str | None, level: int = logging.WARNING) -> bool:
    return limiter.log(LOST, level, "connection from %s lost", "peer", error_class=error_class)


def test_the_first_burst_is_logged_and_the_rest_only_counted(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=3, clock=clock)
    results = [lost(limiter, "ConnectionResetError") for _ in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert [r.getMessage() for r in lines(caplog)] == ["connection from peer lost"] * 3
    assert [r.levelno for r in lines(caplog)] == [logging.WARNING] * 3
    assert limiter.suppressed() == {LOST: {"ConnectionResetError": 7}}


def test_suppressed_lines_are_never_formatted(logger: logging.Logger, clock: FakeClock) -> None:
    formatted: set[int] = set()

    class Peer:
        def __init__(self, number: int) -> None:
            self.number = number

        def __str__(self) -> str:
            formatted.add(self.number)
            return "peer"

    limiter = LogLimiter(logger, burst=2, clock=clock)
    for number in range(50):
        limiter.log(LOST, logging.WARNING, "connection from %s lost", Peer(number))
    assert formatted == {0, 1}  # only the logged lines, formatted by the capture handlers


def test_kinds_have_separate_bursts(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=2, clock=clock)
    for _ in range(5):
        lost(limiter, "ConnectionResetError")
        limiter.log(REFUSED, logging.WARNING, "refusing %s", "peer")
    assert Counter(r.getMessage() for r in lines(caplog)) == {
        "connection from peer lost": 2,
        "refusing peer": 2,
    }
    assert limiter.suppressed() == {
        LOST: {"ConnectionResetError": 3},
        REFUSED: {_logflood.UNCLASSIFIED: 3},
    }


def test_rollover_logs_the_summary_then_a_new_burst(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=2, interval=60.0, clock=clock)
    for cls in ["ConnectionResetError"] * 4 + ["BrokenPipeError"]:
        lost(limiter, cls)
    clock.now += 59.9
    assert not lost(limiter, "ConnectionResetError")  # still the first window
    assert len(lines(caplog)) == 2
    clock.now += 0.1
    assert [lost(limiter, "ConnectionResetError") for _ in range(3)] == [True, True, False]
    records = lines(caplog)
    assert len(records) == 5
    summary = records[2]
    assert summary.getMessage() == (
        "suppressed 4 'connection lost' messages in the last 60 s (at most 2 per 60 s are"
        " logged): ConnectionResetError=3, BrokenPipeError=1"
    )
    assert summary.levelno == logging.WARNING
    assert {name: getattr(summary, name) for name in STRUCTURED} == {
        "logflood_kind": LOST,
        "logflood_suppressed": 4,
        "logflood_by_class": {"ConnectionResetError": 3, "BrokenPipeError": 1},
    }
    assert [r.getMessage() for r in records[3:]] == ["connection from peer lost"] * 2
    # Totals span windows: 4 summarised, 1 pending in the new window.
    assert limiter.suppressed() == {LOST: {"ConnectionResetError": 4, "BrokenPipeError": 1}}


def test_summary_text_for_a_flood_of_resets(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, clock=clock)  # the defaults: 10 per 60 s
    for i in range(10_000):
        clock.now += 0.00005
        lost(limiter, "BrokenPipeError" if i % 50 == 49 else "ConnectionResetError")
    assert len(lines(caplog)) == 10
    clock.now += 60
    limiter.flush()
    (summary,) = summaries(caplog)
    assert summary.getMessage() == (
        "suppressed 9,990 'connection lost' messages in the last 60 s (at most 10 per 60 s are"
        " logged): ConnectionResetError=9,790, BrokenPipeError=200"
    )


def test_summary_is_at_the_highest_suppressed_level(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=1, interval=10, clock=clock)
    for level in (logging.ERROR, logging.INFO, logging.INFO):  # the ERROR one is logged
        lost(limiter, "X", level)
    clock.now += 10
    limiter.flush()
    assert summaries(caplog)[-1].levelno == logging.INFO
    for level in (logging.INFO, logging.INFO, logging.ERROR, logging.WARNING):
        lost(limiter, "X", level)
    clock.now += 10
    limiter.flush()
    assert [r.levelno for r in summaries(caplog)] == [logging.INFO, logging.ERROR]


def test_no_summary_when_nothing_was_suppressed(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=2, interval=10, clock=clock)
    lost(limiter, "X")
    clock.now += 10
    lost(limiter, "X")
    limiter.flush(force=True)
    clock.now += 10
    limiter.flush()
    assert summaries(caplog) == []
    assert len(lines(caplog)) == 2
    assert limiter.suppressed() == {}


def test_flush_logs_only_due_summaries_and_then_starts_afresh(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=1, interval=10, clock=clock)
    lost(limiter, "A")
    lost(limiter, "A")
    clock.now += 5
    limiter.log(REFUSED, logging.WARNING, "refusing")
    limiter.log(REFUSED, logging.WARNING, "refusing")
    clock.now += 5  # LOST's window is over, REFUSED's is not
    limiter.flush()
    assert [kind_of(r) for r in summaries(caplog)] == [LOST]
    # The storm stopped, so the kind is quiet again: its next line opens a window with a burst.
    clock.now += 1
    assert lost(limiter, "A")
    assert not lost(limiter, "A")
    clock.now += 4
    limiter.flush()
    assert [kind_of(r) for r in summaries(caplog)] == [LOST, REFUSED]
    assert (
        summaries(caplog)[1]
        .getMessage()
        .startswith("suppressed 1 'connection refused' message in the last 10 s ")
    )


def test_force_flush_logs_every_pending_summary_without_lifting_the_limit(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=1, interval=60, clock=clock)
    for _ in range(4):
        lost(limiter, "A")
    clock.now += 2.5
    limiter.flush()
    assert summaries(caplog) == []  # not due
    limiter.flush(force=True)
    (first,) = summaries(caplog)
    assert first.getMessage() == (
        "suppressed 3 'connection lost' messages in the last 2.5 s (at most 1 per 60 s are"
        " logged): A=3"
    )
    clock.now += 1
    assert not lost(limiter, "B")  # same window: still limited
    limiter.flush(force=True)
    second = summaries(caplog)[1]
    assert second.getMessage() == (
        "suppressed 1 'connection lost' message in the last 1 s (at most 1 per 60 s are"
        " logged): B=1"
    )
    limiter.flush(force=True)  # nothing pending: nothing logged
    assert len(summaries(caplog)) == 2
    assert limiter.suppressed() == {LOST: {"A": 3, "B": 1}}


def test_error_classes_are_bounded(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=0, clock=clock)
    names = [f"Error{i}" for i in range(40)]
    for name in names * 2:
        lost(limiter, name)
    lost(limiter, None)
    totals = limiter.suppressed()[LOST]
    assert len(totals) == _logflood.MAX_ERROR_CLASSES + 2
    assert totals == {
        **{name: 2 for name in names[: _logflood.MAX_ERROR_CLASSES]},
        _logflood.OTHER: 2 * (40 - _logflood.MAX_ERROR_CLASSES),
        _logflood.UNCLASSIFIED: 1,
    }
    limiter.flush(force=True)
    (summary,) = summaries(caplog)
    assert getattr(summary, "logflood_by_class", None) == totals
    assert summary.getMessage().startswith("suppressed 81 'connection lost' messages ")
    assert summary.getMessage().endswith(
        ": other=48, Error0=2, Error1=2, Error10=2, Error11=2, Error12=2, Error13=2, Error14=2,"
        " Error15=2, Error2=2, Error3=2, Error4=2, Error5=2, Error6=2, Error7=2, Error8=2,"
        " Error9=2, unclassified=1"
    )


def test_a_summary_of_unclassified_lines_has_no_breakdown(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, burst=0, interval=30, clock=clock)
    limiter.log(REFUSED, logging.WARNING, "refusing %s", "peer")
    limiter.log(REFUSED, logging.WARNING, "refusing %s", "peer")
    clock.now += 30
    limiter.flush()
    (summary,) = summaries(caplog)
    assert summary.getMessage() == (
        "suppressed 2 'connection refused' messages in the last 30 s (at most 0 per 30 s are"
        " logged)"
    )


def test_lines_below_the_loggers_level_are_neither_logged_nor_counted(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    logger.setLevel(logging.WARNING)
    limiter = LogLimiter(logger, burst=1, clock=clock)
    assert not lost(limiter, "A", logging.DEBUG)
    assert limiter.suppressed() == {}
    assert lost(limiter, "A", logging.WARNING)  # the DEBUG line did not use up the burst
    assert len(lines(caplog)) == 1


def test_logged_lines_name_the_caller_and_keep_exc_info(
    logger: logging.Logger, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(logger, clock=clock)
    error = ConnectionResetError(104, "Connection reset by peer")
    limiter.log(LOST, logging.ERROR, "lost %s", "peer", exc_info=error)
    (record,) = lines(caplog)
    assert record.pathname == __file__
    assert record.funcName == "test_logged_lines_name_the_caller_and_keep_exc_info"
    assert record.exc_info is not None and record.exc_info[1] is error


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"burst": -1}, "burst"),
        ({"interval": 0}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"max_error_classes": -1}, "max_error_classes"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogLimiter(logging.getLogger(LOGGER_NAME), **kwargs)  # type: ignore[arg-type]


# -- property: bounded output, nothing lost ----------------------------------------------------

BURST, INTERVAL, MAX_CLASSES = 3, 10.0, 2
KINDS = ("a", "b")
CLASSES = ("E1", "E2", "E3", "E4", None)
LEVELS = (logging.INFO, logging.WARNING, logging.ERROR)

# Mostly lines close together, so that windows fill up, with some steps that land exactly on
# or just short of a window's end, and some flushes from the "periodic timer".
events = st.lists(
    st.tuples(
        st.sampled_from(["log"] * 6 + ["flush"]),
        st.sampled_from([0.0] * 6 + [0.5] * 3 + [1.0, 2.5, 9.5, 10.0, 25.0]),
        st.sampled_from(KINDS),
        st.sampled_from(CLASSES),
        st.sampled_from(LEVELS),
    ),
    max_size=150,
)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def property_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(LOGGER_NAME + ".property")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@settings(max_examples=300, deadline=None)
@given(script=events)
def test_output_is_bounded_and_every_line_is_accounted_for(
    property_logger: logging.Logger,
    script: list[tuple[str, float, str, str | None, int]],
) -> None:
    handler = ListHandler()
    property_logger.addHandler(handler)
    try:
        check_script(property_logger, handler, script)
    finally:
        property_logger.removeHandler(handler)


def check_script(
    logger: logging.Logger,
    handler: ListHandler,
    script: list[tuple[str, float, str, str | None, int]],
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(
        logger, burst=BURST, interval=INTERVAL, max_error_classes=MAX_CLASSES, clock=clock
    )
    total: Counter[str] = Counter()
    # The documented windows: a kind's window opens at its first line while none is open, or
    # at its first line once the open one is over; flush() closes windows that are over.
    window_start: dict[str, float] = {}
    events_in_window: Counter[tuple[str, float]] = Counter()
    # Lines per window.  A summary logged by flush() closes its window, so it is counted in
    # the kind's next window (which, opening fresh, has no rollover summary of its own).
    lines_in_window: Counter[tuple[str, float]] = Counter()
    carried: Counter[str] = Counter()
    line_times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    # What the next summary of each kind must say.
    pending_levels: dict[str, list[int]] = {kind: [] for kind in KINDS}
    pending_classes: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    named: dict[str, list[str]] = {kind: [] for kind in KINDS}

    def new_records(start: int) -> tuple[list[logging.LogRecord], list[logging.LogRecord]]:
        plain, summary = [], []
        for record in handler.records[start:]:
            kind = kind_of(record)
            line_times[kind].append(clock.now)
            if hasattr(record, "logflood_kind"):
                assert getattr(record, "logflood_suppressed", None) == len(pending_levels[kind])
                assert record.levelno == max(pending_levels[kind])
                assert getattr(record, "logflood_by_class", None) == pending_classes[kind]
                pending_levels[kind].clear()
                pending_classes[kind].clear()
                summary.append(record)
            else:
                plain.append(record)
        return plain, summary

    for action, dt, kind, cls, level in script:
        clock.now += dt
        before = len(handler.records)
        if action == "flush":
            limiter.flush()
            for open_kind, start in list(window_start.items()):
                if clock.now >= start + INTERVAL:
                    del window_start[open_kind]
            plain, summary = new_records(before)
            assert plain == []
            for record in summary:
                kind = kind_of(record)
                assert kind not in window_start  # only a window that is over is summarised
                carried[kind] += 1
                assert carried[kind] == 1
            continue
        if kind not in window_start or clock.now >= window_start[kind] + INTERVAL:
            window_start[kind] = clock.now
            lines_in_window[kind, clock.now] += carried.pop(kind, 0)
        window = (kind, window_start[kind])
        total[kind] += 1
        events_in_window[window] += 1
        emitted = limiter.log(kind, level, "event %s %s", kind, cls, error_class=cls)
        plain, summary = new_records(before)
        lines_in_window[window] += len(plain) + len(summary)
        # Exactly the first BURST lines of each window are logged, and a summary comes only
        # with the line that opens a window.
        assert emitted == (events_in_window[window] <= BURST)
        assert len(plain) == emitted
        assert not summary or events_in_window[window] == 1
        if not emitted:
            pending_levels[kind].append(level)
            if cls is None:
                name = _logflood.UNCLASSIFIED
            elif cls in named[kind] or len(named[kind]) < MAX_CLASSES:
                name = cls
                if cls not in named[kind]:
                    named[kind].append(cls)
            else:
                name = _logflood.OTHER
            pending_classes[kind][name] += 1

    clock.now += 1
    before = len(handler.records)
    limiter.flush(force=True)
    plain, summary = new_records(before)
    assert plain == []
    assert len(summary) == len({kind_of(r) for r in summary})

    # Nothing lost: every line is logged or counted in exactly one summary.
    for kind in KINDS:
        assert not pending_levels[kind]
        logged = sum(
            1 for r in handler.records if not hasattr(r, "logflood_kind") and kind_of(r) == kind
        )
        summarised = sum(
            getattr(r, "logflood_suppressed", 0)
            for r in handler.records
            if getattr(r, "logflood_kind", None) == kind
        )
        assert logged + summarised == total[kind]
        assert sum(limiter.suppressed().get(kind, {}).values()) == summarised
        assert len(limiter.suppressed().get(kind, {})) <= MAX_CLASSES + 2

    # Bounded: per kind, at most BURST lines plus one summary in each window...
    assert all(count <= BURST + 1 for count in lines_in_window.values()), lines_in_window
    # ...so, windows being at least INTERVAL long, at most 2 * BURST + 1 in any INTERVAL.
    for times in line_times.values():
        for start in times:
            assert sum(start <= t < start + INTERVAL for t in times) <= 2 * BURST + 1
