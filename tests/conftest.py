"""Shared fixtures.

Tests marked ``backend`` need a completion backend: they run in-process on Windows CPython
(under Wine here, via ``tools/winpy.py``) and are deselected, with a line saying so, where
the platform has none.  Tests marked ``wine_cli`` drive the CLI running under Wine from this
(Linux) process; they need ``--wine-python X.Y`` and are deselected without it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

import iocp_echo
from iocp_echo import _platform
from iocp_echo.errors import UnsupportedPlatformError

try:
    _platform.backend()
    HAS_BACKEND = True
except UnsupportedPlatformError:
    HAS_BACKEND = False

_deselected: dict[str, int] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--wine-python",
        metavar="X.Y",
        default=None,
        help="run the wine_cli tests against this Windows CPython under Wine",
    )


@pytest.fixture
def wine_python(request: pytest.FixtureRequest) -> str:
    """The Windows CPython version (``--wine-python X.Y``) the ``wine_cli`` tests run under."""
    version = request.config.getoption("--wine-python")
    assert isinstance(version, str)
    return version


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if HAS_BACKEND:
        return {"proactor": iocp_echo.new_event_loop}
    return {"default": asyncio.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        if item.get_closest_marker("backend") and not HAS_BACKEND:
            _deselected["backend (no completion backend on this OS: run under Wine)"] = (
                _deselected.get("backend (no completion backend on this OS: run under Wine)", 0) + 1
            )
            drop.append(item)
        elif item.get_closest_marker("iocp") and sys.platform != "win32":
            key = "iocp (CPython's IocpProactor internals and bugs: Windows only)"
            _deselected[key] = _deselected.get(key, 0) + 1
            drop.append(item)
        elif item.get_closest_marker("uring") and not sys.platform.startswith("linux"):
            key = "uring (the io_uring backend itself: Linux only)"
            _deselected[key] = _deselected.get(key, 0) + 1
            drop.append(item)
        elif item.get_closest_marker("wine_cli") and not config.getoption("--wine-python"):
            key = "wine_cli (no --wine-python given)"
            _deselected[key] = _deselected.get(key, 0) + 1
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason, count in _deselected.items():
        terminalreporter.write_line(f"deselected {count} test(s) marked {reason}")


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail any test after which asyncio logged an error: an exception in a callback, a task
    exception never retrieved, a transport error.  Our own errors go to ``iocp_echo``."""
    caplog.set_level(logging.DEBUG)
    yield
    gc.collect()
    errors = [
        r for r in caplog.records if r.name.startswith("asyncio") and r.levelno >= logging.ERROR
    ]
    assert not errors, "asyncio logged errors:\n" + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in errors
    )


@pytest.fixture
async def server() -> AsyncIterator[iocp_echo.EchoServer]:
    """A default echo server on a free port; on teardown it must leave nothing behind."""
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as echo_server:
        yield echo_server
    assert_nothing_left(echo_server)


def assert_nothing_left(echo_server: iocp_echo.EchoServer) -> None:
    """The "leave no handles behind" check, through the library's own introspection."""
    assert echo_server.pending_operations() == []
    loop_wide = iocp_echo.pending_operations()
    assert [op.kind for op in loop_wide if op.kind != "wakeup"] == [], loop_wide
    assert echo_server.stats().open_connections == 0
    assert all(sock.fileno() == -1 for sock in echo_server.sockets)
    own_tasks = [
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and "iocp_echo" in repr(t.get_coro())
    ]
    assert own_tasks == []
