"""Serialise HTTP/1.1 messages with explicit framing (hot path).

Every message we write has a Content-Length we computed (or none, when the
status forbids a body): framing is never copied from the peer.  The caller has
already removed hop-by-hop and framing headers (``httptp.http.policy``).
Each function builds one list and joins it once; status lines and error
answers are cached.
"""

from __future__ import annotations

from httptp.errors import ProxyError
from httptp.http.rules import status_has_body

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_CLOSE = b"Connection: close\r\n"
_status_lines: dict = {}
_errors: dict = {}


def _header_lines(parts: list, headers: list):
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")


def request_head(method: bytes, target: bytes, headers: list, body_len: int | None) -> bytes:
    """``METHOD target HTTP/1.1``, ``headers`` as given, then ``Content-Length``
    when ``body_len > 0`` or the method is POST/PUT/PATCH, then the empty line;
    ``body_len`` None: ``Transfer-Encoding: chunked`` (a body streamed as it
    comes).  The body is not included."""
    parts = []
    _header_lines(parts, headers)
    return request_lines(method, target, b"".join(parts), body_len)


def request_lines(method: bytes, target: bytes, lines: bytes, body_len: int | None) -> bytes:
    """`request_head` with the header fields already as wire lines (each
    with its CRLF)."""
    if body_len is None:
        end = b"Transfer-Encoding: chunked\r\n\r\n"
    elif body_len > 0 or method in _BODY_METHODS:
        end = b"Content-Length: %d\r\n\r\n" % body_len
    else:
        end = b"\r\n"
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", lines, end))


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` (cached)."""
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key
        if len(_status_lines) < 1024 and len(reason) <= 64:   # reasons come from upstreams
            _status_lines[key] = line
    return line


def response(status: int, reason: bytes, headers: list, body: bytes, keep_alive: bool,
             content_length: int | None = None) -> bytes:
    """A complete response: status line, ``headers``, ``Content-Length``
    (``content_length`` if given, e.g. the upstream's for HEAD, else
    ``len(body)``; omitted for 1xx/204/304), ``Connection: close`` unless
    ``keep_alive``, the empty line and ``body``."""
    parts = [status_line(status, reason)]
    _header_lines(parts, headers)
    if status_has_body(status):
        parts.append(b"Content-Length: %d\r\n" % (len(body) if content_length is None
                                                  else content_length))
    if not keep_alive:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    if body:
        parts.append(body)
    return b"".join(parts)


def response_lines(status: int, reason: bytes, lines: bytes, body: bytes, keep_alive: bool,
                   content_length: int | None = None) -> bytes:
    """`response` with the header fields already as wire lines (``lines``,
    each with its CRLF: a head's ``raw``)."""
    cl = (b"Content-Length: %d\r\n" % (len(body) if content_length is None else content_length)
          if status_has_body(status) else b"")
    return b"".join((status_line(status, reason), lines, cl,
                     b"\r\n" if keep_alive else _CLOSE_END, body))


_CLOSE_END = _CLOSE + b"\r\n"


def chunk(data) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def response_head(status: int, reason: bytes, headers: list, framing: bytes | None,
                  keep_alive: bool) -> bytes:
    """A response head for a body that follows in parts: ``framing`` is the
    framing header line (``Content-Length: n\r\n`` or the chunked one), or
    None (no body, or one delimited by the close)."""
    parts = [status_line(status, reason)]
    _header_lines(parts, headers)
    if framing is not None:
        parts.append(framing)
    if not keep_alive:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    return b"".join(parts)


CHUNKED = b"Transfer-Encoding: chunked\r\n"


def error_response(err: ProxyError, keep_alive: bool) -> bytes:
    """The short text/plain answer for ``err`` (cached per error class)."""
    key = (err.__class__, err.status, keep_alive)
    data = _errors.get(key)
    if data is None:
        body = err.payload
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        data = response(err.status, err.reason.encode("latin-1"), headers, body, keep_alive)
        _errors[key] = data
    return data
