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
    ``ProtocolError`` (400, 413 or 431) and the parser stays dead; when the bad
    bytes follow whole requests in the same feed, ``feed`` returns those
    requests' events with the ``ProtocolError`` as the last event instead, so
    that they are answered first, in order (`after_complete`).  EOF inside a
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
from httptp.http.events import END, RequestHead, ResponseHead
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

# The framing headers.  ``_KINDS`` caches the kind of every spelling seen
# (0: not a framing header), so that a name costs one dict lookup, no lower().
_CL, _TE, _HOST, _CONN, _EXPECT = 1, 2, 3, 4, 5
_SPECIAL = {b"content-length": _CL, b"transfer-encoding": _TE, b"host": _HOST,
            b"connection": _CONN, b"expect": _EXPECT}
_KINDS = {spelling: kind for name, kind in _SPECIAL.items()
          for spelling in (name, name.title(), name.upper())}
# Names come from peers: the cache holds at most 4,096 names of at most 64
# bytes (256 KiB), whatever they send.
_KINDS_MAX, _NAME_MAX = 4096, 64
FRAMING_KINDS = frozenset(_SPECIAL.values())
"""Every kind `field_kind` gives a field `scan_special` reads (0: none)."""
_KEEP_ALIVE, _CLOSE = object(), object()
_CONN_VALUES = {b"keep-alive": _KEEP_ALIVE, b"Keep-Alive": _KEEP_ALIVE, b"close": _CLOSE,
                b"Close": _CLOSE}
_OWS = rules.OWS
_MAX_CL_DIGITS = rules.MAX_CONTENT_LENGTH_DIGITS


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


def after_complete(events: list, err: ProtocolError) -> list:
    """A RequestParser's ``feed`` failed with ``err`` (it stays dead): the
    events up to the last request that ended in this feed, with ``err`` last,
    so that those requests are answered first; raises ``err`` when no request
    ended in this feed (what came of a later one is dropped: it is the bad one)."""
    for i in range(len(events) - 1, -1, -1):
        if events[i] is END:
            del events[i + 1:]
            events.append(err)
            return events
    raise err


def feed_after_response(method: bytes | None, head: ResponseHead | None, data: bytes) -> list:
    """A ResponseParser's ``feed`` once its response is complete (both back-ends):
    no more events, and any byte after the response means the upstream
    connection must not be reused."""
    if method is None:
        raise ProtocolError("response without a request")
    if data and head is not None:
        head.keep_alive = False
    return []


def field_kind(name: bytes) -> int:
    """The kind `scan_special` knows a field name by, or 0 (any spelling)."""
    return _SPECIAL.get(name.lower(), 0)


def scan_headers(headers: list) -> tuple:
    """One pass over a head's fields: ``(size, special)``, the block's bytes
    less the start line and the fields `scan_special` reads, as
    ``(kind, value)`` pairs (kinds are cached per spelling: one dict lookup
    per field, no lower())."""
    size = 2 + 4 * len(headers)         # "name: value\r\n" each, the empty line
    special = []
    kinds = _KINDS
    for name, value in headers:
        size += len(name) + len(value)
        kind = kinds.get(name)
        if kind is None:
            kind = _SPECIAL.get(name.lower(), 0)
            if len(kinds) < _KINDS_MAX and len(name) <= _NAME_MAX:
                kinds[name] = kind
        if kind:
            special.append((kind, value))
    return size, special


def scan_special(special: list) -> tuple:
    """What a head's framing and connection fields say, from their ``(kind,
    value)`` pairs in order: ``(content_length, chunked, hosts, host, close,
    keep_alive, expect, named)``: the Content-Length (or None), chunked, the
    number of Host fields and the last one's value, Connection: close and
    keep-alive seen, Expect: 100-continue, and whether a Connection field
    names anything else (fields the policy must then drop).  A plain tuple,
    unpacked by the callers: this runs twice per proxied request.

    Raises ProtocolError(400) for ambiguous framing: the strict rules of
    ``httptp.http.rules`` (duplicate or non-digit Content-Length,
    Transfer-Encoding other than exactly ``chunked``, both).
    """
    length = host = None
    chunked = close = keep_alive = expect = named = False
    hosts = 0
    try:
        for kind, value in special:
            if kind == _CL:
                if length is None and value.isdigit() and len(value) <= _MAX_CL_DIGITS:
                    length = int(value)         # nearly always: the rule's common case
                else:
                    length = _content_length(value, length)
            elif kind == _HOST:
                hosts += 1
                host = value
            elif kind == _CONN:
                token = _CONN_VALUES.get(value)
                if token is _KEEP_ALIVE:
                    keep_alive = True
                elif token is _CLOSE:
                    close = True
                else:
                    for token in value.lower().split(b","):
                        token = token.strip(_OWS)
                        if token == b"close":
                            close = True
                        elif token == b"keep-alive":
                            keep_alive = True
                        elif token:
                            named = True
            elif kind == _TE:
                chunked = _transfer_encoding(value, chunked)
            elif kind == _EXPECT:
                if _expects_continue(value):
                    expect = True
        if chunked and length is not None:
            rules.check_framing(length, chunked)
    except FramingViolation as e:     # a strict rule of httptp.http.rules
        raise ProtocolError(str(e)) from None
    return length, chunked, hosts, host, close, keep_alive, expect, named


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
    size, special = scan_headers(headers)
    return request_head(method, target, version, headers,
                        size + len(method) + len(target) + 12,    # "M T HTTP/1.1\r\n"
                        scan_special(special), max_header_size, max_body_size)


def request_head(method: bytes, target: bytes, version, headers: list, size: int,
                 scan: tuple, max_header_size: int, max_body_size: int) -> RequestHead:
    """`check_request` once the fields are read: ``size`` is the whole head's
    bytes, ``scan`` what `scan_special` says of them."""
    length, chunked, hosts, host, close, keep_alive, expect, _ = scan
    if size > max_header_size:
        raise ProtocolError("request header too large", 431,
                            request_line(method, target, version))
    ver = VERSIONS.get(version)
    if ver is None:
        raise ProtocolError("unsupported HTTP version")
    if method not in KNOWN_METHODS:
        raise ProtocolError(f"unsupported method {method[:20]!r}")
    if hosts != 1 and (hosts or ver == b"1.1"):
        raise ProtocolError("missing or duplicate Host header")
    if hosts and not valid_host(host):
        raise ProtocolError(f"invalid Host header {host[:40]!r}")
    if target[:1] != b"/" and upstream_target(method, target) is None:
        raise ProtocolError(f"unsupported request-target {target[:40]!r}")
    if chunked and ver == b"1.0":
        raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
    keep_alive = not close and (ver == b"1.1" or keep_alive)
    head = RequestHead(method, target, ver, headers, keep_alive, length, chunked, expect)
    if length is not None and length > max_body_size:
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
    size, special = scan_headers(headers)
    return response_head(status, reason, version, headers,
                         size + len(reason) + 15,       # "HTTP/1.1 200 R\r\n"
                         scan_special(special), max_header_size, method)


def response_head(status: int, reason: bytes, version, headers: list, size: int, scan: tuple,
                  max_header_size: int, method: bytes) -> tuple[ResponseHead, int]:
    """`check_response` once the fields are read: ``size`` is the whole
    head's bytes, ``scan`` what `scan_special` says of them."""
    length, chunked, _, _, close, keep_alive, _, _ = scan
    if size > max_header_size:
        raise ProtocolError("response header too large", 431)
    if reason and _REASON(reason) is None:      # it is relayed to the client as is
        raise ProtocolError("control character in the reason phrase")
    ver = VERSIONS.get(version)
    if ver is None:
        raise ProtocolError("unsupported HTTP version in response")
    if chunked and ver == b"1.0":
        raise ProtocolError("Transfer-Encoding in an HTTP/1.0 response")
    if not _status_has_body(status, method):
        mode = NO_BODY
    elif chunked or length is not None:
        mode = FRAMED
    else:
        mode = UNTIL_CLOSE
    keep_alive = mode != UNTIL_CLOSE and not close and (ver == b"1.1" or keep_alive)
    head = ResponseHead(status, reason, ver, headers, keep_alive, length, chunked)
    return head, mode


NO_BODY, FRAMED, UNTIL_CLOSE = 0, 1, 2

UPSTREAM_CLOSED = "upstream closed connection"
