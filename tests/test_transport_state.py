"""A stateful property test of the completion engine's transport, on both backends.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives one connection at a time
of a server whose protocols are scripted recorders, from both ends:

* the protocol side, either from outside any callback (a rule calls the transport between loop
  runs) or from inside the next data callback (so that the lent view itself can be written):
  pause/resume reading, write the lent view, a copy, the view twice, ``writelines``,
  ``write_eof``, ``close``, ``abort``, raise from the data callback, and ``set_protocol`` to a
  recorder of another kind (a ``LendingProtocol``, a plain ``Protocol``, a ``BufferedProtocol``
  with a tiny buffer);
* the client side, a real non-blocking socket: send pattern bytes (1 byte to past 65,535),
  half-close, reset, read what has come back (now, or continuously), stop reading.

The machine is synchronous: it owns a fresh ``iocp_echo.new_event_loop()`` per example and runs
it inside each rule until the connection is quiet.  Every wait is on a condition with a bounded
deadline, and a deadline passed is a failure naming the condition.  After every step it checks
what asyncio's transport contract and the engines' buffer ownership promise (see
``iocp_echo/_transport.py``, ``iocp_echo/_uring/engine.py``, ``iocp_echo/_iocp/engine.py``):

* what reached the protocol(s) is exactly a prefix of what the client sent, in order, once;
  and, while the protocol reads and the connection is open, all of it;
* no delivery while the protocol has paused reading, or after it called ``close()`` or
  ``abort()``; no protocol callback from inside a transport method the protocol called (but
  ``pause_writing()`` from ``write()``/``writelines()``); no callback to a protocol replaced by
  ``set_protocol()``; ``pause_writing()`` and ``resume_writing()`` alternate;
* ``eof_received()`` at most once, never while paused, and (unless the client reset, which may
  look like an EOF) after the last byte sent and only once the client half-closed;
* ``connection_lost()`` at most once, nothing after it, only with an error the test caused; it
  comes once the transport is aborted, or closed with a client that reads; and then the
  connection's operations end and the client sees the end (EOF or a reset);
* what the client received is a prefix of what the protocol wrote (after an abort too), and,
  when it reads, all of what was written while the transport was open; at a clean EOF too;
* a write after ``write_eof()`` raises ``RuntimeError``, and no other write raises;
* only the deliberate exceptions reach the loop's exception handler, each exactly once (a
  ``BufferOwnershipError`` would show there, or out of ``run_until_complete()``);
* io_uring: the program holds no provided buffer once the loop is quiet; IOCP: a pooled buffer
  is held by a send only while the send is in flight, and a connection that is gone holds none;
  and when the server closes, nothing of it is left (``assert_nothing_left``).

The two tests at the end of this file pin down, deterministically, the two defects this
machine found (``resume_writing()`` from inside ``write_eof()`` on io_uring; the rest of a read
fed to a ``BufferedProtocol`` after it paused).
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import iocp_echo
from iocp_echo._transport import CompletionTransport

from .conftest import assert_nothing_left
from .helpers import reset

pytestmark = pytest.mark.backend

#: Byte *i* a client sends on any connection is ``STREAM[i]``: a reordered, repeated or lost
#: byte shows as a mismatch (no total sent here comes near its length).
STREAM = random.Random(20240601).randbytes(6 << 20)
#: What a protocol writes when it has no view to write (outside a data callback).
REPLIES = random.Random(1931).randbytes(1 << 20)
#: How long any awaited condition may take (generous: other test runs share the 2 cores).
WAIT = 20.0
#: A step is over once every condition holds and nothing changed for this many polls.
QUIET_POLLS = 3
POLL = 0.002

SEND_SIZES = st.one_of(
    st.sampled_from([1, 100, 4096, 65535, 65536, 200_000]), st.integers(1, 70_000)
)
WRITE_SIZES = st.sampled_from([1, 1000, 65536, 300_000])
SWITCHES = ["switch_lending", "switch_plain", "switch_buffered"]
#: What a protocol may do from outside a callback...
OUTSIDE = [
    "pause",
    "resume",
    "write_view",
    "write_view",  # (twice: writes are what most states are about)
    "write_copy",
    "write_twice",
    "write_twice",
    "writelines",
    "write_eof",
    "close",
    "abort",
    *SWITCHES,
]
#: ... and from inside its next data callback (with the view it is given).
INSIDE = [*OUTSIDE, "raise"]

IS_URING = sys.platform.startswith("linux")
#: What the server's factory makes: a LendingProtocol (first: what examples shrink to).
FIRST_KINDS = ["lending", "plain", "buffered"]


class Deliberate(Exception):
    """Raised by a recorder on purpose: the only exception the loop's handler may see."""


class Conn:
    """Everything known about one connection, from both ends; shared by its recorders."""

    def __init__(self, number: int, kind: str, keep_open: bool) -> None:
        self.number = number
        self.kind = kind  # of the protocol the server's factory makes
        self.keep_open = keep_open  # what eof_received() returns
        # -- the client
        self.sock: socket.socket | None = None
        self.outbox = 0  # bytes of STREAM after ``sent`` still to send
        self.sent = 0  # bytes the client's kernel took
        self.want_shut = False
        self.shut = False  # shutdown(SHUT_WR) done (after the outbox drained)
        self.reset = False
        self.reading = False  # drain continuously
        self.eof = False
        self.client_error: OSError | None = None
        self.received = bytearray()
        # -- the protocol side
        self.transport: CompletionTransport | None = None
        self.protocol: Recorder | None = None
        self.delivered = bytearray()
        self.data_calls = 0
        self.written = bytearray()  # every byte a write call accepted (did not raise for)
        self.committed = 0  # ... of which these were written while the transport was open
        self.replies = 0  # offset into REPLIES
        self.paused = False  # as the protocol believes (set before pause_reading())
        self.writing_paused = False
        self.eof_sent = False  # write_eof() was called on an open transport
        self.aborted = False  # abort(), a deliberate raise, or an error in connection_lost
        self.inside: str | None = None  # the transport method the protocol is calling
        self.queue: list[str] = []  # actions for the next data callback
        self.events: list[str] = []
        self.violations: list[str] = []
        self.made = 0
        self.eofs = 0
        self.lost = 0
        self.lost_exc: BaseException | None = None
        self.raised: list[Deliberate] = []
        self.fed: set[str] = set()  # the kinds of recorder that got data
        self.stopped = ""  # "close()" or "abort()" once the protocol called it: no more data

    def __repr__(self) -> str:
        return (
            f"<Conn {self.number} sent={self.sent} outbox={self.outbox} "
            f"delivered={len(self.delivered)} written={len(self.written)} "
            f"committed={self.committed} received={len(self.received)} paused={self.paused} "
            f"events={self.events[-12:]} transport={self.transport!r}>"
        )

    def violation(self, what: str) -> None:
        self.violations.append(f"{what} (events so far: {self.events[-12:]})")

    # -- the protocol's calls into the transport ---------------------------------------------

    def call(self, name: str, method: Callable[..., Any], *args: Any) -> None:
        """Call a transport method, marking that we are inside it (no callback may come)."""
        outer, self.inside = self.inside, name
        try:
            method(*args)
        finally:
            self.inside = outer

    def reply(self, size: int) -> bytes:
        start = self.replies % len(REPLIES)
        self.replies += size
        data = REPLIES[start : start + size]
        return data + REPLIES[: size - len(data)]

    def write(self, parts: Sequence[bytes | memoryview], lines: bool) -> None:
        transport = self.transport
        assert transport is not None
        content = b"".join(bytes(part) for part in parts)  # as it is at the time of writing
        open_before = not transport.is_closing() and not self.aborted
        try:
            if lines:
                self.call("writelines", transport.writelines, list(parts))
            else:
                for part in parts:
                    self.call("write", transport.write, part)
        except RuntimeError as exc:
            if not self.eof_sent:
                self.violation(f"write raised {exc!r} before any write_eof()")
            return
        if self.eof_sent:
            self.violation("a write after write_eof() did not raise RuntimeError")
        self.written += content
        if open_before:
            self.committed = len(self.written)


def act(conn: Conn, action: str, view: memoryview | None, size: int) -> None:
    """Do *action* as the protocol: *view* is the data callback's (None outside one)."""
    transport = conn.transport
    assert transport is not None
    conn.events.append(f"{'in' if view is not None else 'out'}:{action}")
    if action == "pause":
        conn.paused = True  # nothing may be delivered from now on
        conn.call("pause_reading", transport.pause_reading)
    elif action == "resume":
        conn.call("resume_reading", transport.resume_reading)
        conn.paused = False  # from now on (the transport must not deliver before returning)
    elif action in ("write_view", "write_copy", "write_twice", "writelines"):
        data: bytes | memoryview = view if view is not None else memoryview(conn.reply(size))
        if action == "write_copy":
            conn.write([bytes(data)], lines=False)
        elif action == "write_view":
            conn.write([data], lines=False)
        elif action == "write_twice":
            conn.write([data, data], lines=False)
        else:
            conn.write([data, bytes(data[: len(data) // 2]), data], lines=True)
    elif action == "write_eof":
        effective = not transport.is_closing() and not conn.eof_sent
        conn.call("write_eof", transport.write_eof)
        if effective:
            conn.eof_sent = True
    elif action == "close":
        conn.stopped = conn.stopped or "close()"
        conn.call("close", transport.close)
    elif action == "abort":
        conn.stopped = conn.stopped or "abort()"
        conn.aborted = True
        conn.call("abort", transport.abort)
    elif action == "raise":
        assert view is not None, "raise is for data callbacks only"
        conn.aborted = True
        exc = Deliberate(f"deliberate failure #{len(conn.raised)} on connection {conn.number}")
        conn.raised.append(exc)
        raise exc
    elif action in SWITCHES:
        old = conn.protocol
        new = KINDS[action](conn)
        conn.call("set_protocol", transport.set_protocol, new)
        if old is not None:
            old.retired = True
        conn.protocol = new
        if transport.get_protocol() is not new:
            conn.violation("get_protocol() is not the protocol just set")
    else:
        raise AssertionError(f"unknown action {action}")


class Recorder(asyncio.BaseProtocol):
    """The shared half of the three recorders: checks every callback as it comes."""

    kind = "recorder"

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.retired = False

    def _callback(self, what: str, *, allowed_inside: tuple[str, ...] = ()) -> None:
        conn = self.conn
        if self.retired:
            conn.violation(f"{what} to a {self.kind} protocol replaced by set_protocol()")
        if conn.inside is not None and conn.inside not in allowed_inside:
            conn.violation(f"{what} from inside transport.{conn.inside}()")
        if conn.lost:
            conn.violation(f"{what} after connection_lost()")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conn
        self._callback("connection_made")
        conn.events.append("made")
        conn.made += 1
        if conn.made != 1 or conn.data_calls or conn.eofs:
            conn.violation("connection_made() not first, or twice")
        if not isinstance(transport, CompletionTransport):
            conn.violation(f"not an engine transport: {transport!r}")
            return
        conn.transport = transport
        conn.protocol = self

    def _data(self, view: memoryview) -> None:
        conn = self.conn
        self._callback("data")
        conn.data_calls += 1
        if conn.paused:
            conn.violation(f"{len(view)} bytes delivered while reading was paused")
        if conn.stopped:
            conn.violation(f"{len(view)} bytes delivered after the protocol called {conn.stopped}")
        if conn.eofs:
            conn.violation(f"{len(view)} bytes delivered after eof_received()")
        if not len(view):
            conn.violation("an empty delivery")
        conn.delivered += view
        conn.fed.add(self.kind)
        self._run_queue(view)

    def _run_queue(self, view: memoryview) -> None:
        conn = self.conn
        while conn.queue:
            act(conn, conn.queue.pop(0), view, 0)

    def eof_received(self) -> bool:
        conn = self.conn
        self._callback("eof_received")
        conn.events.append("eof")
        conn.eofs += 1
        if conn.eofs > 1:
            conn.violation("eof_received() twice")
        if conn.paused:
            conn.violation("eof_received() while reading was paused")
        if conn.reset:
            # What a reset looks like to the server may be a clean end of stream: under Wine a
            # recv() after the RST returns b"" (Wine consumes the socket's pending error).
            return conn.keep_open
        if not conn.shut:
            conn.violation("eof_received() but the client never half-closed")
        if len(conn.delivered) != conn.sent:
            conn.violation(
                f"eof_received() after {len(conn.delivered)} of the {conn.sent} bytes sent"
            )
        return conn.keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        conn = self.conn
        self._callback("connection_lost")
        conn.events.append(f"lost:{type(exc).__name__}")
        conn.lost += 1
        conn.lost_exc = exc
        if exc is not None:
            conn.aborted = True
            deliberate = any(exc is raised for raised in conn.raised)
            client_caused = isinstance(exc, OSError) and (conn.reset or conn.client_error)
            if not deliberate and not client_caused:
                conn.violation(f"connection_lost({exc!r}) that the test did not cause")

    def pause_writing(self) -> None:
        conn = self.conn
        self._callback("pause_writing", allowed_inside=("write", "writelines"))
        conn.events.append("pause_writing")
        if conn.writing_paused:
            conn.violation("pause_writing() twice")
        conn.writing_paused = True

    def resume_writing(self) -> None:
        conn = self.conn
        self._callback("resume_writing")
        conn.events.append("resume_writing")
        if not conn.writing_paused:
            conn.violation("resume_writing() without pause_writing()")
        conn.writing_paused = False


class LendingRecorder(Recorder, asyncio.Protocol):
    """An ``iocp_echo.LendingProtocol``: lent a view of the engine's own read buffer."""

    kind = "lending"

    def data_lent(self, data: memoryview) -> None:
        self._data(data)


class PlainRecorder(Recorder, asyncio.Protocol):
    kind = "plain"

    def data_received(self, data: bytes) -> None:
        if type(data) is not bytes:
            self.conn.violation(f"data_received() given {type(data).__name__}, not bytes")
        self._data(memoryview(data))


class BufferedRecorder(Recorder, asyncio.BufferedProtocol):
    """A BufferedProtocol with a tiny buffer, reused for every read (writing a view of it
    tests that the transport copies what it cannot send at once)."""

    kind = "buffered"

    def __init__(self, conn: Conn, size: int = 7) -> None:
        super().__init__(conn)
        self.buffer = memoryview(bytearray(size))

    def get_buffer(self, sizehint: int) -> memoryview:
        # Smaller than most reads: the transport feeds one read in several rounds, and the
        # protocol may pause, close or replace itself between two of them.
        self._callback("get_buffer")
        if sizehint <= 0:
            self.conn.violation(f"get_buffer({sizehint})")
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if not 0 < nbytes <= len(self.buffer):
            self.conn.violation(f"buffer_updated({nbytes}) with a {len(self.buffer)}-byte buffer")
        self._data(self.buffer[:nbytes])


KINDS: dict[str, Callable[[Conn], Recorder]] = {
    "switch_lending": LendingRecorder,
    "switch_plain": PlainRecorder,
    "switch_buffered": BufferedRecorder,
}


class TransportMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: iocp_echo.EchoServer | None = None
        self.conns: list[Conn] = []
        self.contexts: list[dict[str, Any]] = []
        self.next_conn: Conn | None = None
        self.made_extra = 0
        self.broken = False  # a step failed: teardown only cleans up

    @property
    def conn(self) -> Conn:
        return self.conns[-1]

    # -- set-up and teardown ----------------------------------------------------------------

    @initialize(
        high_water=st.sampled_from([4096, 65536, 256 * 1024]),
        kind=st.sampled_from(FIRST_KINDS),
        keep_open=st.booleans(),
    )
    def start(self, high_water: int, kind: str, keep_open: bool) -> None:
        loop = self.loop = iocp_echo.new_event_loop()
        loop.set_exception_handler(lambda _loop, context: self.contexts.append(context))

        def factory() -> asyncio.BaseProtocol:
            conn, self.next_conn = self.next_conn, None
            if conn is None:
                self.made_extra += 1
                return asyncio.Protocol()
            return KINDS[f"switch_{conn.kind}"](conn)

        async def serve() -> iocp_echo.EchoServer:
            return await iocp_echo.serve(
                factory,
                "127.0.0.1",
                0,
                write_high_water=high_water,
                shutdown_timeout=2.0,
            )

        self.server = loop.run_until_complete(serve())
        if "engine" not in self.server.engine_name:
            pytest.skip(f"no completion engine here: {self.server.engine_name}")
        self._connect(kind, keep_open)

    def _connect(self, kind: str, keep_open: bool) -> None:
        assert self.server is not None
        conn = Conn(len(self.conns), kind, keep_open)
        self.conns.append(conn)
        self.next_conn = conn
        # A blocking connect while the loop is not running: the kernel completes it, the
        # server accepts it once the loop runs.
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        sock.setblocking(False)
        conn.sock = sock
        self._run(self._settle())

    def teardown(self) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            if self.server is not None and not self.broken:
                loop.run_until_complete(asyncio.wait_for(self._finish(), 4 * WAIT))
            elif self.server is not None:
                # The step's own failure is what hypothesis reports: clean up, bounded.
                conn = self.conns[-1] if self.conns else None
                if conn is not None and conn.sock is not None:
                    conn.sock.close()
                self.server.close()
                try:
                    loop.run_until_complete(asyncio.wait_for(self.server.wait_closed(), WAIT))
                except Exception:
                    pass
        finally:
            self.loop = None
            loop.close()

    async def _client_sees_the_end(self) -> None:
        """The connection is gone (or going): the client, reading, must see EOF or a reset
        (after an EOF, `_drain` has checked that every byte written while open came)."""
        conn = self.conn
        conn.outbox = 0  # sends no more
        conn.reading = True

        def unmet() -> list[str]:
            self._drain()
            if conn.eof or conn.reset or conn.client_error is not None:
                return []
            return ["the client to see EOF or a reset once the server closed"]

        await self._until(unmet)

    async def _finish(self) -> None:
        """Close the server with the connection as it is: a graceful close (the client reads
        everything), then nothing may be left."""
        server = self.server
        assert server is not None
        conn = self.conn
        server.close()
        await self._client_sees_the_end()
        await server.wait_closed()
        await self._until(lambda: [] if conn.lost else ["connection_lost() on shutdown"])
        await self._until(self._gone_unmet)
        if conn.sock is not None and not conn.reset:
            conn.sock.close()
        self._check()
        assert conn.lost == 1, conn
        assert self.made_extra == 0, f"{self.made_extra} connection(s) the test did not make"
        assert_nothing_left(server)
        for conn in self.conns:  # what this example reached (--hypothesis-show-statistics)
            for kind in conn.fed:
                event(f"data delivered to a {kind} recorder")
            for name in ("pause_writing", "in:raise", "in:write_view", "in:pause", "out:resume"):
                if name in conn.events:
                    event(f"event {name}")
            event(f"connection_lost({type(conn.lost_exc).__name__})")
            if conn.eof:
                event("the client saw EOF" + (" after an abort" if conn.aborted else ""))
            if conn.eofs:
                event("eof_received()")

    # -- running the loop -------------------------------------------------------------------

    def _run(self, coro: Any) -> None:
        assert self.loop is not None
        self.broken = True
        self.loop.run_until_complete(coro)
        self.broken = False

    async def _until(self, unmet: Callable[[], list[str]]) -> None:
        """Poll (running the loop) until *unmet* lists nothing; fail after WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while waiting := unmet():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {WAIT} s waiting for {waiting}: {self.conn}")
            await asyncio.sleep(POLL)

    async def _settle(self) -> None:
        """Run the loop, pumping the client, until every condition that must come true has
        (bounded by WAIT) and nothing has changed for QUIET_POLLS polls."""
        deadline = time.monotonic() + WAIT
        quiet, last = 0, None
        while True:
            self._pump()
            waiting = self._unmet()
            now = self._snapshot()
            quiet = quiet + 1 if now == last else 0
            last = now
            if not waiting and quiet >= QUIET_POLLS:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {WAIT} s waiting for {waiting}: {self.conn}")
            await asyncio.sleep(POLL)

    def _snapshot(self) -> tuple[Any, ...]:
        conn = self.conn
        transport = conn.transport
        return (
            len(conn.delivered),
            len(conn.received),
            conn.sent,
            conn.outbox,
            conn.data_calls,
            len(conn.events),
            conn.lost,
            conn.eof,
            transport.get_write_buffer_size() if transport is not None else -1,
        )

    def _pump(self) -> None:
        """The client's side of a poll: send what waits, half-close once it is all sent, and
        drain what came back while it reads."""
        conn = self.conn
        sock = conn.sock
        if sock is None or conn.reset:
            return
        while conn.outbox and conn.client_error is None:
            chunk = STREAM[conn.sent : conn.sent + min(conn.outbox, 1 << 16)]
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                break
            except OSError as exc:  # the server is gone: what was not sent never will be
                conn.client_error = exc
                conn.outbox = 0
                break
            conn.sent += n
            conn.outbox -= n
        if conn.want_shut and not conn.shut and not conn.outbox and conn.client_error is None:
            try:
                sock.shutdown(socket.SHUT_WR)
                conn.shut = True
            except OSError as exc:
                conn.client_error = exc
        if conn.reading:
            self._drain()

    def _drain(self) -> None:
        conn = self.conn
        sock = conn.sock
        if sock is None or conn.reset or conn.eof or conn.client_error is not None:
            return
        while True:
            try:
                data = sock.recv(1 << 17)
            except BlockingIOError:
                return
            except OSError as exc:
                conn.client_error = exc
                return
            if not data:
                conn.eof = True
                self._check_complete_at_eof()
                return
            conn.received += data

    def _check_complete_at_eof(self) -> None:
        """The client saw EOF: if it was the server's FIN, every byte written while the
        transport was open came before it.  It may instead be a reset that looks like EOF
        (under Wine a recv() after an RST returns b""): the server resets when it closes with
        client bytes unread in its socket, so the check applies only when there were none, or
        when the transport had not closed (write_eof() sends a FIN, never a reset)."""
        conn = self.conn
        transport = conn.transport
        if transport is None or conn.aborted:
            return
        if transport.is_closing() and transport.bytes_received != conn.sent:
            return
        if len(conn.received) < conn.committed:
            conn.violation(
                f"the client saw EOF after {len(conn.received)} bytes, but "
                f"{conn.committed} were written while the transport was open"
            )

    def _unmet(self) -> list[str]:
        """What must still come true for the current connection (liveness, each bounded)."""
        conn = self.conn
        transport = conn.transport
        if transport is None:
            return ["connection_made()"]
        unmet = []
        if IS_URING:
            held = self._engine().held_buffers()
            if held:
                unmet.append(f"{held} provided buffer(s) still held by the program")
        if conn.lost:
            return unmet + self._gone_unmet()
        closing = transport.is_closing()
        if not conn.paused and not closing and not conn.reset and conn.client_error is None:
            if conn.outbox:
                unmet.append(f"the server to read the client's {conn.outbox} unsent bytes")
            elif len(conn.delivered) < conn.sent:
                unmet.append(f"delivery of {conn.sent - len(conn.delivered)} more bytes")
            elif conn.shut and not conn.eofs:
                unmet.append("eof_received() after the client half-closed")
        if conn.reset and not conn.paused and not closing and not conn.eofs:
            unmet.append("connection_lost() after the client reset")
        if (
            conn.reading
            and not conn.eof
            and not conn.reset
            and conn.client_error is None
            and not conn.aborted
            and len(conn.received) < conn.committed
        ):
            unmet.append(f"the client to receive {conn.committed - len(conn.received)} bytes")
        if closing and (conn.aborted or conn.reading or transport.get_write_buffer_size() == 0):
            unmet.append("connection_lost() after the transport closed")
        return unmet

    def _gone_unmet(self) -> list[str]:
        """A connection that is gone: its operations end, and it holds no buffer."""
        transport = self.conn.transport
        assert transport is not None
        operations = transport.operations()
        if operations:
            return [f"operations still in flight after connection_lost(): {operations}"]
        if not IS_URING:
            held = [
                name for name in ("_read_buf", "_send_held") if getattr(transport, name) is not None
            ]
            if held:
                return [f"a gone connection still holds pooled buffer(s): {held}"]
        return []

    def _engine(self) -> Any:
        assert self.server is not None
        return self.server._engine

    def _step(self) -> None:
        self._run(self._settle())

    # -- the rules --------------------------------------------------------------------------
    # Every rule first replaces a connection that is gone with a new one (``_revive``): rules
    # stay enabled whatever the state, so hypothesis' swarm testing (which turns rules off
    # per example) never strands an example on a dead connection.

    def _revive(self) -> None:
        conn = self.conn
        if not conn.lost:
            return
        self._run(self._client_sees_the_end())
        if conn.sock is not None and not conn.reset:
            conn.sock.close()
        following = conn.number + 1
        self._connect(FIRST_KINDS[following % len(FIRST_KINDS)], keep_open=following % 2 == 1)

    def _can_send(self) -> bool:
        conn = self.conn
        return conn.lost > 0 or (
            not conn.want_shut
            and not conn.reset
            and conn.client_error is None
            and conn.sent + conn.outbox + 200_000 <= len(STREAM)
        )

    @precondition(_can_send)
    @rule(size=SEND_SIZES)
    def client_send(self, size: int) -> None:
        self._revive()
        self.conn.outbox += size
        self.conn.events.append(f"client:send {size}")
        self._step()

    @precondition(_can_send)
    @rule()
    def client_half_close(self) -> None:
        self._revive()
        self.conn.want_shut = True
        self.conn.events.append("client:half-close")
        self._step()

    @precondition(lambda self: self.conn.lost > 0 or not self.conn.reset)
    @rule()
    def client_reset(self) -> None:
        self._revive()
        conn = self.conn
        assert conn.sock is not None
        conn.events.append("client:reset")
        conn.reset = True
        conn.reading = False
        reset(conn.sock)
        self._step()

    @rule(continuously=st.booleans())
    def client_read(self, continuously: bool) -> None:
        self._revive()
        self.conn.events.append(f"client:read{' on' if continuously else ''}")
        if continuously and not self.conn.reset:
            self.conn.reading = True
        self._drain()
        self._step()

    @rule()
    def client_stop_reading(self) -> None:
        self._revive()
        self.conn.events.append("client:stop reading")
        self.conn.reading = False
        self._step()

    @rule(action=st.sampled_from(OUTSIDE), size=WRITE_SIZES)
    def protocol_now(self, action: str, size: int) -> None:
        """The protocol acts from outside any callback (between loop runs)."""
        self._revive()
        act(self.conn, action, None, size)
        self._step()

    @rule(action=st.sampled_from(INSIDE), then_send=SEND_SIZES)
    def protocol_on_next_data(self, action: str, then_send: int) -> None:
        """Queue *action* for the next data callback, and have the client send (if it can)."""
        self._revive()
        self.conn.queue.append(action)
        if self._can_send():
            self.conn.outbox += then_send
            self.conn.events.append(f"client:send {then_send}")
        self._step()

    # -- what holds after every step --------------------------------------------------------

    @invariant()
    def contract_holds(self) -> None:
        if self.loop is None or not self.conns:
            return
        self.broken = True
        self._check()
        self.broken = False

    def _check(self) -> None:
        for conn in self.conns:
            assert not conn.violations, f"{conn.violations} on {conn}"
            delivered = len(conn.delivered)
            assert delivered <= conn.sent, f"more delivered than sent: {conn}"
            assert conn.delivered == STREAM[:delivered], (
                f"delivered bytes are not the client's stream, in order, once: {conn}"
            )
            received = len(conn.received)
            assert conn.received == conn.written[:received], (
                f"the client received what the protocol did not write: {conn}"
            )
            assert conn.eofs <= 1 and conn.lost <= 1, conn
        conn = self.conn
        transport = conn.transport
        if transport is not None and not conn.lost and not transport.is_closing():
            assert transport.is_reading() == (not conn.paused), (
                f"is_reading() is {transport.is_reading()}, the protocol paused={conn.paused}"
            )
        if transport is not None and not IS_URING:
            iocp: Any = transport
            assert iocp._send_held is None or iocp._send_ov is not None, (
                "a pooled buffer is held for a send that is not in flight"
            )
        raised = [exc for conn in self.conns for exc in conn.raised]
        reported = [context.get("exception") for context in self.contexts]
        unexpected = [c for c in self.contexts if not isinstance(c.get("exception"), Deliberate)]
        assert not unexpected, f"the loop's exception handler got {unexpected}"
        assert sorted(map(id, reported)) == sorted(map(id, raised)), (
            f"deliberate exceptions raised {raised}, reported {reported}"
        )


#: About 8 s natively and 15 s under Wine per CPython (each example is a fresh loop and server).
TransportMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestTransport = TransportMachine.TestCase


class _WritesViewThenEof(asyncio.Protocol):
    """Writes the lent view of its first read, then calls write_eof(), noting whether a
    protocol callback came from inside write_eof()."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.inside: str | None = None
        self.calls_inside: list[str] = []
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_lent(self, view: memoryview) -> None:
        assert self.transport is not None
        if self.done:
            return
        self.done = True
        self.transport.write(view)  # past the 4 KiB high-water mark: pause_writing() here
        self.inside = "write_eof"
        try:
            self.transport.write_eof()
        finally:
            self.inside = None

    def pause_writing(self) -> None:
        if self.inside is not None:
            self.calls_inside.append(f"pause_writing from inside {self.inside}()")

    def resume_writing(self) -> None:
        if self.inside is not None:
            self.calls_inside.append(f"resume_writing from inside {self.inside}()")


async def test_resume_writing_is_not_called_from_inside_write_eof() -> None:
    """Found by the machine above (io_uring): a lending protocol writes the lent view of a
    read that filled its buffer (so the write is corked until the end of the batch), past the
    high-water mark (pause_writing(), allowed inside write()); then write_eof() flushed the
    cork, the socket took everything, and resume_writing() was called from inside write_eof()
    (close() likewise), which asyncio's contract and _transport.py's docstring rule out."""
    protocols: list[_WritesViewThenEof] = []

    def factory() -> asyncio.BaseProtocol:
        protocols.append(_WritesViewThenEof())
        return protocols[-1]

    async with await iocp_echo.serve(factory, "127.0.0.1", 0, write_high_water=4096) as server:
        # Sent before the loop runs again: the first read fills its 65,535-byte buffer.
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(STREAM[:70_000])
            deadline = time.monotonic() + WAIT
            while not (protocols and protocols[0].done):
                assert time.monotonic() < deadline, "no data_lent() within WAIT seconds"
                await asyncio.sleep(POLL)
        finally:
            sock.close()
    assert protocols[0].calls_inside == []


class _PausesInTinyBuffer(asyncio.BufferedProtocol):
    """A 7-byte buffer; pauses reading in its first buffer_updated()."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(7)
        self.received = bytearray()
        self.while_paused = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        if self.paused:
            self.while_paused += 1
        self.received += self.buffer[:nbytes]
        if len(self.received) == nbytes:  # the first call
            self.paused = True
            self.transport.pause_reading()


async def test_a_buffered_protocol_that_pauses_gets_no_more_of_the_read() -> None:
    """Found by the machine above (both backends): CompletionTransport._deliver_buffered()
    fed a read through get_buffer()/buffer_updated() in a loop that never looked at the
    transport's state, so a protocol that paused reading (or closed, aborted, or replaced
    itself with set_protocol()) inside buffer_updated() still got the rest of that read, while
    paused (asyncio's own proactor transport feeds a BufferedProtocol the same way).  The rest
    must come, in order, once reading resumes."""
    protocols: list[_PausesInTinyBuffer] = []

    def factory() -> asyncio.BaseProtocol:
        protocols.append(_PausesInTinyBuffer())
        return protocols[-1]

    async with await iocp_echo.serve(factory, "127.0.0.1", 0) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(STREAM[:100])  # one read of 100 bytes, fed 7 bytes at a time
            deadline = time.monotonic() + WAIT
            while not (protocols and protocols[0].received):
                assert time.monotonic() < deadline, "no buffer_updated() within WAIT seconds"
                await asyncio.sleep(POLL)
            [protocol] = protocols
            assert protocol.transport is not None
            for _ in range(5):  # the loop runs; nothing may come while paused
                await asyncio.sleep(POLL)
            assert protocol.while_paused == 0, (
                f"{protocol.while_paused} buffer_updated() calls while paused"
            )
            assert len(protocol.received) == 7
            protocol.paused = False
            protocol.transport.resume_reading()
            while len(protocol.received) < 100:
                assert time.monotonic() < deadline, f"{len(protocol.received)} of 100 bytes"
                await asyncio.sleep(POLL)
            assert protocol.received == STREAM[:100]
        finally:
            sock.close()
