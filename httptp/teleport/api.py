"""Where the blocking library API (``Client``, ``Server``…) used to live.

It is ``httptp.io.teleport_api`` now, next to the gevent drivers, so that
``httptp.teleport`` stays sans-IO.  ``from httptp.teleport import Client``
is the way to import it; this alias keeps ``from httptp.teleport.api import
Client`` working, and like the package it loads the driver module only when
a name is asked for.
"""

from __future__ import annotations

__all__ = ["Client", "Server", "Request", "Response", "UpstreamError", "GatewayTimeout",
           "CODECS"]


def __getattr__(name: str):
    # Lazy: importing this module must not import gevent (tests/unit/test_sans_io.py).
    if name in __all__:
        from httptp.io import teleport_api
        return getattr(teleport_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
