"""Arguments, platform and loop checks: everything refused before a socket is opened.

These run natively on Linux as well as on Windows CPython under Wine.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

import iocp_echo
from iocp_echo import _platform
from iocp_echo.errors import os_error_code


@pytest.mark.parametrize("port", [-1, 1, 80, 1023, 65536, 100_000])
async def test_port_outside_range_is_refused(port: int) -> None:
    with pytest.raises(iocp_echo.InvalidPortError, match=f"port {port} is out of range"):
        await iocp_echo.serve_echo("127.0.0.1", port)


@pytest.mark.parametrize("port", ["8080", 8080.0, None, True])
async def test_port_of_wrong_type_is_refused(port: object) -> None:
    with pytest.raises(iocp_echo.InvalidPortError, match="port must be an integer"):
        await iocp_echo.serve_echo("127.0.0.1", port)  # type: ignore[arg-type]


def test_invalid_port_error_is_a_value_error() -> None:
    assert issubclass(iocp_echo.InvalidPortError, ValueError)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("max_read", 0, ValueError),
        ("max_read", "1", TypeError),
        ("max_connections", 0, ValueError),
        ("idle_timeout", -1.0, ValueError),
        ("backlog", 0, ValueError),
        ("shutdown_timeout", 0, ValueError),
        ("ssl", "yes", TypeError),
    ],
)
async def test_bad_options_are_refused(name: str, value: object, error: type) -> None:
    with pytest.raises(error, match=name):
        await iocp_echo.serve_echo("127.0.0.1", 0, **{name: value})  # type: ignore[arg-type]


def test_platforms_without_a_completion_backend_are_refused_with_directions() -> None:
    for platform in ("darwin", "freebsd14", "cygwin"):
        with pytest.raises(iocp_echo.UnsupportedPlatformError) as raised:
            _platform.backend(platform)
        assert "Windows" in str(raised.value)
        assert "tools/winpy.py" in str(raised.value)
    assert _platform.backend("win32").NAME.startswith("IOCP")
    expected = "IOCP" if sys.platform == "win32" else "io_uring"
    assert _platform.backend().NAME.startswith(expected)


async def test_serve_echo_refuses_an_unsupported_platform_before_opening_a_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[object] = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr("iocp_echo.server.open_listeners", lambda *a: opened.append(a))
    with pytest.raises(iocp_echo.UnsupportedPlatformError, match="no completion backend"):
        await iocp_echo.serve_echo("127.0.0.1", 0)
    with pytest.raises(iocp_echo.UnsupportedPlatformError):
        iocp_echo.new_event_loop()
    assert opened == []


def test_selector_loop_is_refused_naming_the_loop_and_the_fix() -> None:
    loop = asyncio.SelectorEventLoop()
    try:
        with pytest.raises(iocp_echo.ProactorRequiredError) as raised:
            _platform.require_proactor(loop)
        message = str(raised.value)
        assert "SelectorEventLoop" in message
        assert "iocp_echo.run" in message and "new_event_loop" in message
    finally:
        loop.close()


def test_os_error_code_prefers_winerror() -> None:
    assert os_error_code(OSError(104, "reset")) == 104
    error = OSError(22, "x")
    error.winerror = 10054  # type: ignore[attr-defined]
    assert os_error_code(error) == 10054
    assert os_error_code(ValueError()) is None


@pytest.mark.backend
async def test_serve_echo_on_a_selector_loop_opens_no_socket() -> None:
    """The loop check comes before any socket: run serve_echo on a selector loop in a thread."""

    def attempt() -> BaseException | None:
        loop = asyncio.SelectorEventLoop()
        try:
            loop.run_until_complete(iocp_echo.serve_echo("127.0.0.1", 0))
        except BaseException as exc:
            return exc
        finally:
            loop.close()
        return None

    error = await asyncio.get_running_loop().run_in_executor(None, attempt)
    assert isinstance(error, iocp_echo.ProactorRequiredError)
    assert "SelectorEventLoop" in str(error)


@pytest.mark.backend
async def test_protocol_refuses_a_transport_that_is_not_a_proactor_transport() -> None:
    class FakeTransport(asyncio.Transport):
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    transport = FakeTransport()
    with pytest.raises(iocp_echo.ProactorRequiredError, match="FakeTransport"):
        iocp_echo.EchoProtocol().connection_made(transport)
    assert transport.aborted


@pytest.mark.backend
async def test_port_in_use_names_the_port() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(iocp_echo.AddressInUseError, match=f"port {port} is already in use"):
            await iocp_echo.serve_echo("127.0.0.1", port)
    finally:
        holder.close()


@pytest.mark.backend
async def test_port_zero_reports_the_real_port_and_addresses() -> None:
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        assert server.host == "127.0.0.1"
        assert 1024 <= server.port <= 65535
        assert server.sockets[0].getsockname() == ("127.0.0.1", server.port)
        assert server.backend_name == _platform.backend().NAME
