"""The io_uring loop as a complete asyncio loop: readiness callbacks (``add_reader``...),
signal handlers, pipes and ptys, subprocesses (pidfd and thread child watching), Unix-domain
sockets, and a server that stops accepting the moment it is closed."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import ssl
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import iocp_echo
from iocp_echo import _private

from .helpers import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.uring]

if sys.platform.startswith("linux"):
    from iocp_echo._uring import children, readiness
    from iocp_echo._uring.loop import UringEventLoop

DATA = Path(__file__).parent / "data"


def _loop() -> UringEventLoop:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, UringEventLoop)
    return loop


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


# -- add_reader / add_writer ---------------------------------------------------------------


async def test_reader_is_level_triggered(pair: tuple[socket.socket, socket.socket]) -> None:
    """A callback that reads one byte of three is called again for the rest, as on the
    selector loop (a multishot poll would not: see readiness.py)."""
    r, w = pair
    got = bytearray()
    done = asyncio.Event()

    def one_byte() -> None:
        got.extend(r.recv(1))
        if len(got) == 3:
            done.set()

    loop = _loop()
    loop.add_reader(r, one_byte)
    w.send(b"abc")
    await asyncio.wait_for(done.wait(), 5)
    assert loop.remove_reader(r.fileno()) is True
    assert loop.remove_reader(r.fileno()) is False
    assert bytes(got) == b"abc"


async def test_removing_a_reader_cancels_its_queued_callback(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Both descriptors are ready when watched: both polls complete in the same iteration,
    in submission order; the first callback removes the second watch, whose queued
    callback must then not run."""
    r, w = pair
    loop = _loop()
    calls: list[str] = []
    first_ran = asyncio.Event()

    def first() -> None:
        calls.append("first")
        r.recv(1)
        loop.remove_reader(r)
        loop.remove_reader(w)
        first_ran.set()

    w.send(b"x")  # r readable
    r.send(b"y")  # w readable
    loop.add_reader(r, first)
    loop.add_reader(w, calls.append, "second")
    await asyncio.wait_for(first_ran.wait(), 5)
    for _ in range(3):
        await asyncio.sleep(0)
    assert calls == ["first"]


async def test_replacing_a_reader_keeps_one_watch(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    r, w = pair
    loop = _loop()
    calls: list[str] = []
    ready = asyncio.Event()

    def new() -> None:
        calls.append("new")
        ready.set()

    loop.add_reader(r, calls.append, "old")
    loop.add_reader(r, new)
    kinds = [op.kind for op in loop.proactor.operations()]
    assert kinds.count("reader") == 1
    w.send(b"x")
    await asyncio.wait_for(ready.wait(), 5)
    assert "old" not in calls
    assert loop.remove_reader(r)


async def test_writer_and_pipe_readiness() -> None:
    loop = _loop()
    rfd, wfd = os.pipe()
    try:
        os.set_blocking(wfd, False)
        writable = asyncio.Event()
        loop.add_writer(wfd, writable.set)
        await asyncio.wait_for(writable.wait(), 5)
        assert loop.remove_writer(wfd)
        readable: asyncio.Future[bytes] = loop.create_future()

        def read() -> None:
            if not readable.done():
                readable.set_result(os.read(rfd, 10))

        loop.add_reader(rfd, read)
        os.write(wfd, b"ping")
        assert await asyncio.wait_for(readable, 5) == b"ping"
        assert loop.remove_reader(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


async def test_readers_refuse_closed_loops_bad_fds_and_transport_sockets(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    loop = _loop()
    r, w = pair
    with pytest.raises(ValueError, match="Invalid file"):
        loop.add_reader(-1, print)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.add_reader("nope", print)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=r)
    try:
        with pytest.raises(RuntimeError, match="is used by transport"):
            loop.add_reader(r, print)
        with pytest.raises(RuntimeError, match="is used by transport"):
            loop.remove_writer(r.fileno())
    finally:
        transport.close()
    other = iocp_echo.new_event_loop()
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.add_reader(w, print)
    assert other.remove_reader(w) is False


async def test_watches_end_with_the_loop() -> None:
    rfd, wfd = os.pipe()
    other = iocp_echo.new_event_loop()
    try:
        assert isinstance(other, UringEventLoop)
        other.add_reader(rfd, print)
        other.add_writer(wfd, print)
        assert sorted(op.kind for op in other.proactor.operations()) == ["reader", "writer"]
        proactor = other.proactor
    finally:
        other.close()
        os.close(rfd)
        os.close(wfd)
    assert proactor.operations() == []


def test_fileobj_to_fd() -> None:
    with socket.socket() as sock:
        assert readiness.fileobj_to_fd(sock) == sock.fileno()
    assert readiness.fileobj_to_fd(7) == 7
    with pytest.raises(ValueError, match="Invalid file descriptor"):
        readiness.fileobj_to_fd(-3)


# -- signals --------------------------------------------------------------------------------


async def test_signal_wakes_the_loop_blocked_in_io_uring_enter() -> None:
    """The handler runs although nothing else would wake the loop: the signal is sent from
    a thread once the loop is about to wait (no timer is pending but the test's bound)."""
    loop = _loop()
    got: asyncio.Future[tuple[object, ...]] = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: got.set_result(a), "x", 1)
    try:
        waiting = threading.Event()

        def send() -> None:
            if waiting.wait(5):
                os.kill(os.getpid(), signal.SIGUSR1)

        sender = threading.Thread(target=send)
        sender.start()
        loop.call_soon(waiting.set)
        enters = loop.proactor.enter_calls
        assert await asyncio.wait_for(got, 5) == ("x", 1)
        assert loop.proactor.enter_calls - enters < 50
        sender.join()
    finally:
        assert loop.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


async def test_another_loop_made_and_closed_leaves_the_signals_to_this_one() -> None:
    """asyncio's proactor loop takes the process's wake-up descriptor when made and clears
    it when closed: a loop made and closed beside this one must not silence its signals."""
    loop = _loop()
    arrived = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, arrived.set)
    try:
        iocp_echo.new_event_loop().close()
        kept = iocp_echo.new_event_loop()
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(arrived.wait(), 5)
        kept.close()
        arrived.clear()
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(arrived.wait(), 5)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def test_a_stale_wakeup_descriptor_is_nobodys() -> None:
    """A loop collected unclosed leaves the wake-up descriptor naming a closed socket: the
    next loop takes it over instead of failing to give it back."""
    a, b = socket.socketpair()
    a.setblocking(False)
    previous = signal.set_wakeup_fd(a.fileno())
    a.close()
    b.close()
    try:
        loop = iocp_echo.new_event_loop()
        loop.close()
        assert signal.set_wakeup_fd(-1) == -1
    finally:
        signal.set_wakeup_fd(-1 if previous == a.fileno() else previous)


async def test_signal_handler_replaced_and_removed() -> None:
    loop = _loop()
    calls: list[str] = []
    arrived = asyncio.Event()

    def new() -> None:
        calls.append("new")
        arrived.set()

    loop.add_signal_handler(signal.SIGUSR2, calls.append, "old")
    loop.add_signal_handler(signal.SIGUSR2, new)
    os.kill(os.getpid(), signal.SIGUSR2)
    await asyncio.wait_for(arrived.wait(), 5)
    assert calls == ["new"]
    assert loop.remove_signal_handler(signal.SIGUSR2) is True
    assert loop.remove_signal_handler(signal.SIGUSR2) is False


async def test_removing_sigint_restores_keyboard_interrupt() -> None:
    loop = _loop()
    loop.add_signal_handler(signal.SIGINT, print)
    assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)
    assert loop.remove_signal_handler(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_signal_handler_errors_are_asyncios() -> None:
    loop = _loop()

    async def coroutine() -> None:
        pass

    with pytest.raises(TypeError, match="coroutines cannot be used"):
        loop.add_signal_handler(signal.SIGUSR1, coroutine)
    with pytest.raises(RuntimeError, match="cannot be caught"):
        loop.add_signal_handler(signal.SIGKILL, print)
    with pytest.raises(ValueError, match="invalid signal number"):
        loop.add_signal_handler(signal.NSIG + 10, print)
    with pytest.raises(ValueError, match="invalid signal number"):
        loop.remove_signal_handler(0)
    with pytest.raises(TypeError, match="must be an int"):
        loop.add_signal_handler("SIGUSR1", print)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGKILL) == signal.SIG_DFL


def test_signal_handlers_need_the_main_thread() -> None:
    errors: list[BaseException] = []

    def in_thread() -> None:
        loop = iocp_echo.new_event_loop()
        try:
            loop.add_signal_handler(signal.SIGUSR1, print)
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


def test_closing_the_loop_restores_its_signals() -> None:
    loop = iocp_echo.new_event_loop()
    loop.add_signal_handler(signal.SIGUSR1, print)
    loop.add_signal_handler(signal.SIGINT, print)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- pipes and ptys -------------------------------------------------------------------------


async def test_read_and_write_pipes_move_data_and_eof() -> None:
    loop = _loop()
    rfd, wfd = os.pipe()
    reader = asyncio.StreamReader()
    rtransport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(rfd, "rb", 0)
    )
    wtransport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(wfd, "wb", 0))
    assert "polling" in repr(rtransport)
    payload = os.urandom(1 << 20)  # larger than a pipe's buffer: flow through readiness
    wtransport.write(payload)
    wtransport.close()
    assert await asyncio.wait_for(reader.read(), 10) == payload
    assert rtransport.is_closing()


async def test_write_pipe_sees_its_reader_go() -> None:
    loop = _loop()
    rfd, wfd = os.pipe()
    lost = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(exc)

    transport, _ = await loop.connect_write_pipe(Watch, os.fdopen(wfd, "wb", 0))
    os.close(rfd)
    exc = await asyncio.wait_for(lost, 5)
    assert exc is None or isinstance(exc, BrokenPipeError)
    assert transport.is_closing()


async def test_pty_output_is_read() -> None:
    loop = _loop()
    master, slave = os.openpty()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", 0)
    )
    try:
        os.write(slave, b"over the terminal\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.rstrip(b"\r\n") == b"over the terminal"
    finally:
        transport.close()
        os.close(slave)


# -- subprocesses ---------------------------------------------------------------------------


async def test_subprocess_exec_is_watched_through_a_pidfd() -> None:
    loop = _loop()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; sys.stdout.write(sys.stdin.read().upper())",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert loop._children.watched == 1
    assert "reader" in [op.kind for op in loop.proactor.operations()]
    out, _ = await asyncio.wait_for(process.communicate(b"hi"), 30)
    assert (out, process.returncode) == (b"HI", 0)
    assert loop._children.watched == 0


async def test_subprocess_shell_and_exit_status() -> None:
    process = await asyncio.create_subprocess_shell(
        "echo hi; exit 3", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert (out, process.returncode) == (b"hi\n", 3)


async def test_subprocess_killed_reports_the_signal() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "input()", stdin=asyncio.subprocess.PIPE
    )
    process.kill()
    assert await asyncio.wait_for(process.wait(), 30) == -signal.SIGKILL


async def test_subprocess_without_pidfd_is_waited_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open refused (as under an old seccomp profile)")

    monkeypatch.setattr(children, "pidfd_open", refused)
    loop = _loop()
    process = await asyncio.create_subprocess_exec("echo", "hi", stdout=asyncio.subprocess.PIPE)
    assert loop._children.watched == 0
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert (out, process.returncode) == (b"hi\n", 0)


async def test_failed_spawn_leaves_nothing_watched() -> None:
    with pytest.raises(FileNotFoundError):
        await asyncio.create_subprocess_exec("/nonexistent/program")
    assert _loop()._children.watched == 0


def test_children_outliving_the_loop_are_reaped() -> None:
    """A closing loop stops watching its children; each is reaped by a thread when it
    exits, so none is left a zombie."""
    loop = iocp_echo.new_event_loop()
    stdin_r, stdin_w = os.pipe()
    try:
        transport, _ = loop.run_until_complete(
            loop.subprocess_exec(
                asyncio.SubprocessProtocol,
                sys.executable,
                "-c",
                "import sys; sys.stdin.read()",
                stdin=stdin_r,
                stdout=None,
                stderr=None,
            )
        )
        pid = transport.get_pid()
        assert isinstance(loop, UringEventLoop) and loop._children.watched == 1
    finally:
        os.close(stdin_r)
        loop.close()
    os.close(stdin_w)  # the child reads EOF and exits
    for _ in range(1000):
        try:
            os.kill(pid, 0)  # a zombie still answers
        except ProcessLookupError:
            break
        threading.Event().wait(0.01)
    else:
        pytest.fail(f"child {pid} was left a zombie")
    transport.close()


# -- Unix-domain sockets --------------------------------------------------------------------


async def _echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()


async def test_unix_server_and_connection_by_path(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    path.touch()  # a stale file where the socket goes: replaced only if it is a socket
    with pytest.raises(OSError, match="already in use"):
        await asyncio.start_unix_server(_echo_handler, path)
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a stale socket file: removed
    server = await asyncio.start_unix_server(_echo_handler, path)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over a unix socket\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"over a unix socket\n"
        assert writer.get_extra_info("peername") == str(path)
        writer.close()
        await writer.wait_closed()
    if sys.version_info >= (3, 13):
        assert not path.exists()  # cleanup_socket
    else:
        assert path.exists()


async def test_unix_server_cleanup_is_optional_and_spares_a_replaced_file(
    tmp_path: Path,
) -> None:
    loop = _loop()
    path = tmp_path / "kept.sock"
    server = await loop.create_unix_server(asyncio.Protocol, path, cleanup_socket=False)
    server.close()
    await server.wait_closed()
    assert path.exists()
    server = await loop.create_unix_server(asyncio.Protocol, path, cleanup_socket=True)
    path.unlink()
    path.touch()  # someone else's file now
    server.close()
    await server.wait_closed()
    assert path.exists()


async def test_unix_abstract_namespace_and_sock_argument() -> None:
    name = f"\0iocp_echo-test-{os.getpid()}"
    server = await asyncio.start_unix_server(_echo_handler, name)
    async with server:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(name)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(b"abstract\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"abstract\n"
        writer.close()
        await writer.wait_closed()
    loop = _loop()
    with pytest.raises(ValueError, match="UNIX Domain Stream Socket was expected"):
        await loop.create_unix_server(asyncio.Protocol, sock=socket.socket())
    with pytest.raises(ValueError, match="path and sock"):
        await loop.create_unix_connection(asyncio.Protocol, "/x", sock=socket.socket())
    with pytest.raises(ValueError, match="server_hostname"):
        await loop.create_unix_connection(asyncio.Protocol, "/x", server_hostname="x")


async def test_unix_tls(tmp_path: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(DATA / "localhost.crt", DATA / "localhost.key")
    client_context = ssl.create_default_context(cafile=str(DATA / "localhost.crt"))
    path = tmp_path / "tls.sock"
    server = await asyncio.start_unix_server(_echo_handler, path, ssl=server_context)
    async with server:
        reader, writer = await asyncio.open_unix_connection(
            path, ssl=client_context, server_hostname="localhost"
        )
        writer.write(b"secret\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"secret\n"
        writer.close()
        try:
            await writer.wait_closed()
        except (ssl.SSLError, ConnectionResetError):
            pass


async def test_sock_calls_on_af_unix(tmp_path: Path) -> None:
    loop = _loop()
    path = str(tmp_path / "low.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    try:
        accepted = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, path)
        conn, address = await asyncio.wait_for(accepted, 5)
        assert address == ""  # an unbound client, as socket.accept() says
        with conn:
            await loop.sock_sendall(client, b"x" * 100_000)
            got = bytearray()
            while len(got) < 100_000:
                got += await loop.sock_recv(conn, 65536)
            assert bytes(got) == b"x" * 100_000
    finally:
        client.close()
        listener.close()


# -- servers stop accepting at once -----------------------------------------------------------


async def test_closed_server_refuses_connections_before_the_loop_runs_again() -> None:
    loop = _loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()  # no await: the loop does not run before the connect below
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))
    await server.wait_closed()


# -- the README's example: one loop, a subprocess, SIGTERM and an echo server ---------------


async def test_subprocess_signal_and_echo_on_one_loop() -> None:
    loop = _loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            process = await asyncio.create_subprocess_exec(
                "echo", "hi", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            writer.write(out)
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"hi\n"
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stop.wait(), 5)
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: server.stats().open_connections == 0)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# -- the private CPython internals the loop relies on (iocp_echo._private) -------------------
# (Here rather than in test_private.py, whose tests are CPython's IocpProactor's: Windows only.)


def test_private_unix_pipe_transports_shape() -> None:
    from asyncio import unix_events

    read_class, write_class = _private.unix_pipe_transports()
    assert read_class is getattr(unix_events, "_UnixReadPipeTransport")  # noqa: B009
    assert write_class is getattr(unix_events, "_UnixWritePipeTransport")  # noqa: B009


def test_private_unix_pipe_transports_refuse_a_selector_bound_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Changed(asyncio.ReadTransport):  # a future CPython's transport, asking the selector
        __module__ = "asyncio.unix_events"

        def __init__(self, loop: Any, pipe: Any, protocol: Any, waiter: Any, extra: Any) -> None:
            loop._selector.register(pipe)
            loop._add_reader(pipe)

        def pause_reading(self) -> None:
            self._loop._remove_reader(0)  # type: ignore[attr-defined]

    monkeypatch.setattr("asyncio.unix_events._UnixReadPipeTransport", Changed)
    with pytest.raises(_private.InternalsUnavailable, match="_selector"):
        _private.unix_pipe_transports()


def test_private_unix_subprocess_transport_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncio import base_subprocess, unix_events

    cls = _private.unix_subprocess_transport()
    assert cls is getattr(unix_events, "_UnixSubprocessTransport")  # noqa: B009
    assert issubclass(cls, base_subprocess.BaseSubprocessTransport)

    class NoExitHook(base_subprocess.BaseSubprocessTransport):
        _process_exited = None  # type: ignore[assignment]

    monkeypatch.setattr("asyncio.unix_events._UnixSubprocessTransport", NoExitHook)
    with pytest.raises(_private.InternalsUnavailable, match="_process_exited"):
        _private.unix_subprocess_transport()


def test_private_installed_child_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = iocp_echo.EventLoopPolicy()
    assert _private.installed_child_watcher(policy) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.ThreadedChildWatcher()
        policy.set_child_watcher(watcher)
    assert _private.installed_child_watcher(policy) is watcher
    del policy._watcher  # type: ignore[attr-defined]
    with pytest.raises(_private.InternalsUnavailable, match="_watcher"):
        _private.installed_child_watcher(policy)


async def test_an_installed_child_watcher_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """An application that installed a watcher (3.11-3.13) gets it, as on asyncio's loop."""
    seen: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)

        class Counting(asyncio.ThreadedChildWatcher):
            def add_child_handler(  # type: ignore[override]
                self, pid: int, callback: Any, *args: Any
            ) -> None:
                seen.append(pid)
                super().add_child_handler(pid, callback, *args)

        watcher = Counting()
    monkeypatch.setattr(_private, "installed_child_watcher", lambda policy: watcher)
    process = await asyncio.create_subprocess_exec("true")
    assert await asyncio.wait_for(process.wait(), 30) == 0
    assert seen == [process.pid]
    assert _loop()._children.watched == 0
