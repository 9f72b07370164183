"""The private CPython internals iocp_echo relies on, checked on every supported Windows
CPython, and the "unavailable" answers when they are not what is expected.  (They are the
internals of CPython's IocpProactor: on Linux the proactor is iocp_echo's own.)"""

from __future__ import annotations

import asyncio
import types

import pytest

import iocp_echo
from iocp_echo import _private, admin

from .helpers import connect, echo, wait_until

pytestmark = [pytest.mark.backend, pytest.mark.iocp]


async def test_every_internal_is_available_on_this_cpython() -> None:
    assert _private.capabilities(asyncio.get_running_loop()) == {
        "overlapped_cache": None,
        "accept_with_iocp": None,
        "completion_hook": None,
    }


async def test_the_dequeue_replaces_this_cpythons_poll() -> None:
    """iocp_echo's loop replaces IocpProactor._poll: every name it uses is the expected set."""
    from iocp_echo._iocp.loop import IocpDequeue

    proactor = asyncio.get_running_loop()._proactor  # type: ignore[attr-defined]
    assert type(proactor) is IocpDequeue
    _private.check_dequeue(IocpDequeue, proactor)  # raises InternalsUnavailable otherwise
    code = asyncio.IocpProactor._poll.__code__  # type: ignore[attr-defined]
    assert set(code.co_names) == _private._STOCK_POLL_NAMES


async def test_cache_snapshot_shape_and_callback_names(server: iocp_echo.EchoServer) -> None:
    sock = await connect(server.port)
    await wait_until(lambda: server.stats().open_connections == 1)
    entries = _private.overlapped_cache(asyncio.get_running_loop())
    names = {name for _f, _ov, _obj, name in entries}
    assert "finish_accept" in names
    from iocp_echo._iocp.engine import describe_entry

    for future, ov, _obj, _name in entries:
        # CPython's own futures, or the engine's stand-ins (its connection's receive)
        assert isinstance(future, asyncio.Future) or describe_entry(future, ov) is not None
        assert isinstance(ov.address, int) and isinstance(ov.pending, bool)
    assert any(
        describe_entry(f, ov) == ("recv", "pending", 0, describe_entry(f, ov)[3])  # type: ignore[index]
        for f, ov, _obj, _name in entries
        if describe_entry(f, ov) is not None
    )
    sock.close()


@pytest.mark.parametrize(
    ("cache", "reason"),
    [({1: ("not", "four")}, "not .future, ov, obj, callback"), (None, "_cache is missing")],
)
async def test_unexpected_cache_shape_is_reported_not_guessed(
    monkeypatch: pytest.MonkeyPatch, cache: object, reason: str
) -> None:
    changed = types.SimpleNamespace(_cache=cache)  # a proactor of some future CPython
    monkeypatch.setattr(_private, "_proactor", lambda loop: changed)
    with pytest.raises(iocp_echo.IntrospectionUnavailable, match=reason):
        iocp_echo.pending_operations()


async def test_read_buffer_resize_refuses_an_unknown_transport() -> None:
    with pytest.raises(_private.InternalsUnavailable, match="_data"):
        _private.set_read_buffer_size(asyncio.Transport(), 100)


async def test_closed_loop_reports_unavailable() -> None:
    loop = iocp_echo.new_event_loop()
    loop.close()
    with pytest.raises(iocp_echo.IntrospectionUnavailable, match="no _proactor"):
        iocp_echo.pending_operations(loop)


async def test_accept_falls_back_to_public_api_when_internals_are_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(loop: object, listener: object) -> None:
        raise _private.InternalsUnavailable("IocpProactor has no _register_with_iocp/_register")

    monkeypatch.setattr(_private, "accept_with_iocp", unavailable)
    monkeypatch.setattr("iocp_echo._iocp._warned_fallback", False)
    async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
        assert await echo(server.port, b"fallback") == b"fallback"
    assert any("loop.sock_accept" in r.getMessage() for r in caplog.records)


async def test_stats_and_snapshot_say_unavailable_instead_of_failing(
    server: iocp_echo.EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = types.SimpleNamespace(_cache={1: ("not", "four")})
    monkeypatch.setattr(_private, "_proactor", lambda loop: changed)
    stats = server.stats()
    assert stats.pending_unavailable is not None
    assert "not (future, ov, obj, callback) tuples" in stats.pending_unavailable
    snapshot = server.snapshot()
    assert snapshot["operations"] == []
    assert snapshot["operations_unavailable"] == stats.pending_unavailable
    assert "unavailable (" in admin.summary_line(server)
    monkeypatch.undo()  # the fixture's own leak check needs the real cache again
