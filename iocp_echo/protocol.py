"""The echo Protocol: every byte read is written back, in order.

On iocp_echo's completion engine the transport lends the protocol a view of the pooled buffer
the kernel read into (:meth:`EchoProtocol.data_lent`), and the echo writes that same view back:
the bytes go out from the buffer they came in on, without a copy and without a Python-level
loop.  On any other transport (asyncio's own proactor transports: TLS, or the engine's fallback
when CPython's internals are not as expected) it is an ordinary :class:`asyncio.BufferedProtocol`
whose buffer holds at most ``max_read`` bytes.

Memory stays bounded because the transport calls :meth:`~EchoProtocol.pause_writing` once more
than its high-water mark waits to be sent, and the echo then stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import proactor_events

from ._transport import CompletionTransport
from .errors import ProactorRequiredError

__all__ = ["DEFAULT_MAX_READ", "EchoProtocol"]

logger = logging.getLogger("iocp_echo.connection")

#: The largest read the seed allows: one read never asks for more than this.
DEFAULT_MAX_READ = 65535


def is_completion_transport(transport: asyncio.BaseTransport) -> bool:
    """Is *transport* driven by completions (the engine's, or asyncio's proactor transports)?"""
    if isinstance(transport, (CompletionTransport, proactor_events._ProactorBasePipeTransport)):
        return True
    # TLS wraps the proactor transport in asyncio's SSL transport; the loop tells the rest.
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return transport.get_extra_info("sslcontext") is not None and isinstance(
        loop, proactor_events.BaseProactorEventLoop
    )


class EchoProtocol(asyncio.BufferedProtocol):
    """Echo a TCP stream back to its sender.

    Serve it with :func:`iocp_echo.serve_echo` (or :func:`iocp_echo.serve`), which adds a
    resilient accept loop, limits and shutdown; it also works with ``loop.create_server()`` on
    a proactor loop.  *max_read* bounds each read on asyncio's own transports; on the engine the
    server's ``max_read`` bounds the pooled buffers.
    """

    __slots__ = ("_buffer", "bytes_received", "bytes_sent", "max_read", "transport")

    def __init__(self, *, max_read: int = DEFAULT_MAX_READ) -> None:
        self.max_read = max_read
        self.transport: asyncio.Transport | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._buffer: memoryview | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not is_completion_transport(transport):
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            raise ProactorRequiredError(
                f"EchoProtocol needs a completion (proactor) transport, got "
                f"{type(transport).__name__}: serve it with iocp_echo.serve_echo() on "
                "iocp_echo.new_event_loop() (asyncio.ProactorEventLoop on Windows)"
            )
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_lent(self, data: memoryview) -> None:
        """The engine's path: send the bytes back from the buffer they were read into."""
        self.transport.write(data)  # type: ignore[union-attr]

    def get_buffer(self, sizehint: int) -> memoryview:
        # A memoryview, not the bytearray: asyncio's TLS layer fills it through slices
        # (buf[offset:]), which must be views for the bytes to land in this buffer.
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = memoryview(bytearray(self.max_read))
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None and self._buffer is not None
        self.bytes_received += nbytes
        # A copy: asyncio's TLS transport keeps what it is given, and this buffer is reused.
        self.transport.write(bytes(self._buffer[:nbytes]))
        self.bytes_sent += nbytes

    def eof_received(self) -> bool:
        # Returning False closes the transport once every queued echo has been sent, which is
        # exactly the half-close contract: the client still gets all its bytes, then EOF.
        return False

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._buffer = None
