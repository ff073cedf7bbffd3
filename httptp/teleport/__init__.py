"""The teleport protocol, sans-IO: handshake, compression streams, framing, connections.

Theory of operation
-------------------
A teleport connection is, bottom to top (PROTOCOL.md §1.1): TCP, a 15-byte
plaintext handshake each way (`handshake`), optionally TLS, one continuous
compression stream per direction (`codecs`), and inside the decompressed
stream back-to-back frames ``[uint32 LE request id][one HTTP/1.1 message]``
(`framing`).  Everything here turns bytes into values and values into bytes;
the gevent drivers (``httptp.io.teleport_*``) own sockets, clocks and
batching; `connection` is what one connection knows, as bytes in and out.

Errors: every failure raises a subclass of `TeleportError`.  None of them is
reported on the wire (the protocol has no error frame): the driver drops the
connection and fails every request pending on it.

Nothing in this package imports socket, gevent or time (STYLE.md §7.2).  The
blocking library API (`Client`, `Server`, `Request`, `Response`…) is
re-exported here for its users but lives in ``httptp.io.teleport_api``; it is
loaded on first access.
"""

from __future__ import annotations


class TeleportError(Exception):
    """Base of every teleport protocol error; the connection is dropped."""


class HandshakeError(TeleportError):
    """Bad magic, unsupported version or unknown codec in the 15-byte header."""


class CodecError(TeleportError):
    """The compressed stream is corrupt (bad checksum, garbage, bad chunk)."""


class FramingError(TeleportError):
    """The decompressed stream does not frame as id + HTTP/1.1 message."""


class FrameTooLarge(FramingError):
    """A frame is over the reader's limits: ``what`` is ``"header"`` or
    ``"body"``, ``size`` the size announced or reached so far, ``limit`` the
    limit, ``req_id`` the frame's id (None before its 4 bytes were read)."""

    def __init__(self, what: str, size: int, limit: int, req_id: int | None = None):
        super().__init__(f"header block over the limit of {limit} bytes" if what == "header"
                         else f"body of {size} bytes is over the limit of {limit} bytes")
        self.what = what
        self.size = size
        self.limit = limit
        self.req_id = req_id


# The blocking library API, which lives with the gevent drivers
# (httptp/io/teleport_api.py) and is loaded on first access, so that importing
# this package (or its sans-IO modules) never imports gevent.
_LIBRARY = ("Client", "Server", "Request", "Response", "UpstreamError", "GatewayTimeout",
            "CODECS", "Headers", "HTTPStatusError", "WrongThread")

__all__ = ["TeleportError", "HandshakeError", "CodecError", "FramingError", "FrameTooLarge",
           *_LIBRARY]


def __getattr__(name: str):
    # The one way from this package into httptp.io (tests/unit/test_sans_io.py
    # allows exactly this function): only when a library name is asked for.
    if name in _LIBRARY:
        from httptp.io import teleport_api
        return getattr(teleport_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
