"""CPython's own ``test_asyncio`` against iocp_echo's event loop, beside the stock loop.

Usage::

    python3 tools/conformance.py --report         # all six runtimes, never fails
    python3 tools/conformance.py                  # the gate: fails on an unlisted regression
    python3 tools/conformance.py --runtimes linux-3.13 --modules test_server,test_streams

For each runtime (Linux CPython 3.11-3.13 natively, Windows CPython 3.11-3.13 under Wine) and
each module of :data:`MODULES`, the module's tests run twice in a child interpreter of that
runtime: once on the stock loop (the baseline), once with the stock loop's names pointed at
iocp_echo's loop.  A test that passes on the stock loop and not on ours is an *unexpected
failure* unless ``tools/conformance_exceptions.toml`` lists it with a reason; the gate fails on
any unexpected failure.

How "pointed at iocp_echo's loop" is done (the child, :func:`point_at_our_loop`): every way the
tests make the platform's stock loop makes ``iocp_echo.new_event_loop()`` instead --

* the default policy's loop factory (``asyncio.new_event_loop()``, ``asyncio.run()``,
  ``IsolatedAsyncioTestCase``, ``policy.new_event_loop()``);
* the name of the stock loop class in ``asyncio``: ``SelectorEventLoop`` on Linux (the per-loop
  test classes' ``create_event_loop``/``new_loop`` and the tests that build one directly),
  ``ProactorEventLoop`` on Windows; the selector a test passes is closed and ignored;
* ``BaseProactorEventLoop`` in ``test_proactor_events``: ``iocp_echo.EventLoop(proactor)``
  (the test's mock proactor under our loop class).

Tests built on a mock loop (``test_utils.TestLoop``) or that never make a loop run on both sides
alike; the report says how many of the baseline's passes made at least one of our loops
("on our loop").  Per-loop test classes that only repeat the mixin with another selector
(:data:`DROPPED_CLASSES`) are left out of both runs.

Each run is a child process; a test that gives no result within the per-test time limit is a
*hang*: the child is ended and started again on the remaining tests (at most
:data:`MAX_RESTARTS` times; after that the rest count as not run).  Under Wine the test files
come from the native CPython of the same minor version (the embeddable Windows CPython has no
``test`` package), copied to ``.cache/conformance/testlib/``.  Results, logs and the table go
to ``.cache/conformance/``; the baseline of an unchanged interpreter and unchanged test files is
reused from there unless ``--fresh-baseline``.

The child side of this file (``--child``) runs inside the interpreter under test, Windows
CPython included: it imports nothing outside the standard library except ``iocp_echo``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import unittest
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".cache" / "conformance"
EXCEPTIONS_FILE = Path(__file__).resolve().parent / "conformance_exceptions.toml"
VERSIONS = ("3.11", "3.12", "3.13")
RUNTIMES = tuple(f"{kind}-{v}" for kind in ("linux", "wine") for v in VERSIONS)

#: The modules of Lib/test/test_asyncio run on each platform (issue 14's list, plus the
#: platform's own: test_unix_events on Linux, test_windows_events on Windows).
COMMON_MODULES = (
    "test_events",
    "test_sock_lowlevel",
    "test_server",
    "test_streams",
    "test_sendfile",
    "test_buffered_proto",
    "test_protocols",
    "test_subprocess",
    "test_ssl",
    "test_sslproto",
    "test_base_events",
    "test_proactor_events",
)
MODULES = {
    "linux": (*COMMON_MODULES, "test_unix_events"),
    "windows": (*COMMON_MODULES, "test_windows_events"),
}

#: Test classes left out of both runs: each repeats a mixin on a loop that is not the
#: platform's stock loop (another selector), so pointed at ours it would only run the same
#: tests on the same loop again.  Keyed by ``sys.platform``.
DROPPED_CLASSES: dict[str, dict[str, str]] = {
    "linux": {
        "PollEventLoopTests": "the EPoll class runs the same mixin on the default selector",
        "SelectEventLoopTests": "the EPoll class runs the same mixin on the default selector",
    },
    "win32": {
        "SelectEventLoopTests": "selector loop; Windows' stock loop is the proactor",
        "SelectorStartServerTests": "selector loop; Windows' stock loop is the proactor",
        "BufferedProtocolSelectorTests": "selector loop; Windows' stock loop is the proactor",
        "SelectorStartTLSTests": "selector loop; Windows' stock loop is the proactor",
    },
}

#: How many times a run is started again after a hang or crash before the rest count as not run.
MAX_RESTARTS = 6
#: Outcomes that count as passing (an expected failure is how CPython marks a known bug).
PASSING = frozenset({"pass", "xfail"})
#: Where the modules are (the runner's own tests point it at a package of their own).
PACKAGE = "test.test_asyncio"


# --------------------------------------------------------------------------- the child side


class _Recorder(unittest.TestResult):
    """Writes one JSON line per event to the results file as it happens, so that the parent
    knows which test is running when the child hangs or dies."""

    def __init__(self, sink: Any, counter: Callable[[], int], per_test_timeout: float) -> None:
        super().__init__()
        self._sink = sink
        self._counter = counter
        self._timeout = per_test_timeout
        self._outcome = "pass"
        self._detail = ""
        self._started = 0.0
        self._loops_before = 0
        self._current: unittest.TestCase | None = None

    def emit(self, **record: Any) -> None:
        self._sink.write(json.dumps(record) + "\n")
        self._sink.flush()

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._begin(test)
        if self._timeout > 0:
            import faulthandler

            faulthandler.dump_traceback_later(self._timeout, exit=True)

    def _begin(self, test: unittest.TestCase) -> None:
        self._current = test
        self._outcome, self._detail = "pass", ""
        self._started = time.monotonic()
        self._loops_before = self._counter()
        self.emit(kind="start", test=short_id(test.id()))

    def stopTest(self, test: unittest.TestCase) -> None:
        if self._timeout > 0:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        if self._current is not test:
            self._begin(test)  # never started: a skip on 3.12.1 and earlier 3.12s
        self._current = None
        self.emit(
            kind="result",
            test=short_id(test.id()),
            outcome=self._outcome,
            detail=self._detail[-3000:],
            seconds=round(time.monotonic() - self._started, 3),
            our_loops=self._counter() - self._loops_before,
        )

    def _set(self, outcome: str, detail: str) -> None:
        # A failure outranks a later skip or success (e.g. a subtest failed, then the test ended).
        if self._outcome in ("fail", "error") and outcome not in ("fail", "error"):
            return
        self._outcome, self._detail = outcome, detail

    def _format(self, err: Any) -> str:
        kind, value, tb = err
        return "".join(traceback.format_exception(kind, value, tb))

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        if not isinstance(test, unittest.TestCase):
            # setUpClass/setUpModule/tearDownModule: not a test of its own.
            self.emit(kind="fixture", name=str(test), detail=self._format(err)[-3000:])
            return
        self._set("error", self._format(err))

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._set("fail", self._format(err))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        if not isinstance(test, unittest.TestCase):  # a skipped setUpClass or module
            self.emit(kind="fixture", name=str(test), detail=f"skipped: {reason}")
            return
        if self._current is not test:
            self._begin(test)  # skipped before startTest (3.12.1)
        self._set("skip", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._set("xfail", self._format(err))

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._set("fail", "unexpected success")

    def addSubTest(
        self,
        test: unittest.TestCase,
        subtest: unittest.TestCase,
        err: tuple[type[BaseException], BaseException, TracebackType]
        | tuple[None, None, None]
        | None,
    ) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None and err[0] is not None:
            failed = issubclass(err[0], test.failureException)
            self._set("fail" if failed else "error", f"{subtest}: " + self._format(err))


def short_id(test_id: str) -> str:
    """``test.test_asyncio.test_events.EPollEventLoopTests.test_x`` -> ``test_events.EPoll...``."""
    return ".".join(test_id.split(".")[-3:])


def iter_tests(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestSuite):
        for item in suite:
            yield from iter_tests(item)
    else:
        yield suite


def point_at_our_loop(module_name: str, package: str) -> tuple[Callable[[], int], str]:
    """Make every stock loop the tests would build iocp_echo's loop instead.

    Returns a counter of our loops made so far and the class name ``new_event_loop()`` gives.
    """
    import asyncio
    from asyncio import proactor_events

    import iocp_echo

    made = [0]
    building = threading.local()
    stock_name = "ProactorEventLoop" if sys.platform == "win32" else "SelectorEventLoop"
    stock_class: type = getattr(asyncio, stock_name)
    our_classes: set[type] = {iocp_echo.EventLoop}

    def build(*args: Any, **kwargs: Any) -> Any:
        if getattr(building, "active", False):
            # iocp_echo itself asked for the stock class by its public name: give it that.
            return stock_class(*args, **kwargs)
        for argument in (*args, *kwargs.values()):
            close = getattr(argument, "close", None)  # a selector the test chose: unused
            if callable(close):
                close()
        made[0] += 1
        building.active = True
        try:
            loop = iocp_echo.new_event_loop()
        finally:
            building.active = False
        our_classes.add(type(loop))
        return loop

    class _OurLoopMeta(type):
        def __instancecheck__(cls, instance: object) -> bool:
            return isinstance(instance, tuple(our_classes))

        def __subclasscheck__(cls, subclass: type) -> bool:
            return issubclass(subclass, tuple(our_classes))

    class OurLoop(metaclass=_OurLoopMeta):
        """Stands where the stock loop class stood: making one makes iocp_echo's loop."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return build(*args, **kwargs)

    class OurProactorLoop(metaclass=_OurLoopMeta):
        """Stands for ``BaseProactorEventLoop(proactor)`` in test_proactor_events."""

        def __new__(cls, proactor: Any) -> Any:
            made[0] += 1
            return iocp_echo.EventLoop(proactor)  # type: ignore[call-arg]

    asyncio.DefaultEventLoopPolicy._loop_factory = OurLoop  # type: ignore[attr-defined]
    setattr(asyncio, stock_name, OurLoop)
    for events_module in ("asyncio.windows_events", "asyncio.unix_events"):
        if events_module in sys.modules:
            setattr(sys.modules[events_module], stock_name, OurLoop)
    if module_name == "test_proactor_events":
        import importlib

        module = importlib.import_module(f"{package}.{module_name}")
        if getattr(module, "BaseProactorEventLoop", None) is proactor_events.BaseProactorEventLoop:
            setattr(module, "BaseProactorEventLoop", OurProactorLoop)  # noqa: B010
    probe = iocp_echo.new_event_loop()
    kind = f"{type(probe).__module__}.{type(probe).__qualname__}"
    probe.close()
    return (lambda: made[0]), kind


def child_main(options: argparse.Namespace) -> int:
    """Run one module's tests on one loop, writing results to ``options.results``."""
    if options.testlib:
        sys.path.insert(0, options.testlib)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    skip = set()
    for name in (options.exclude, options.only):
        if name and not Path(name).exists():
            raise SystemExit(f"conformance child: no such file {name}")
    if options.exclude:
        skip = set(Path(options.exclude).read_text().split())
    only = set(Path(options.only).read_text().split()) if options.only else None
    never = Path(options.not_run).read_text().split() if options.not_run else []
    with open(options.results, "a", encoding="utf-8") as sink:

        def emit(**record: Any) -> None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        counter: Callable[[], int] = lambda: 0  # noqa: E731
        loop_class = "stock"
        try:
            if options.loop == "ours":
                counter, loop_class = point_at_our_loop(options.module, options.package)
            suite = unittest.defaultTestLoader.loadTestsFromName(
                f"{options.package}.{options.module}"
            )
        except BaseException:
            emit(kind="import_error", detail=traceback.format_exc()[-3000:])
            return 2
        dropped = DROPPED_CLASSES.get(sys.platform, {})
        selected, left_out = [], []
        for test in iter_tests(suite):
            name = short_id(test.id())
            if type(test).__name__ == "_FailedTest":
                emit(kind="import_error", detail=str(getattr(test, "_exception", name))[-3000:])
                return 2
            if type(test).__name__ in dropped or name in skip:
                continue
            if only is not None and name not in only:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in never):
                left_out.append(name)
                continue
            selected.append(test)
        emit(
            kind="meta",
            python=sys.version,
            platform=sys.platform,
            loop_class=loop_class,
            tests=[short_id(test.id()) for test in selected],
            not_run=left_out,
        )
        recorder = _Recorder(sink, counter, options.per_test_timeout)
        unittest.TestSuite(selected).run(recorder)
        emit(kind="end")
    return 0


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    outcome: str  # pass, xfail, fail, error, skip, hang, crash, not run
    detail: str = ""
    seconds: float = 0.0
    our_loops: int = 0


@dataclass
class ModuleRun:
    """What one child run (with its restarts) of one module on one loop gave."""

    tests: dict[str, Outcome] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    fixture_errors: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # listed as not run on either loop
    import_error: str = ""
    python: str = ""
    loop_class: str = ""
    restarts: int = 0
    seconds: float = 0.0
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "tests": {name: vars(result) for name, result in self.tests.items()},
            "order": self.order,
            "fixture_errors": self.fixture_errors,
            "not_run": self.not_run,
            "import_error": self.import_error,
            "python": self.python,
            "loop_class": self.loop_class,
            "restarts": self.restarts,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModuleRun:
        run = cls(
            tests={name: Outcome(**value) for name, value in data["tests"].items()},
            order=list(data["order"]),
            fixture_errors=list(data["fixture_errors"]),
            not_run=list(data["not_run"]),
            import_error=data["import_error"],
            python=data["python"],
            loop_class=data["loop_class"],
            restarts=data["restarts"],
            seconds=data["seconds"],
        )
        return run


def absorb(run: ModuleRun, lines: Iterable[str]) -> str | None:
    """Add the records of one child's results file to *run*; return the test that started
    and never ended (the one running when the child died), if any."""
    running: str | None = None
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the child's death
        kind = record.get("kind")
        if kind == "meta":
            run.python = record["python"]
            run.loop_class = record["loop_class"]
            run.not_run += [name for name in record["not_run"] if name not in run.not_run]
            for name in record["tests"]:
                if name not in run.tests:
                    run.order.append(name)
                    run.tests[name] = Outcome("not run")
        elif kind == "start":
            running = record["test"]
        elif kind == "result":
            name = record["test"]
            if name not in run.tests:
                run.order.append(name)
            run.tests[name] = Outcome(
                record["outcome"], record["detail"], record["seconds"], record["our_loops"]
            )
            running = None
        elif kind == "fixture":
            run.fixture_errors.append(f"{record['name']}: {record['detail']}")
        elif kind == "import_error":
            run.import_error = record["detail"]
    return running


def passed(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.outcome in PASSING


@dataclass
class Listed:
    patterns: list[str]
    reason: str
    platforms: list[str]
    versions: list[str]

    def covers(self, test: str, platform: str, version: str) -> bool:
        if self.platforms and platform not in self.platforms:
            return False
        if self.versions and version not in self.versions:
            return False
        return any(fnmatch.fnmatchcase(test, pattern) for pattern in self.patterns)


@dataclass
class ExceptionsFile:
    """``tools/conformance_exceptions.toml``: ``[[exception]]`` tables list tests our loop
    cannot pass; ``[[not_run]]`` tables list tests run on neither loop (they hang the stock
    loop too, and would only cost the time limit twice)."""

    exceptions: list[Listed]
    not_run: list[Listed]

    def reason(
        self, entries: Sequence[Listed], test: str, platform: str, version: str
    ) -> str | None:
        for entry in entries:
            if entry.covers(test, platform, version):
                return entry.reason
        return None

    def not_run_patterns(self, platform: str, version: str) -> list[str]:
        return [
            pattern
            for entry in self.not_run
            if (not entry.platforms or platform in entry.platforms)
            and (not entry.versions or version in entry.versions)
            for pattern in entry.patterns
        ]


def load_exceptions(text: str) -> ExceptionsFile:
    """Parse the exceptions file: each table has ``tests`` (fnmatch patterns over
    ``module.Class.test``), a non-empty ``reason``, optional ``platforms`` (``linux``,
    ``windows``) and ``versions``."""
    import tomllib

    data = tomllib.loads(text)
    unknown = set(data) - {"exception", "not_run"}
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}: use [[exception]] or [[not_run]]")
    parsed: dict[str, list[Listed]] = {}
    for kind in ("exception", "not_run"):
        parsed[kind] = []
        for number, entry in enumerate(data.get(kind, []), 1):
            reason = str(entry.get("reason", "")).strip()
            tests = entry.get("tests", [])
            if not reason or not tests or not isinstance(tests, list):
                raise ValueError(f"{kind} #{number}: needs a list 'tests' and a 'reason'")
            platforms = list(entry.get("platforms", []))
            if set(platforms) - {"linux", "windows"}:
                raise ValueError(f"{kind} #{number}: platforms are 'linux' and 'windows'")
            versions = [str(v) for v in entry.get("versions", [])]
            parsed[kind].append(Listed(list(tests), reason, platforms, versions))
    return ExceptionsFile(parsed["exception"], parsed["not_run"])


@dataclass
class ModuleReport:
    module: str
    tests: int  # collected on the baseline run
    stock_passed: int
    ours_passed: int  # of the stock passes
    on_our_loop: int  # stock passes during which at least one of our loops was made
    listed: dict[str, str]  # stock pass, ours not, listed: test -> reason
    unexpected: dict[str, str]  # stock pass, ours not, not listed: test -> outcome + first line
    stale: list[str]  # listed, yet passes on ours
    ours_only: list[str]  # passes on ours, not on stock
    not_run: dict[str, str] = field(default_factory=dict)  # run on neither loop: test -> reason


def compare(
    module: str,
    stock: ModuleRun,
    ours: ModuleRun,
    listing: ExceptionsFile,
    platform: str,
    version: str,
) -> ModuleReport:
    """The gating rule: a test that passes on the stock loop and not on ours (failed, errored,
    hung, crashed, skipped, or missing from our run) is unexpected unless listed."""
    report = ModuleReport(module, len(stock.tests), 0, 0, 0, {}, {}, [], [])
    for name in stock.order:
        mine = ours.tests.get(name)
        if not passed(stock.tests[name]):
            if passed(mine):
                report.ours_only.append(name)
            continue
        report.stock_passed += 1
        if mine is not None and mine.our_loops:
            report.on_our_loop += 1
        listed = listing.reason(listing.exceptions, name, platform, version)
        if passed(mine):
            report.ours_passed += 1
            if listed is not None:
                report.stale.append(name)
            continue
        if listed is not None:
            report.listed[name] = listed
        else:
            report.unexpected[name] = describe(mine, ours.import_error)
    for name in stock.not_run:
        report.not_run[name] = listing.reason(listing.not_run, name, platform, version) or "?"
    return report


def describe(outcome: Outcome | None, import_error: str = "") -> str:
    if outcome is None:
        first = import_error.strip().splitlines()[-1:] if import_error else []
        return "missing from our run" + (f": {first[0]}" if first else "")
    lines = [line for line in outcome.detail.strip().splitlines() if line.strip()]
    return outcome.outcome + (f": {lines[-1].strip()[:200]}" if lines else "")


# --------------------------------------------------------------------------- runtimes


@dataclass
class Runtime:
    name: str  # linux-3.13, wine-3.13
    version: str
    windows: bool
    command: list[str]
    env: dict[str, str] | None
    test_dir: Path  # the native CPython's Lib/test, copied for Wine
    testlib: Path | None = None  # the copy's parent, put first on the Windows child's sys.path
    identity: str = ""
    tests_from: str = ""  # the CPython whose Lib/test the runtime runs, e.g. "3.13.0"

    @property
    def platform(self) -> str:
        return "windows" if self.windows else "linux"

    def path(self, path: Path) -> str:
        """*path* as the child sees it."""
        return "Z:" + str(path).replace("/", "\\") if self.windows else str(path)


def native_python(version: str) -> str:
    venv = ROOT / ".cache" / "venv" / version / "bin" / "python"
    if venv.exists():
        return str(venv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import check

    return check.find_interpreter(version)


def probe_native(python: str) -> tuple[str, Path]:
    out = subprocess.run(
        [
            python,
            "-c",
            "import os, sys, test; print(sys.version); print(os.path.dirname(test.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    return out[0], Path(out[1])


def copy_testlib(test_dir: Path, version: str) -> Path:
    """Copy what ``test.test_asyncio`` imports from *test_dir* into the cache; returns the
    folder that holds the copied ``test`` package."""
    target = OUT / "testlib" / version
    stamp = target / ".source"
    if stamp.exists() and stamp.read_text() == tree_digest(test_dir):
        return target
    shutil.rmtree(target, ignore_errors=True)
    package = target / "test"
    package.mkdir(parents=True)
    shutil.copy2(test_dir / "__init__.py", package / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("support", "test_asyncio", "certdata"):
        if (test_dir / part).is_dir():
            shutil.copytree(test_dir / part, package / part, ignore=ignore)
    for extra in test_dir.glob("*.pem"):  # 3.11 keeps some certificates beside the package
        shutil.copy2(extra, package / extra.name)
    stamp.write_text(tree_digest(test_dir))
    return target


def tree_digest(test_dir: Path) -> str:
    digest = hashlib.sha256()
    for part in ("__init__.py", "support", "test_asyncio", "certdata"):
        base = test_dir / part
        files = [base] if base.is_file() else sorted(base.rglob("*"))
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(test_dir)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def make_runtime(name: str) -> Runtime:
    kind, version = name.split("-")
    native = native_python(version)
    native_version, test_dir = probe_native(native)
    if kind == "linux":
        return Runtime(
            name,
            version,
            False,
            [native],
            None,
            test_dir,
            identity=f"{os.path.realpath(native)} {native_version}",
            tests_from=native_version.split()[0],
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import winpy

    exe = winpy.provision(version)
    return Runtime(
        name,
        version,
        True,
        [str(winpy.WINE), str(exe)],
        winpy.wine_environment(),
        test_dir,
        testlib=copy_testlib(test_dir, version),
        identity=f"{winpy.EMBED_RELEASES[version]} {exe.stat().st_size} tests {native_version}",
        tests_from=native_version.split()[0],
    )


# --------------------------------------------------------------------------- running


def run_module(
    runtime: Runtime,
    loop: str,
    module: str,
    per_test_timeout: float,
    not_run: Sequence[str] = (),
    only: Sequence[str] = (),
    package: str = PACKAGE,
) -> ModuleRun:
    """Run *module* on *loop* in child processes of *runtime* until every test has a result."""
    tag = f"{runtime.name}/{loop}-{module}" + ("-retry" if only else "")
    work = OUT / "work" / tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = OUT / "logs" / f"{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = ModuleRun()
    started = time.monotonic()
    with Log(log_path) as log:
        for attempt in range(MAX_RESTARTS + 1):
            results = work / f"results-{attempt}.jsonl"
            command = [
                *runtime.command,
                runtime.path(Path(__file__).resolve()),
                "--child",
                "--loop",
                loop,
                "--module",
                module,
                "--results",
                runtime.path(results),
                "--per-test-timeout",
                str(per_test_timeout),
                "--package",
                package,
            ]
            if runtime.testlib is not None:
                command += ["--testlib", runtime.path(runtime.testlib)]
            done = [name for name, result in run.tests.items() if result.outcome != "not run"]
            if done:
                exclude = work / f"exclude-{attempt}.txt"
                exclude.write_text("\n".join(done) + "\n")
                command += ["--exclude", runtime.path(exclude)]
            if only:
                only_file = work / "only.txt"
                only_file.write_text("\n".join(only) + "\n")
                command += ["--only", runtime.path(only_file)]
            if not_run:
                never = work / "not-run.txt"
                never.write_text("\n".join(not_run) + "\n")
                command += ["--not-run", runtime.path(never)]
            log.write(f"\n### attempt {attempt}: {' '.join(command)}\n".encode())
            status, running, elapsed = run_child(
                command, runtime.env, results, log, per_test_timeout
            )
            with open(results, encoding="utf-8", errors="replace") as f:
                dead_in = absorb(run, f)
            if run.import_error or (status == 0 and dead_in is None):
                break
            culprit = running or dead_in
            if culprit is None:
                break  # died outside any test (e.g. in a fixture): nothing to skip past
            hung = elapsed >= per_test_timeout - 1
            run.tests[culprit] = Outcome(
                "hang" if hung else "crash",
                f"no result within {per_test_timeout:.0f} s" if hung else f"child exited {status}",
                elapsed,
            )
            if culprit not in run.order:
                run.order.append(culprit)
            if not any(result.outcome == "not run" for result in run.tests.values()):
                break
            run.restarts += 1
    run.seconds = round(time.monotonic() - started, 1)
    return run


def run_child(
    command: list[str],
    env: dict[str, str] | None,
    results: Path,
    log: Log,
    per_test_timeout: float,
) -> tuple[int, str | None, float]:
    """Run one child; end its process group when a test overstays.  Returns the exit status,
    the test running at the end (if any) and how long it had been running."""
    results.touch()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # Wine's CPython dies if its stdout is a regular file
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    pump = threading.Thread(target=log.pump, args=(process.stdout,), daemon=True)
    pump.start()
    running: str | None = None
    since = time.monotonic()
    position = 0
    # The child ends itself (faulthandler) when a test overstays; this is the backstop.
    backstop = per_test_timeout + 60
    try:
        while True:
            try:
                status = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            with open(results, "rb") as f:
                f.seek(position)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            position += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                if '"kind": "start"' in line:
                    running, since = json.loads(line)["test"], time.monotonic()
                elif '"kind": "result"' in line:
                    running, since = None, time.monotonic()
            if time.monotonic() - since > backstop:
                kill_group(process)
                status = process.wait()
                break
    finally:
        kill_group(process)  # whatever the tests left running
        # A Wine service the child happened to start (wineserver, services.exe) may hold the
        # pipe long after: do not wait for it; the log drops what comes after it closes.
        pump.join(timeout=10)
    with open(results, "rb") as f:
        f.seek(position)
        for line in f.read().decode("utf-8", "replace").splitlines():
            if '"kind": "start"' in line:
                running, since = json.loads(line)["test"], time.monotonic()
            elif '"kind": "result"' in line:
                running = None
    return status, running, time.monotonic() - since


class Log:
    """A child's output file, written by a pump thread that may outlive the child."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self._lock = threading.Lock()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._file.close()

    def write(self, data: bytes) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(data)
                self._file.flush()

    def pump(self, source: Any) -> None:
        for chunk in iter(lambda: source.read1(65536), b""):
            self.write(chunk)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """End the child and whatever its tests started (its session)."""
    try:
        if sys.platform == "win32":  # the runner's own tests, run under Wine
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def baseline_key(runtime: Runtime, module: str, not_run: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (runtime.identity, tree_digest(runtime.test_dir), module, *not_run):
        digest.update(part.encode() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:24]


@dataclass
class Job:
    runtime: Runtime
    module: str
    stock: ModuleRun | None = None
    ours: ModuleRun | None = None


def run_job(
    job: Job, options: argparse.Namespace, listing: ExceptionsFile, say: Callable[[str], None]
) -> None:
    runtime = job.runtime
    limit = options.per_test_timeout * (options.wine_factor if runtime.windows else 1)
    never = listing.not_run_patterns(runtime.platform, runtime.version)
    key = baseline_key(runtime, job.module, never)
    cache = OUT / "baseline" / f"{runtime.name}-{job.module}-{key}.json"
    if cache.exists() and not options.fresh_baseline:
        job.stock = ModuleRun.from_json(json.loads(cache.read_text()))
        job.stock.cached = True
    else:
        job.stock = run_module(runtime, "stock", job.module, limit, never)
        if not job.stock.import_error and job.stock.restarts == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(job.stock.to_json()))
    job.ours = run_module(runtime, "ours", job.module, limit, never)
    # One more try for what failed quickly on ours and passed on stock: a timing flake should
    # not fail the gate.  Hangs are not retried (each costs the whole time limit again).
    again = [
        name
        for name in job.stock.order
        if passed(job.stock.tests[name])
        and (mine := job.ours.tests.get(name)) is not None
        and mine.outcome in ("fail", "error")
    ]
    if again and len(again) <= options.max_retries:
        retry = run_module(runtime, "ours", job.module, limit, never, only=again)
        for name in again:
            second = retry.tests.get(name)
            if passed(second) and second is not None:
                second.detail = "passed on the second try; first: " + job.ours.tests[name].detail
                job.ours.tests[name] = second
        job.ours.seconds += retry.seconds
    say(
        f"{runtime.name} {job.module}: stock {job.stock.seconds:.0f} s"
        f"{' (cached)' if job.stock.cached else ''}, ours {job.ours.seconds:.0f} s"
        f"{f', {job.ours.restarts} restarts' if job.ours.restarts else ''}"
    )


# --------------------------------------------------------------------------- reporting


@dataclass
class RuntimeReport:
    runtime: str
    python: str
    loop_class: str
    modules: list[ModuleReport]
    stock_seconds: float
    ours_seconds: float
    stock_cached: bool
    tests_from: str = ""

    @property
    def label(self) -> str:
        """``wine-3.13 (3.13.2, tests of 3.13.0)``: under Wine the test files are the native
        CPython's, whose patch release differs."""
        if self.tests_from and self.tests_from != self.python:
            return f"{self.runtime} ({self.python}, tests of {self.tests_from})"
        return f"{self.runtime} ({self.python})"

    def total(self, attribute: str) -> int:
        return sum(int(getattr(module, attribute)) for module in self.modules)

    @property
    def listed(self) -> int:
        return sum(len(module.listed) for module in self.modules)

    @property
    def unexpected(self) -> int:
        return sum(len(module.unexpected) for module in self.modules)


def table(reports: Sequence[RuntimeReport]) -> str:
    lines = [
        "| runtime | modules | ours passed/of | stock passed/of | on our loop "
        "| listed exceptions | unexpected failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        stock, ours = report.total("stock_passed"), report.total("ours_passed")
        lines.append(
            f"| {report.label} | {len(report.modules)} "
            f"| {ours}/{stock} | {stock}/{report.total('tests')} | {report.total('on_our_loop')} "
            f"| {report.listed} | {report.unexpected} |"
        )
    return "\n".join(lines)


def runtime_report(runtime: Runtime, jobs: Sequence[Job], listing: ExceptionsFile) -> RuntimeReport:
    modules = []
    python = loop_class = ""
    for job in jobs:
        assert job.stock is not None and job.ours is not None
        modules.append(
            compare(job.module, job.stock, job.ours, listing, runtime.platform, runtime.version)
        )
        python = python or job.stock.python.split()[0]
        loop_class = loop_class or job.ours.loop_class
    return RuntimeReport(
        runtime.name,
        python,
        loop_class,
        modules,
        round(sum(j.stock.seconds for j in jobs if j.stock and not j.stock.cached), 1),
        round(sum(j.ours.seconds for j in jobs if j.ours), 1),
        all(j.stock.cached for j in jobs if j.stock),
        runtime.tests_from,
    )


def write_json(runtime: Runtime, jobs: Sequence[Job], report: RuntimeReport) -> Path:
    path = OUT / f"{runtime.name}.json"
    data = {
        "runtime": runtime.name,
        "python": report.python,
        "our_loop": report.loop_class,
        "stock_seconds": report.stock_seconds,
        "ours_seconds": report.ours_seconds,
        "modules": {
            module.module: {
                "tests": module.tests,
                "stock_passed": module.stock_passed,
                "ours_passed": module.ours_passed,
                "on_our_loop": module.on_our_loop,
                "listed": module.listed,
                "unexpected": module.unexpected,
                "stale_exceptions": module.stale,
                "not_run": module.not_run,
                "ours_only": module.ours_only,
            }
            for module in report.modules
        },
        "runs": {
            job.module: {"stock": job.stock.to_json(), "ours": job.ours.to_json()}
            for job in jobs
            if job.stock is not None and job.ours is not None
        },
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="report only: exit 0 whatever fails")
    parser.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help="comma-separated, e.g. linux-3.13,wine-3.13"
    )
    parser.add_argument(
        "--modules",
        default="",
        help="comma-separated test_asyncio modules (default: the platform's list)",
    )
    parser.add_argument("--jobs", type=int, default=3, help="child runs at once (default 3)")
    parser.add_argument(
        "--per-test-timeout", type=float, default=30.0, help="seconds natively (default 30)"
    )
    parser.add_argument(
        "--wine-factor", type=float, default=1.5, help="time-limit factor under Wine (default 1.5)"
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=40,
        help="retry ours' quick failures when at most this many",
    )
    parser.add_argument(
        "--fresh-baseline", action="store_true", help="re-run the stock loop even if cached"
    )
    # The child side.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=["stock", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--testlib", help=argparse.SUPPRESS)
    parser.add_argument("--exclude", help=argparse.SUPPRESS)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--not-run", help=argparse.SUPPRESS)
    parser.add_argument("--package", default=PACKAGE, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        return child_main(options)

    listing = load_exceptions(EXCEPTIONS_FILE.read_text())
    names = [name for name in options.runtimes.split(",") if name]
    for name in names:
        if name not in RUNTIMES:
            parser.error(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            print(f"conformance: {message}", flush=True)

    started = time.monotonic()
    runtimes = [make_runtime(name) for name in names]
    jobs: list[Job] = []
    for runtime in runtimes:
        wanted = [m for m in options.modules.split(",") if m] or list(MODULES[runtime.platform])
        jobs += [Job(runtime, module) for module in wanted]
    # Wine's runs are the long ones: start them first so the two workers finish together.
    jobs.sort(key=lambda job: (not job.runtime.windows, job.module != "test_events"))
    with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        for future in [pool.submit(run_job, job, options, listing, say) for job in jobs]:
            future.result()

    reports = []
    for runtime in runtimes:
        mine = [job for job in jobs if job.runtime is runtime]
        report = runtime_report(runtime, mine, listing)
        reports.append(report)
        write_json(runtime, mine, report)
    print_details(reports)
    markdown = table(reports)
    (OUT / "table.md").write_text(markdown + "\n")
    print("\n" + markdown + "\n")
    for report in reports:
        cached = " (baseline cached)" if report.stock_cached else ""
        print(
            f"  {report.runtime}: ours on {report.loop_class}; "
            f"stock {report.stock_seconds:.0f} s{cached}, ours {report.ours_seconds:.0f} s"
        )
    unexpected = sum(report.unexpected for report in reports)
    print(f"conformance: {time.monotonic() - started:.0f} s; results in {OUT.relative_to(ROOT)}/")
    if unexpected and not options.report:
        print(f"conformance: FAILED: {unexpected} unexpected failures (see above)")
        return 1
    return 0


def print_details(reports: Sequence[RuntimeReport]) -> None:
    for report in reports:
        print(f"\n## {report.label}; ours: {report.loop_class}")
        for module in report.modules:
            print(
                f"  {module.module}: ours {module.ours_passed}/{module.stock_passed}, "
                f"stock {module.stock_passed}/{module.tests}, on our loop {module.on_our_loop}, "
                f"listed {len(module.listed)}, unexpected {len(module.unexpected)}"
                + (
                    f", not run on either loop (listed) {len(module.not_run)}"
                    if module.not_run
                    else ""
                )
            )
            for name, why in module.unexpected.items():
                print(f"    UNEXPECTED {name}: {why}")
            for name in module.stale:
                print(f"    listed but passes now (remove from the exceptions file?): {name}")


if __name__ == "__main__":
    sys.exit(main())
