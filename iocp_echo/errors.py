"""The exceptions iocp_echo raises, all importable from ``iocp_echo``.

Each message says what went wrong and what to do about it, because these errors are what a
person sees first when a server does not start.
"""

from __future__ import annotations

import errno

__all__ = [
    "AddressInUseError",
    "BufferOwnershipError",
    "InvalidPortError",
    "IocpEchoError",
    "ProactorRequiredError",
    "UnsupportedPlatformError",
    "os_error_code",
]


class IocpEchoError(Exception):
    """Base class of every error raised by iocp_echo itself."""


class BufferOwnershipError(IocpEchoError, AssertionError):
    """A bug, caught before it corrupts data: a kernel-owned read buffer was given back twice
    (or handed out by the kernel while iocp_echo still held it).  Never a client's doing."""


class ProactorRequiredError(IocpEchoError, RuntimeError):
    """The running event loop is not a proactor (completion-based) loop."""


class UnsupportedPlatformError(IocpEchoError, RuntimeError):
    """This operating system has no completion-port backend that iocp_echo can use."""


class InvalidPortError(IocpEchoError, ValueError):
    """The port is outside 1024-65535 (and not 0, which asks the OS to choose)."""


class AddressInUseError(IocpEchoError, OSError):
    """The address and port to listen on are already taken.

    An ``OSError`` subclass carrying the original ``errno``/``winerror``, so code that already
    catches ``OSError`` around server start-up keeps working.
    """


_ADDRESS_IN_USE_CODES = frozenset(
    code for code in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None), 10048) if code
)


def os_error_code(exc: BaseException) -> int | None:
    """The operating system's own number for *exc*: ``winerror`` on Windows, else ``errno``.

    Windows socket and overlapped errors carry the Win32/Winsock code in ``winerror`` (64
    ``ERROR_NETNAME_DELETED``, 10054 ``WSAECONNRESET``...); ``errno`` there is a lossy C-runtime
    translation.  Logs use this so the number matches what the OS documents.
    """
    code = getattr(exc, "winerror", None) or getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def is_address_in_use(exc: OSError) -> bool:
    return exc.errno in _ADDRESS_IN_USE_CODES or getattr(exc, "winerror", None) == 10048
