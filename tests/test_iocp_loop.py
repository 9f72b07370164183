"""iocp_echo's own Windows event loop (``IocpEventLoop`` on the ``IocpDequeue`` proactor): it is
what ``new_event_loop()`` gives, its dequeue keeps every guarantee of ``IocpProactor._poll``,
one engine serves any socket of the loop, and it steps aside when CPython's internals change.

Windows only (marker ``iocp``): under Wine here, on Windows CPython 3.11-3.13."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import types
from typing import Any

import pytest

import iocp_echo
from iocp_echo import _iocp, _platform, _private
from iocp_echo.errors import os_error_code

from .conftest import assert_nothing_left
from .helpers import connect, echo, recv_exactly, reset, wait_until

pytestmark = [pytest.mark.backend, pytest.mark.iocp]


def _loop_module() -> types.ModuleType:
    from iocp_echo._iocp import loop

    return loop


#: asyncio's Windows loop (typeshed knows it on Windows only).
_ProactorEventLoop: Any = getattr(asyncio, "ProactorEventLoop", None)


def _proactor() -> Any:
    return asyncio.get_running_loop()._proactor  # type: ignore[attr-defined]


async def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected (client, accepted) pair through the loop (ConnectEx, AcceptEx)."""
    loop = asyncio.get_running_loop()
    client = socket.socket(listener.family)
    client.setblocking(False)
    accepting = asyncio.ensure_future(loop.sock_accept(listener))
    try:
        await asyncio.wait_for(loop.sock_connect(client, listener.getsockname()[:2]), 10)
        accepted, _ = await asyncio.wait_for(accepting, 10)
    except BaseException:
        accepting.cancel()
        client.close()
        raise
    return client, accepted


async def _foreign_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A pair whose client was connected by a blocking ``connect()`` on another thread: a
    socket the proactor never saw (as ``connect_accepted_socket`` may be given one)."""
    loop = asyncio.get_running_loop()
    accepting = asyncio.ensure_future(loop.sock_accept(listener))
    try:
        client = await asyncio.to_thread(socket.create_connection, listener.getsockname()[:2], 10)
        accepted, _ = await asyncio.wait_for(accepting, 10)
    except BaseException:
        accepting.cancel()
        raise
    client.setblocking(False)
    return client, accepted


def _listener(family: int = socket.AF_INET) -> socket.socket:
    listener = socket.socket(family)
    listener.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    return listener


def _block_until_completed(overlapped: list[Any]) -> None:
    """Wait until the kernel completed every operation (their packets are queued), blocking
    the loop on purpose: no iteration may dequeue them meanwhile."""
    deadline = time.monotonic() + 10
    while any(ov.pending for ov in overlapped):
        assert time.monotonic() < deadline, "operations still pending after 10 s"
        time.sleep(0.001)


def _cached_overlapped(future: asyncio.Future[Any]) -> Any:
    for cached, ov, _obj, _name in _private.overlapped_cache(asyncio.get_running_loop()):
        if cached is future:
            return ov
    return None


# -- which loop ------------------------------------------------------------------------------


async def test_new_event_loop_is_iocp_event_loop_on_its_own_dequeue() -> None:
    loop_module = _loop_module()
    running = asyncio.get_running_loop()  # made by iocp_echo.new_event_loop (conftest)
    assert type(running) is loop_module.IocpEventLoop
    assert type(_proactor()) is loop_module.IocpDequeue
    assert iocp_echo.EventLoop is loop_module.IocpEventLoop
    made = iocp_echo.new_event_loop()
    try:
        assert type(made) is loop_module.IocpEventLoop
        assert isinstance(made, _ProactorEventLoop)
    finally:
        made.close()


async def test_iocp_echo_run_uses_it() -> None:
    def in_thread() -> str:
        async def main() -> str:
            return type(asyncio.get_running_loop()).__name__

        return iocp_echo.run(main())

    assert await asyncio.to_thread(in_thread) == "IocpEventLoop"


# -- the degrade path ------------------------------------------------------------------------


async def test_changed_internals_give_a_plain_proactor_loop_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = asyncio.IocpProactor._poll  # type: ignore[attr-defined]

    def _poll(self: Any, timeout: Any = None) -> None:  # a "future CPython": another dispatch
        self._process_completion_status(None)

    monkeypatch.setattr(asyncio.IocpProactor, "_poll", _poll)  # type: ignore[attr-defined]
    with pytest.raises(_private.InternalsUnavailable, match="_process_completion_status"):
        _private.check_dequeue(_loop_module().IocpDequeue)
    monkeypatch.setattr(_iocp, "_warned_stock_loop", False)
    loops = [iocp_echo.new_event_loop(), iocp_echo.new_event_loop()]
    monkeypatch.setattr(asyncio.IocpProactor, "_poll", original)  # type: ignore[attr-defined]
    try:
        assert [type(loop) for loop in loops] == [_ProactorEventLoop] * 2
    finally:
        for loop in loops:
            loop.close()
    said = [r.getMessage() for r in caplog.records if "event loop is unavailable" in r.getMessage()]
    assert len(said) == 1, said  # once, however many loops
    assert "IocpProactor._poll changed" in said[0] and "_process_completion_status" in said[0]


async def test_made_directly_it_runs_on_the_stock_proactor_when_internals_changed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loop_module = _loop_module()

    def unavailable(proactor_class: type, proactor: object = None) -> None:
        raise _private.InternalsUnavailable("IocpProactor._results is not a list (test)")

    monkeypatch.setattr(_private, "check_dequeue", unavailable)
    monkeypatch.setattr(loop_module, "_warned_stock_proactor", False)
    loop = loop_module.IocpEventLoop()
    try:
        assert type(loop._proactor) is asyncio.IocpProactor  # type: ignore[attr-defined]
    finally:
        loop.close()
    assert any(
        "stock IocpProactor" in r.getMessage() and "(test)" in r.getMessage()
        for r in caplog.records
    )


async def test_the_dequeue_checks_the_state_it_works_on() -> None:
    dequeue = _loop_module().IocpDequeue
    changed = types.SimpleNamespace(
        _iocp=1, _cache={}, _results=(), _unregistered=[], _stopped_serving=None
    )
    with pytest.raises(_private.InternalsUnavailable, match="_results is not a list"):
        _private.check_dequeue(dequeue, changed)
    _private.check_dequeue(dequeue, _proactor())  # the real one passes


async def test_serve_echo_on_a_plain_proactor_loop_renews_the_budget_by_callback() -> None:
    """The engine without iocp_echo's dequeue: more packets than one iteration's budget."""

    def in_thread() -> tuple[bool, bytes]:
        async def main() -> tuple[bool, bytes]:
            async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
                engine: Any = server._engine
                payload = bytes(range(256)) * 4096  # 1 MiB: hundreds of completions
                echoed = await asyncio.gather(*(echo(server.port, payload) for _ in range(4)))
            assert_nothing_left(server)
            return engine.renew_by_callback, b"".join(echoed) if len(set(echoed)) == 1 else b""

        with asyncio.Runner(loop_factory=_ProactorEventLoop) as runner:
            return runner.run(main())

    renew_by_callback, echoed = await asyncio.to_thread(in_thread)
    assert renew_by_callback
    assert echoed == bytes(range(256)) * 4096 * 4


async def test_on_iocp_event_loop_the_dequeue_renews_the_budget(
    server: iocp_echo.EchoServer,
) -> None:
    engine: Any = server._engine
    assert not engine.renew_by_callback
    assert engine in _proactor()._engines
    payload = bytes(range(256)) * 4096
    assert await asyncio.gather(*(echo(server.port, payload) for _ in range(4))) == [payload] * 4


# -- the dequeue keeps _poll's guarantees ----------------------------------------------------


async def test_one_dequeue_handles_every_packet_already_queued() -> None:
    proactor = _proactor()
    with _listener() as listener:
        pairs = [await _pair(listener) for _ in range(8)]
        try:
            reads = [proactor.recv(accepted, 100) for _client, accepted in pairs]
            assert not any(read.done() for read in reads)
            overlapped = [_cached_overlapped(read) for read in reads]
            for number, (client, _accepted) in enumerate(pairs):
                client.send(b"packet %d" % number)
            _block_until_completed(overlapped)
            proactor.select(0)  # one dequeue
            assert [read.result() for read in reads] == [b"packet %d" % n for n in range(8)]
            assert all(_cached_overlapped(read) is None for read in reads)
        finally:
            for pair in pairs:
                for sock in pair:
                    sock.close()


async def test_a_cancelled_receive_is_dequeued_and_the_socket_reads_on() -> None:
    loop = asyncio.get_running_loop()
    proactor = _proactor()
    with _listener() as listener:
        client, accepted = await _pair(listener)
        with client, accepted:
            read = proactor.recv(accepted, 100)
            ov = _cached_overlapped(read)
            assert ov is not None and ov.pending
            read.cancel()  # CancelIoEx; the aborted packet is still to come
            assert read.cancelled()
            await wait_until(lambda: _cached_overlapped(read) is None, what="abort packet")
            assert not ov.pending
            client.send(b"after the cancel")
            assert await asyncio.wait_for(loop.sock_recv(accepted, 100), 10) == b"after the cancel"


async def test_an_accept_pending_when_its_listener_stops_serving_is_cancelled() -> None:
    loop: Any = asyncio.get_running_loop()
    proactor = _proactor()
    listener = _listener()
    accepting = proactor.accept(listener)
    assert not proactor._stopped_alive
    loop._stop_serving(listener)  # what Server.close() does: mark, then close the listener
    assert proactor._stopped_alive
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(accepting, 10)
    del listener
    gc.collect()
    # Nothing holds the listener now: the dequeue no longer asks the WeakSet per packet.
    await wait_until(lambda: not proactor._stopped_alive, what="the weak reference to go")


async def test_closing_an_asyncio_server_leaves_no_accept_behind() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert any(op.kind == "accept" and op.local[1] == port for op in iocp_echo.pending_operations())
    server.close()
    await server.wait_closed()
    await wait_until(
        lambda: not any(op.kind == "accept" for op in iocp_echo.pending_operations()),
        what="the listener's accepts to be dequeued",
    )


def _close_with_pending_operations() -> tuple[bool, dict[int, Any], Any, float]:
    """A loop restarted a few times (its self-pipe read unregistered each time), then closed
    with a receive and an accept of CPython's and an engine connection in flight."""
    loop = iocp_echo.new_event_loop()
    proactor: Any = loop._proactor  # type: ignore[attr-defined]
    listener = _listener()
    held: list[Any] = []

    async def set_up() -> bool:
        client, accepted = await _pair(listener)
        engine_client, engine_side = await _pair(listener)
        engine = _platform.backend().make_engine(loop, max_read=65536)
        transport = engine.connect(
            engine_side, iocp_echo.EchoProtocol(), peer=None, write_high_water=65536, owner=None
        )
        transport.start()
        accepting = _platform.backend().accept(loop, listener)
        held.extend([client, accepted, engine_client, proactor.recv(accepted, 100), accepting])
        await asyncio.sleep(0)
        entries = _private.overlapped_cache(loop)
        # CPython's receive and accept, and the engine's receive, all in flight
        return len(entries) >= 4 and sum(ov.pending for _f, ov, _o, _n in entries) >= 3

    for _ in range(3):
        loop.run_until_complete(asyncio.sleep(0))
    had_pending = loop.run_until_complete(set_up())
    started = time.monotonic()
    loop.close()
    took = time.monotonic() - started
    for item in held:
        if isinstance(item, socket.socket):
            item.close()
    listener.close()
    return had_pending, proactor._cache, proactor._iocp, took


async def test_close_waits_for_every_pending_operation() -> None:
    had_pending, cache, port, took = await asyncio.wait_for(
        asyncio.to_thread(_close_with_pending_operations), 60
    )
    assert had_pending
    assert cache == {}  # every packet dequeued before the port was closed
    assert port is None
    assert took < 10


# -- introspection ---------------------------------------------------------------------------


async def test_pending_operations_lists_the_loops_operations_and_nothing_left_after(
    server: iocp_echo.EchoServer,
) -> None:
    loop = asyncio.get_running_loop()
    asyncio_server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    with _listener() as listener:
        client, accepted = await _pair(listener)
        with client, accepted:
            read = _proactor().recv(accepted, 100)
            engine_client = await connect(server.port)
            try:
                await wait_until(lambda: server.stats().open_connections == 1)
                ops = iocp_echo.pending_operations()
                ports = {op.local[1] for op in ops if op.kind == "accept"}
                assert {server.port, asyncio_server.sockets[0].getsockname()[1]} <= ports
                # CPython's own receive (its callback alone does not say recv from send)
                assert any(op.fileno == accepted.fileno() for op in ops), ops
                assert any(
                    op.kind == "recv" and op.peer == engine_client.getsockname() for op in ops
                ), ops  # the engine's, described from its connection
                assert any(op.kind == "wakeup" for op in ops)
            finally:
                read.cancel()
                engine_client.close()
    asyncio_server.close()
    await asyncio_server.wait_closed()
    server.close()
    await server.wait_closed()
    await wait_until(
        lambda: [op.kind for op in iocp_echo.pending_operations() if op.kind != "wakeup"] == [],
        what="every operation to be dequeued",
    )
    assert_nothing_left(server)


# -- one engine, any socket of the loop ------------------------------------------------------


class Collect(asyncio.Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.done():
            self.done.set_result(bytes(self.data))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def _family_available(family: int) -> bool:
    try:
        _listener(family).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["inet", "inet6"])
async def test_one_engine_serves_accepted_connected_and_unregistered_sockets(
    family: int,
) -> None:
    if not _family_available(family):
        pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
    loop = asyncio.get_running_loop()
    engine: Any = _platform.backend().make_engine(loop, max_read=65536)
    listeners = [_listener(family), _listener(family)]  # two "servers" on the one engine
    clients: list[Collect] = []
    transports: list[Any] = []
    try:
        for number, listener in enumerate(listeners):
            # A client connected through the proactor (ConnectEx: already on the port) and one
            # connected by a blocking connect elsewhere (as connect_accepted_socket gets it).
            if family == socket.AF_INET:
                connected, accepted_a = await _pair(listener)
            else:  # Wine's ConnectEx refuses IPv6 (WinError 10022): asyncio's sock_connect too
                connected, accepted_a = await _foreign_pair(listener)
            foreign, accepted_b = await _foreign_pair(listener)
            for accepted in (accepted_a, accepted_b):
                transport = engine.connect(
                    accepted,
                    iocp_echo.EchoProtocol(),
                    peer=accepted.getpeername(),
                    write_high_water=65536,
                    owner=None,
                )
                transport.start()
                transports.append(transport)
            for sock in (connected, foreign):
                payload = b"%d:" % number + bytes(range(256)) * 400
                collect = Collect(len(payload))
                transport = engine.connect(
                    sock, collect, peer=sock.getpeername(), write_high_water=65536, owner=None
                )
                transport.start()
                transport.write(payload)
                transports.append(transport)
                clients.append(collect)
        results = await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), 30)
        for number, result in enumerate(results):
            assert result == b"%d:" % (number // 2) + bytes(range(256)) * 400
        assert len(engine.transports) == 8
        for transport in transports:
            transport.close()
        await asyncio.wait_for(asyncio.gather(*(c.lost for c in clients)), 10)
        await wait_until(lambda: not engine.transports, what="every connection lost")
        await wait_until(
            lambda: [op.kind for op in iocp_echo.pending_operations() if op.kind != "wakeup"] == [],
            what="every engine operation to be dequeued",
        )
    finally:
        engine.close()
        for listener in listeners:
            listener.close()
    assert engine not in _proactor()._engines


async def test_an_engine_closed_with_connections_open_keeps_serving_them() -> None:
    """Detached from the dequeue, the engine renews its budget by loop callback again."""
    loop = asyncio.get_running_loop()
    engine: Any = _platform.backend().make_engine(loop, max_read=65536)
    with _listener() as listener:
        client, accepted = await _pair(listener)
        with client:
            transport = engine.connect(
                accepted, iocp_echo.EchoProtocol(), peer=None, write_high_water=65536, owner=None
            )
            transport.start()
            engine.close()
            assert engine.renew_by_callback and engine not in _proactor()._engines
            payload = bytes(range(256)) * 2048  # more completions than one budget
            sending = asyncio.ensure_future(loop.sock_sendall(client, payload))
            assert await recv_exactly(client, len(payload)) == payload
            await sending
            transport.close()
            await wait_until(lambda: not engine.transports)


# -- one receive per connection per dequeue ---------------------------------------------------


class _Marks(asyncio.Protocol):
    """Answers the first data, half-closes the peer at once and schedules a callback: records
    whether that callback ran before the end of the stream reached the protocol."""

    def __init__(self, peer: socket.socket) -> None:
        self.peer: Any = peer
        self.marks: list[str] = []
        self.transport: Any = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.marks.append("data")
        self.transport.write(b"roger")
        self.peer.shutdown(socket.SHUT_WR)  # the end of the stream is in the socket now
        asyncio.get_running_loop().call_soon(self.marks.append, "callback")

    def eof_received(self) -> None:
        self.marks.append("eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("rounds", [1, 3], ids=["quiet", "busy"])
async def test_a_second_packet_in_one_dequeue_is_delivered_on_the_next_iteration(
    rounds: int,
) -> None:
    """A connection's second receive packet in one dequeue is handled on the next loop
    iteration: so what the protocol set off (here the peer's end of stream, at once) reaches
    it after the callbacks it scheduled, as on asyncio's own transports.  CPython's
    test_connect_accepted_socket hung on 3.11/3.12 when the reply, the client's close and
    connection_lost all fit in one dequeue, before run_until_complete's stop."""
    loop = asyncio.get_running_loop()
    with _listener() as listener:
        client, accepted = await _pair(listener)
        with client:
            protocol = _Marks(client)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, accepted)
            assert type(transport).__name__ == "IocpTransport"  # the engine's
            for _ in range(rounds - 1):  # woken twice within QUIET_AFTER: BUSY receives
                protocol.peer = _NoShutdown(client)
                await loop.sock_sendall(client, b"ping")
                assert await recv_exactly(client, 5) == b"roger"
            protocol.peer = client
            await loop.sock_sendall(client, b"test data")
            assert await asyncio.wait_for(protocol.lost, 10) is None
            assert await recv_exactly(client, 5) == b"roger"
            assert protocol.marks[-3:] == ["data", "callback", "eof"], protocol.marks


class _NoShutdown:
    """A peer that is not half-closed yet (the rounds before the last)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def shutdown(self, how: int) -> None:
        pass


# -- a connection the peer reset ------------------------------------------------------------


class _EchoUntilLost(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("rounds", [0, 2], ids=["quiet", "busy"])
async def test_a_receive_the_peer_reset_is_lost_with_connection_reset_error(rounds: int) -> None:
    """A pending receive the peer's RST fails completes with ERROR_NETNAME_DELETED, an
    ``OSError`` of no subclass; asyncio's proactor reports it as ``ConnectionResetError`` and
    callers catch ``ConnectionError`` (CPython's test_flush_before_shutdown failed on WinError
    64 from StreamWriter.wait_closed()): the engine's connections report the same class."""
    loop = asyncio.get_running_loop()
    with _listener() as listener:
        client, accepted = await _pair(listener)
        protocol = _EchoUntilLost()
        try:
            made, _ = await loop.connect_accepted_socket(lambda: protocol, accepted)
            assert type(made).__name__ == "IocpTransport"  # the engine's
            transport: Any = made
            for number in range(rounds):  # woken twice within QUIET_AFTER: BUSY receives
                await loop.sock_sendall(client, b"ping %d" % number)
                assert await recv_exactly(client, 6) == b"ping %d" % number
            await wait_until(lambda: transport._read_ov is not None, what="a pending receive")
            assert transport._busy == bool(rounds)
        finally:
            reset(client)
        exc = await asyncio.wait_for(protocol.lost, 10)
        assert isinstance(exc, ConnectionResetError), repr(exc)
        assert os_error_code(exc) in (64, 10054), repr(exc)  # the Windows code is kept
