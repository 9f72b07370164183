"""Rate limits for log lines that a remote peer can trigger.

A server logs each reset, each connection refused past ``max_connections`` and each stuck
operation, and every one of those is caused by someone else: a client that opens and resets
10,000 connections would otherwise write 10,000 WARNING lines in under a second, filling the
disk and burying the lines that matter.  :class:`LogLimiter` bounds that.  Lines are grouped into
*kinds* (a small fixed set the caller chooses, such as ``"connection lost"``): the first
``burst`` lines of a kind in each ``interval`` are logged as they are, with their peer and OS
error code, and the rest are only counted, by kind and by error class.  Once the interval is
over one summary line per kind says how many were suppressed, by error class.  A remote peer can
therefore cause at most ``burst + 1`` lines per kind per interval, whatever it does, and no line
disappears without trace: every suppressed one is counted in exactly one summary.  (nginx keeps
client-caused disconnects out of its error log at high levels for the same reason.)

The limiter only governs the log.  Statistics (``EchoServer.stats()``) keep exact counts of
every event regardless, and :meth:`LogLimiter.suppressed` gives the totals of what was held back.

Windows are per kind: a kind's window opens at its first line after a quiet period and lasts
``interval`` seconds.  A summary is written by the first :meth:`LogLimiter.log` of that kind after
the window is over (which also opens the next window) or by :meth:`LogLimiter.flush`, which the
owner calls from a periodic timer so that a storm that simply stops is still summarised, and
with ``force=True`` when it closes.

Typical use, with one limiter per server, called on the event loop's thread (it takes no
locks)::

    limiter = LogLimiter(logging.getLogger("iocp_echo.connection"))
    ...
    limiter.log(
        "connection lost", logging.WARNING,
        "connection from %s lost: %s: %s (OS error %s)", peer, type(exc).__name__, exc, code,
        error_class=type(exc).__name__,
    )
    ...
    limiter.flush()            # from the periodic stats timer
    limiter.flush(force=True)  # when the server closes
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeAlias

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_INTERVAL",
    "MAX_ERROR_CLASSES",
    "OTHER",
    "UNCLASSIFIED",
    "LogLimiter",
]

#: Lines of one kind logged as they are in each interval.
DEFAULT_BURST = 10
#: Seconds in one interval.
DEFAULT_INTERVAL = 60.0
#: Distinct error-class names remembered per kind; later ones are counted as :data:`OTHER`.
MAX_ERROR_CLASSES = 16
#: The error class of suppressed lines past the first :data:`MAX_ERROR_CLASSES` names.
OTHER = "other"
#: The error class of suppressed lines logged without ``error_class``.
UNCLASSIFIED = "unclassified"
_RESERVED = (OTHER, UNCLASSIFIED)

ExcInfo: TypeAlias = (
    bool
    | BaseException
    | tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None]
    | None
)


class _Window:
    """One kind's current interval: what was logged in it and what is waiting to be summarised."""

    __slots__ = ("by_class", "deadline", "emitted", "level", "pending", "since")

    def __init__(self, now: float, interval: float) -> None:
        self.deadline = now + interval  # the window is over at this clock reading
        self.emitted = 0  # lines logged as they are in this window
        self.since = now  # start of the period the next summary covers
        self.pending = 0  # suppressed since `since`, not yet summarised
        self.level = logging.NOTSET  # highest level among those
        self.by_class: dict[str, int] = {}  # their counts by error class


class LogLimiter:
    """At most *burst* lines per kind per *interval* seconds through *logger*.

    Lines past the burst are not formatted, only counted (by kind and by error class), and
    summarised in one line per kind once the interval is over, at the highest level among the
    lines it stands for.  The set of kinds must be small and fixed (string literals in the
    caller): state is kept per kind.  Error classes are bounded per kind by *max_error_classes*.

    Not thread-safe: use it from one thread, the event loop's.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        max_error_classes: int = MAX_ERROR_CLASSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 0:
            raise ValueError(f"burst must be >= 0, not {burst!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        if max_error_classes < 0:
            raise ValueError(f"max_error_classes must be >= 0, not {max_error_classes!r}")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.max_error_classes = max_error_classes
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        # Suppressed lines since creation, by kind and error class.  The keys of a kind's dict
        # are also the error classes that kind may name (at most max_error_classes, plus OTHER
        # and UNCLASSIFIED), so a window's counts and these totals always agree on names.
        self._totals: dict[str, dict[str, int]] = {}

    def log(
        self,
        kind: str,
        level: int,
        msg: str,
        *args: object,
        error_class: str | None = None,
        exc_info: ExcInfo = None,
    ) -> bool:
        """Log ``msg % args`` at *level* unless *kind* has used up its burst in this interval.

        Returns ``True`` if the line was logged.  ``False`` means it was suppressed and counted
        under *error_class* (typically ``type(exc).__name__``), or that *logger* is not enabled
        for *level*, in which case it is not counted, since it would not have appeared anyway.
        The message is formatted by :mod:`logging` only if it is logged, so pass the values as
        *args* rather than a preformatted string.  A due summary of *kind* is logged first.
        """
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now >= window.deadline:
            if window is not None and window.pending:
                self._summarise(kind, window, now)
            window = self._windows[kind] = _Window(now, self.interval)
        if window.emitted < self.burst:
            window.emitted += 1
            # stacklevel=2: the record names the caller's file and line, not this one.
            self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
            return True
        self._count(kind, window, level, error_class)
        return False

    def flush(self, force: bool = False) -> None:
        """Log the summary of every kind whose interval is over (of every kind, if *force*).

        Without *force*, a kind whose interval is over starts afresh: its next line opens a new
        window with a full burst.  With *force* (meant for closing), every pending summary is
        logged now and the windows carry on, so calling it early does not lift the limit.
        """
        now = self._clock()
        for kind, window in list(self._windows.items()):
            if now >= window.deadline:
                if window.pending:
                    self._summarise(kind, window, now)
                del self._windows[kind]
            elif force and window.pending:
                self._summarise(kind, window, now)
                window.since, window.pending, window.level = now, 0, logging.NOTSET
                window.by_class = {}

    def suppressed(self) -> dict[str, dict[str, int]]:
        """Lines suppressed since creation, summarised or not: ``{kind: {error_class: count}}``.

        Only kinds with at least one suppressed line appear.  A copy: changing it changes
        nothing here.
        """
        return {kind: dict(counts) for kind, counts in self._totals.items()}

    # -- internals ---------------------------------------------------------------------------

    def _count(self, kind: str, window: _Window, level: int, error_class: str | None) -> None:
        totals = self._totals.get(kind)
        if totals is None:
            totals = self._totals[kind] = {}
        if error_class is None:
            name = UNCLASSIFIED
        elif error_class in totals or error_class in _RESERVED:
            name = error_class
        elif len(totals) - sum(reserved in totals for reserved in _RESERVED) < (
            self.max_error_classes
        ):
            name = error_class  # a new name, and there is still room for one
        else:
            name = OTHER
        totals[name] = totals.get(name, 0) + 1
        window.by_class[name] = window.by_class.get(name, 0) + 1
        window.pending += 1
        if level > window.level:
            window.level = level

    def _summarise(self, kind: str, window: _Window, now: float) -> None:
        by_class = sorted(window.by_class.items(), key=lambda item: (-item[1], item[0]))
        if by_class == [(UNCLASSIFIED, window.pending)]:
            breakdown = ""
        else:
            breakdown = ": " + ", ".join(f"{name}={count:,}" for name, count in by_class)
        self.logger.log(
            window.level,
            "suppressed %s %r message%s in the last %s s (at most %d per %s s are logged)%s",
            f"{window.pending:,}",
            kind,
            "" if window.pending == 1 else "s",
            _seconds(now - window.since),
            self.burst,
            _seconds(self.interval),
            breakdown,
            extra={
                "logflood_kind": kind,
                "logflood_suppressed": window.pending,
                "logflood_by_class": dict(window.by_class),
            },
        )


def _seconds(value: float) -> str:
    """Seconds for a person: ``60``, ``61``, ``0.4``, ``2.5``."""
    if value >= 10 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}"
