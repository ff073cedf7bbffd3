"""The teleport library for asyncio: ``AsyncClient``, ``AsyncServer``, ``serve_asgi``.

They live in ``httptp.io.teleport_aio`` and ``httptp.io.teleport_asgi``,
next to the gevent drivers, so that ``httptp.teleport`` stays sans-IO; this
module re-exports them and, like the package, loads the driver modules only
when a name is asked for.  Nothing on
that path imports gevent.  See docs/library.md.
"""

from __future__ import annotations

__all__ = ["AsyncClient", "AsyncServer", "serve_asgi", "asgi_server", "run", "Request",
           "Response", "Headers", "HTTPStatusError", "UpstreamError", "GatewayTimeout",
           "CODECS"]


def __getattr__(name: str):
    # Lazy: importing this module must not import asyncio (tests/unit/test_sans_io.py).
    if name in ("serve_asgi", "asgi_server"):
        from httptp.io import teleport_asgi
        return getattr(teleport_asgi, name)
    if name in __all__:
        from httptp.io import teleport_aio
        return getattr(teleport_aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
