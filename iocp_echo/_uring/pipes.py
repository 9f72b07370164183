"""Pipes and terminals for the io_uring loop: ``connect_read_pipe``/``connect_write_pipe``.

The OS model.  A pipe, a FIFO or a pty is not a socket: ``RECV``/``SEND`` (the opcodes the
generic proactor transports use) fail on it with ENOTSOCK, so those transports never move a
byte.  What works on every such descriptor is readiness plus ``read(2)``/``write(2)``, the
model of asyncio's own Unix pipe transports: they watch the descriptor through the loop's
``_add_reader``/``_add_writer`` (here the io_uring ``POLL_ADD`` watches of
:mod:`.readiness`) and read or write in the callback.  A write pipe also watches its own
descriptor for reading, where a pipe reports the reader's end closing (POLLHUP/POLLERR).

Those transports are reused rather than rewritten: their behaviour (flow control, EOF,
closing while data is queued, EIO on a pty whose other side closed) is what CPython's tests
and every program using them already rely on, and the four loop methods they need are all
they ask of a loop (checked by :func:`iocp_echo._private.unix_pipe_transports`).  Only their
``__repr__`` reads the selector loop's selector: it is replaced.
"""

from __future__ import annotations

import functools
from typing import Any

from .. import _private
from .readiness import EVENT_READ, EVENT_WRITE

__all__ = ["transport_classes"]


def _describe(transport: Any, kind: str, events: int) -> list[str]:
    pipe = getattr(transport, "_pipe", None)
    fd = getattr(transport, "_fileno", None)
    parts = [kind]
    if pipe is None:
        parts.append("closed")
    elif transport.is_closing():
        parts.append("closing")
    parts.append(f"fd={fd}")
    if pipe is not None:
        loop = transport._loop
        if loop.is_closed():
            parts.append("open")
        else:
            parts.append("polling" if loop._watching(fd, events) else "idle")
    return parts


@functools.cache
def transport_classes() -> tuple[type[Any], type[Any]]:
    """The read and write pipe transports of the io_uring loop (InternalsUnavailable when
    this CPython's Unix transports are not the ones described above)."""
    read_base, write_base = _private.unix_pipe_transports()

    class ReadPipeTransport(read_base):  # type: ignore[valid-type,misc]
        """asyncio's Unix read-pipe transport on io_uring readiness."""

        def __repr__(self) -> str:
            return "<{}>".format(" ".join(_describe(self, "ReadPipeTransport", EVENT_READ)))

    class WritePipeTransport(write_base):  # type: ignore[valid-type,misc]
        """asyncio's Unix write-pipe transport on io_uring readiness."""

        def __repr__(self) -> str:
            parts = _describe(self, "WritePipeTransport", EVENT_WRITE)
            if getattr(self, "_pipe", None) is not None:
                parts.append(f"bufsize={self.get_write_buffer_size()}")
            return "<{}>".format(" ".join(parts))

    return ReadPipeTransport, WritePipeTransport
