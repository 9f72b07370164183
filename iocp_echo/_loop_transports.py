"""The completion engine under every stream of a loop: the mixin both backends' loops share.

CPython's proactor loops wrap each connected socket (``create_server``, ``create_connection``,
``connect_accepted_socket``, streams, TLS) in their generic ``_ProactorSocketTransport``.
:class:`EngineTransports` makes the loop wrap it in the backend's completion transport instead,
so an application's own servers and clients get the engine the echo server runs on.
"""

from __future__ import annotations

__all__ = ["EngineTransports"]


class EngineTransports:
    """Mixin for a ``BaseProactorEventLoop`` subclass (listed before it in the bases)."""
