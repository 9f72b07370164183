"""iocp_echo: completion-port TCP servers on asyncio, led by an asynchronous echo server.

>>> import iocp_echo
>>> async def main():
...     async with await iocp_echo.serve_echo("127.0.0.1", 0) as server:
...         await server.serve_forever()
>>> iocp_echo.run(main())  # doctest: +SKIP
"""

from ._transport import CompletionTransport, LendingProtocol
from .errors import (
    AddressInUseError,
    BufferOwnershipError,
    InvalidPortError,
    IocpEchoError,
    ProactorRequiredError,
    UnsupportedPlatformError,
)
from .introspection import (
    IntrospectionUnavailable,
    PendingOperation,
    pending_operations,
    pending_operations_threadsafe,
)
from .loops import EventLoop, EventLoopPolicy, backend_name, new_event_loop, run
from .protocol import DEFAULT_MAX_READ, EchoProtocol
from .proxy_protocol import ProxyHeader
from .server import EchoServer, ServerStats, serve, serve_echo
from .workers import WorkersFailed, run_workers

__all__ = [
    "DEFAULT_MAX_READ",
    "AddressInUseError",
    "BufferOwnershipError",
    "CompletionTransport",
    "EchoProtocol",
    "EchoServer",
    "EventLoop",
    "EventLoopPolicy",
    "IntrospectionUnavailable",
    "InvalidPortError",
    "IocpEchoError",
    "LendingProtocol",
    "PendingOperation",
    "ProactorRequiredError",
    "ProxyHeader",
    "ServerStats",
    "UnsupportedPlatformError",
    "WorkersFailed",
    "backend_name",
    "new_event_loop",
    "pending_operations",
    "pending_operations_threadsafe",
    "run",
    "run_workers",
    "serve",
    "serve_echo",
]

__version__ = "0.1.0"
