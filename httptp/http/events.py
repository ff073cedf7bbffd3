"""Parser-neutral HTTP/1.1 events.

Both parser back-ends (httptools, h11) turn bytes into exactly these events, so
everything above the parser is written once.  Header names and values are the
raw bytes from the wire (case kept); ``headers`` is a list of ``(name, value)``
pairs in arrival order.

A message is always: one head event, zero or more ``Data``, one ``EndOfMessage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestHead:
    method: bytes                 # b"GET"
    target: bytes                 # request-target as sent: b"/a?b=c"
    version: bytes                # b"1.1" or b"1.0"
    headers: list                 # [(name: bytes, value: bytes), ...], raw case
    keep_alive: bool              # the client allows reusing the connection after this message
    content_length: int | None    # declared Content-Length, None if absent
    chunked: bool                 # Transfer-Encoding: chunked
    expect_continue: bool = False  # Expect: 100-continue was sent
    # The fields a proxy forwards (all but hop-by-hop, Connection, framing
    # and Expect) as wire lines, each with its CRLF, when the parser's fast
    # path read the head (httptools_backend); else None.  Not compared.
    raw: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: list
    keep_alive: bool              # the server allows reusing the connection after this message
    content_length: int | None
    chunked: bool
    # as RequestHead.raw: the fields forwarded to a client (all but
    # hop-by-hop, Connection and Content-Length), or None
    raw: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    pass


END = EndOfMessage()


class Response:
    """A complete response as the proxy holds it: head and the whole body,
    and who answered, how fast (the access log)."""

    __slots__ = ("head", "body", "upstream", "upstream_time")

    def __init__(self, head: ResponseHead, body: bytes, upstream: str = "",
                 upstream_time: float = 0.0):
        self.head = head
        self.body = body
        self.upstream = upstream
        self.upstream_time = upstream_time
