"""The sans-IO HTTP/1.1 parser interface, back-end selection and shared checks.

Theory of operation
-------------------
Two back-ends turn bytes into the events of ``httptp.http.events``:
``httptools_backend`` (llhttp, C, the default) and ``h11_backend`` (pure
Python).  Each module exposes the same two classes:

``RequestParser(max_header_size, max_body_size)``
    ``feed(data) -> list`` of events; ``feed(b"")`` is EOF.  Pipelined requests
    come out in order (head, Data*, END, head, ...).  A head is returned as soon
    as its header block is complete, before any body byte.  Anything bad raises
    ``ProtocolError`` (400, 413 or 431) and the parser stays dead.  EOF inside a
    message raises; EOF between messages returns ``[]``.  After a request that
    does not keep the connection alive, further bytes are ignored (RFC 9112
    §9.6: the server must not process them).

``ResponseParser(max_header_size)``
    ``start(method)`` before each response (one request outstanding), then
    ``feed(data)``; interim 1xx responses produce no events, a 101 is refused.
    EOF before a complete response raises ``ProtocolError("upstream closed
    connection")``; EOF ends a read-until-close body.

The libraries differ in what they let through, so every head goes through the
same post-parse checks here (`check_request`, `check_response`): one pass over
the headers the back-end already collected.  Character-level checks (obs-fold,
bare CR/LF, control characters) are the library's job for llhttp, which is
strict about them, and a raw scan of the header block for h11, which is not.
Host and the request-target follow ``httptp.http.host`` in both.  Empty
lines before a request line are skipped, a lone CR there is 400
(`check_empty_lines`): h11_backend strips them itself, httptools_backend
checks them before llhttp, which would skip any CR.

Nothing here imports socket, gevent or time (STYLE.md §7.2).
"""

from __future__ import annotations

import importlib
import re

from httptp.errors import ProtocolError
from httptp.http import rules
from httptp.http.events import RequestHead, ResponseHead
from httptp.http.host import upstream_target, valid_host
from httptp.http.rules import FramingViolation
from httptp.http.rules import content_length as _content_length
from httptp.http.rules import expects_continue as _expects_continue
from httptp.http.rules import status_has_body as _status_has_body
from httptp.http.rules import transfer_encoding as _transfer_encoding

BACKENDS = ("auto", "httptools", "h11")


def select_backend(name: str = "auto"):
    """Return the back-end module for ``-httpParser`` (``auto`` prefers httptools).

    The module has ``RequestParser`` and ``ResponseParser``; only the chosen
    library is imported.
    """
    if name == "auto":
        try:
            return importlib.import_module("httptp.http.httptools_backend")
        except ImportError:
            return importlib.import_module("httptp.http.h11_backend")
    if name not in ("httptools", "h11"):
        raise ValueError(f"unknown HTTP parser {name!r}: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"httptp.http.{name}_backend")


# Methods llhttp knows in request mode (minus CONNECT: we are not a tunnel).
# h11 accepts any token; checking the same set keeps both back-ends identical.
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND "
    b"PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT "
    b"MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK "
    b"UNLINK SOURCE QUERY".split())

VERSIONS = {"1.1": b"1.1", "1.0": b"1.0", b"1.1": b"1.1", b"1.0": b"1.0"}

# The framing headers, keyed by name length so that most headers skip lower().
_CL, _TE, _HOST, _CONN, _EXPECT = 1, 2, 3, 4, 5
_SPECIAL = {b"content-length": _CL, b"transfer-encoding": _TE, b"host": _HOST,
            b"connection": _CONN, b"expect": _EXPECT}
_SPECIAL_LENS = frozenset(len(k) for k in _SPECIAL)
# The spellings seen on nearly every message, looked up as they come.
_SPECIAL_EXACT = {spelling: kind for name, kind in _SPECIAL.items()
                  for spelling in (name, name.title(), name.upper())}
_KEEP_ALIVE, _CLOSE = object(), object()
_CONN_VALUES = {b"keep-alive": _KEEP_ALIVE, b"Keep-Alive": _KEEP_ALIVE, b"close": _CLOSE,
                b"Close": _CLOSE}
_OWS = rules.OWS


class _Framing:
    """What one pass over the headers learned (internal)."""

    __slots__ = ("size", "content_length", "chunked", "hosts", "host", "close", "keep_alive",
                 "expect")

    def __init__(self):
        self.size = 2                   # the empty line ending the block
        self.content_length = None
        self.chunked = False
        self.hosts = 0
        self.host = None                # the (last) Host value
        self.close = False              # Connection: close seen
        self.keep_alive = False         # Connection: keep-alive seen
        self.expect = False


BARE_CR = "CR without LF before the request line"
TE_TRAILING_HTAB = "Transfer-Encoding with a tab after its value"
# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )
_REASON = re.compile(rules.FIELD_CHAR + rb"*").fullmatch


def skip_empty_lines(data: bytes, cr: bool) -> tuple[bytes, bool]:
    """Drop the empty lines before a request line (RFC 9112 §2.2): CRLF, or a
    bare LF, which §2.2 lets a recipient read as a line end.

    ``data`` is not empty; ``cr`` is true when the bytes before it ended in
    the CR of such a line.  Returns ``(rest, cr)``: ``rest`` starts with the
    request line or is empty, and ``cr`` says ``data`` ended in a CR whose LF
    is still to come.  Raises ProtocolError for a CR without LF
    (`check_empty_lines`).
    """
    first = data[0]
    if not cr and first != 13 and first != 10:
        return data, False          # nearly always: the request line at once
    if cr:
        if first != 10:
            raise ProtocolError(BARE_CR)
        data = data[1:]
    rest = data.lstrip(b"\r\n")
    return rest, check_empty_lines(data[:len(data) - len(rest)], not rest)


def check_empty_lines(gap: bytes, at_end: bool) -> bool:
    """Check ``gap``, CR and LF bytes between two requests (or before the
    first); ``at_end``: nothing follows it yet.  Returns true when it ends in
    a CR whose LF may still come.  A CR without LF is not an empty line, nor
    one by §2.2's bare-CR rule: ProtocolError (llhttp and nginx skip it).
    """
    cr = at_end and gap[-1:] == b"\r"
    if cr:
        gap = gap[:-1]
    if b"\r" in gap and b"\r" in gap.replace(b"\r\n", b""):
        raise ProtocolError(BARE_CR)
    return cr


def feed_after_response(method: bytes | None, head: ResponseHead | None, data: bytes) -> list:
    """A ResponseParser's ``feed`` once its response is complete (both back-ends):
    no more events, and any byte after the response means the upstream
    connection must not be reused."""
    if method is None:
        raise ProtocolError("response without a request")
    if data and head is not None:
        head.keep_alive = False
    return []


def scan_headers(headers: list) -> _Framing:
    """One pass: block size, framing, Host count and value, Connection tokens, Expect.

    Raises ProtocolError(400) for ambiguous framing: the strict rules of
    ``httptp.http.rules`` (duplicate or non-digit Content-Length,
    Transfer-Encoding other than exactly ``chunked``, both).
    """
    f = _Framing()
    size = 0
    exact = _SPECIAL_EXACT
    try:
        for name, value in headers:
            size += len(name) + len(value)
            kind = exact.get(name)              # the usual spellings: no lower()
            if kind is None:
                if len(name) not in _SPECIAL_LENS:
                    continue
                kind = _SPECIAL.get(name.lower())
                if kind is None:
                    continue
            if kind == _CL:
                f.content_length = _content_length(value, f.content_length)
            elif kind == _TE:
                f.chunked = _transfer_encoding(value, f.chunked)
            elif kind == _HOST:
                f.hosts += 1
                f.host = value
            elif kind == _CONN:
                token = _CONN_VALUES.get(value)
                if token is _KEEP_ALIVE:
                    f.keep_alive = True
                elif token is _CLOSE:
                    f.close = True
                elif token is None:
                    for token in value.lower().split(b","):
                        token = token.strip(_OWS)
                        if token == b"close":
                            f.close = True
                        elif token == b"keep-alive":
                            f.keep_alive = True
            elif _expects_continue(value):
                f.expect = True
        rules.check_framing(f.content_length, f.chunked)
    except FramingViolation as e:     # a strict rule of httptp.http.rules
        raise ProtocolError(str(e)) from None
    f.size += size + 4 * len(headers)       # "name: value\r\n" each
    return f


def check_request(method: bytes, target: bytes, version, headers: list,
                  max_header_size: int, max_body_size: int) -> RequestHead:
    """Validate a parsed request head and build the event (both back-ends).

    ``version`` is whatever the back-end reports (``"1.1"``, ``b"1.0"``...).
    Raises ProtocolError 431 (block too large), 413 (Content-Length over the
    limit) or 400.  Host (when present) and the request-target must be valid
    by ``httptp.http.host``, whatever the form of the target: an absolute-form
    target's authority wins upstream, but an invalid Host still makes the
    request invalid, as in nginx.
    """
    f = scan_headers(headers)
    size = f.size + len(method) + len(target) + 12    # "M T HTTP/1.1\r\n"
    if size > max_header_size:
        raise ProtocolError("request header too large", 431,
                            request_line(method, target, version))
    ver = VERSIONS.get(version)
    if ver is None:
        raise ProtocolError("unsupported HTTP version")
    if method not in KNOWN_METHODS:
        raise ProtocolError(f"unsupported method {method[:20]!r}")
    if f.hosts > 1 or (f.hosts == 0 and ver == b"1.1"):
        raise ProtocolError("missing or duplicate Host header")
    if f.hosts and not valid_host(f.host):
        raise ProtocolError(f"invalid Host header {f.host[:40]!r}")
    if target[:1] != b"/" and upstream_target(method, target) is None:
        raise ProtocolError(f"unsupported request-target {target[:40]!r}")
    if f.chunked and ver == b"1.0":
        raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
    keep_alive = not f.close and (ver == b"1.1" or f.keep_alive)
    head = RequestHead(method, target, ver, headers, keep_alive, f.content_length,
                       f.chunked, f.expect)
    if f.content_length is not None and f.content_length > max_body_size:
        raise ProtocolError("request body too large", 413, head)
    return head


def request_line(method: bytes, target: bytes, version) -> RequestHead:
    """A head with only the request line (no headers): what the access log
    shows for a request refused before its head was complete (431)."""
    ver = VERSIONS.get(version)
    if ver is None:
        ver = version.encode("ascii", "replace") if isinstance(version, str) else bytes(version)
    return RequestHead(bytes(method), bytes(target), ver, [], False, None, False)


_REQUEST_LINE = re.compile(rb"(" + rules.TOKEN + rb") (" + rules.VCHAR_OBS + rb"+) "
                           rb"HTTP/([0-9]\.[0-9])\r?\n")


def parse_request_line(raw) -> RequestHead | None:
    """`request_line` from the raw bytes of a head that starts with a
    complete request line, else None (for a back-end that keeps the bytes)."""
    m = _REQUEST_LINE.match(raw)
    return None if m is None else request_line(*m.groups())


def check_response(status: int, reason: bytes, version, headers: list,
                   max_header_size: int, method: bytes) -> tuple[ResponseHead, int]:
    """Validate a parsed response head; return (event, body mode).

    Body mode is one of NO_BODY, FRAMED (Content-Length or chunked) or
    UNTIL_CLOSE; ``keep_alive`` is already false for UNTIL_CLOSE.
    """
    f = scan_headers(headers)
    if f.size + len(reason) + 15 > max_header_size:     # "HTTP/1.1 200 R\r\n"
        raise ProtocolError("response header too large", 431)
    if reason and _REASON(reason) is None:      # it is relayed to the client as is
        raise ProtocolError("control character in the reason phrase")
    ver = VERSIONS.get(version)
    if ver is None:
        raise ProtocolError("unsupported HTTP version in response")
    if f.chunked and ver == b"1.0":
        raise ProtocolError("Transfer-Encoding in an HTTP/1.0 response")
    if not _status_has_body(status, method):
        mode = NO_BODY
    elif f.chunked or f.content_length is not None:
        mode = FRAMED
    else:
        mode = UNTIL_CLOSE
    keep_alive = mode != UNTIL_CLOSE and not f.close and (ver == b"1.1" or f.keep_alive)
    head = ResponseHead(status, reason, ver, headers, keep_alive, f.content_length, f.chunked)
    return head, mode


NO_BODY, FRAMED, UNTIL_CLOSE = 0, 1, 2

UPSTREAM_CLOSED = "upstream closed connection"
