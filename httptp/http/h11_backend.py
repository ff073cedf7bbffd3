"""HTTP/1.1 parsing on h11: the pure-Python, strict back-end.

h11 is a two-sided state machine built for endpoints, not proxies: a server
connection will not read a pipelined request before it has sent a response,
and never keeps an HTTP/1.0 connection alive.  We use one fresh
``h11.Connection`` per message and hand ``trailing_data`` to the next one, and
derive keep-alive ourselves (``parser.check_request``).

What h11 lets through that we refuse, by a raw scan of each header block
(`_check_block`): obs-fold (h11 unfolds it), bare LF line endings, bare CR,
control characters in values (h11 allows all but NUL/whitespace there), and
duplicate Content-Length headers or ``5, 5`` lists (h11 merges equal ones).
Duplicate or comma-joined equal Content-Length values, CL+TE (h11 lets
chunked win), TE on HTTP/1.0, unknown methods and versions other than
1.0/1.1 are caught by the shared checks in ``httptp.http.parser``.
"""

from __future__ import annotations

import re

import h11

from httptp.errors import ProtocolError
from httptp.http import parser as _p
from httptp.http.events import END, Data
from httptp.http.rules import OWS, is_interim

_BLANK_LINE = re.compile(rb"\n\r?\n")           # h11's end-of-head rule
_BAD_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # HTAB allowed; CR/LF checked as pairs
_CRLF = re.compile(rb"\r\n")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)
# llhttp does not read "chunked<HTAB>" as chunked; h11 strips the tab: refuse it in both
_TE_TRAILING_HTAB = re.compile(rb"\ntransfer-encoding[ \t]*:[^\r\n]*\t[ \t]*\r?\n",
                               re.IGNORECASE)


def _check_block(raw, what: str) -> int:
    """Refuse what h11 accepts in the header block at the start of ``raw``;
    return the block's length (up to and including the empty line)."""
    m = _BLANK_LINE.search(raw)
    end = m.end()
    block = _CRLF.sub(b"", raw[:end])
    if _BAD_CHAR.search(block) or raw.find(b"\n ", 0, end) >= 0 or raw.find(b"\n\t", 0, end) >= 0:
        raise ProtocolError(f"invalid character, line ending or obs-fold in {what} header")
    # h11 silently merges equal duplicates ("5" twice, or "5, 5") into one value.
    lengths = _CONTENT_LENGTH.findall(raw, 0, end)
    if len(lengths) > 1 or (lengths and not lengths[0].strip(OWS).isdigit()):
        raise ProtocolError("duplicate or invalid Content-Length")
    if b"\t" in block and _TE_TRAILING_HTAB.search(raw, 0, end):
        raise ProtocolError(_p.TE_TRAILING_HTAB)
    return end


def _check_trailers(ev: h11.EndOfMessage, max_head: int) -> None:
    """Trailer fields are dropped, but bounded like a head (h11 bounds them
    only while they are incomplete; httptools_backend counts them all)."""
    if ev.headers and sum(len(k) + len(v) + 4 for k, v in ev.headers.raw_items()) > max_head:
        raise ProtocolError("trailer fields too large", 431)


def _protocol_error(e: h11.RemoteProtocolError, what: str, raw=b"") -> ProtocolError:
    """Our error for h11's; a 431 names the request when ``raw`` (the bytes of
    the head so far) holds its request line."""
    if e.error_status_hint == 431:
        return ProtocolError(f"{what} header too large: {e}", 431, _p.parse_request_line(raw))
    return ProtocolError(f"malformed {what}: {e}")


class RequestParser:
    """Requests from a client connection; see ``httptp.http.parser``."""

    __slots__ = ("_max_head", "_max_body", "_conn", "_raw", "_head", "_body_bytes",
                 "_closed", "_dead", "_cr")

    def __init__(self, max_header_size: int, max_body_size: int):
        self._max_head = max_header_size
        self._max_body = max_body_size
        self._conn = self._new_conn()
        self._raw = bytearray()     # bytes of the current message until its head is parsed
        self._head = None
        self._body_bytes = 0
        self._closed = False
        self._dead = None
        self._cr = False            # the bytes so far end in the CR of an empty line

    def _new_conn(self):
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)

    def feed(self, data: bytes) -> list:
        """Parse ``data`` (``b""`` is EOF) and return the events it completes."""
        if self._dead is not None:
            raise ProtocolError(self._dead.detail, self._dead.status)
        if self._closed:
            return []
        events = []
        try:
            self._receive(data)
            self._pump(events)
        except h11.RemoteProtocolError as e:
            self._dead = _protocol_error(e, "request", self._raw)
        except ProtocolError as e:
            self._dead = e
        if self._dead is not None:
            return _p.after_complete(events, self._dead)
        return events

    def _receive(self, data: bytes):
        if data and self._head is None:
            if not self._raw:   # h11 refuses empty lines before a request; RFC 9112 §2.2 does not
                data, self._cr = _p.skip_empty_lines(data, self._cr)
                if not data:
                    return
            self._raw += data
        self._conn.receive_data(data)

    def _pump(self, events: list):
        while True:
            ev = self._conn.next_event()
            cls = ev.__class__
            if cls is h11.Data:
                self._body_bytes += len(ev.data)
                if self._body_bytes > self._max_body:
                    raise ProtocolError("request body too large", 413, self._head)
                events.append(Data(bytes(ev.data)))
            elif cls is h11.Request:
                events.append(self._on_request(ev))
            elif cls is h11.EndOfMessage:
                _check_trailers(ev, self._max_head)
                events.append(END)
                if not self._next_message():
                    return
            elif ev is h11.NEED_DATA or cls is h11.ConnectionClosed:
                if cls is h11.ConnectionClosed and self._raw:
                    raise ProtocolError("client closed connection in the middle of a request")
                return
            else:       # PAUSED cannot happen: we switch connections at EndOfMessage
                raise ProtocolError(f"unexpected h11 event {ev!r}")

    def _on_request(self, ev: h11.Request):
        _check_block(self._raw, "request")
        self._raw = bytearray()
        head = _p.check_request(ev.method, ev.target, ev.http_version, ev.headers.raw_items(),
                                self._max_head, self._max_body)
        self._head = head
        return head

    def _next_message(self) -> bool:
        """Start a fresh h11 connection on the leftovers; false once closed."""
        if not self._head.keep_alive:
            self._closed = True
            return False
        rest, eof = self._conn.trailing_data
        self._conn = self._new_conn()
        self._head = None
        self._body_bytes = 0
        self._raw = bytearray()
        if rest:
            self._receive(rest)
        if eof:
            self._conn.receive_data(b"")
        return True


class ResponseParser:
    """One response at a time from an upstream connection; see ``httptp.http.parser``."""

    __slots__ = ("_max_head", "_method", "_conn", "_raw", "_head", "_done")

    def __init__(self, max_header_size: int):
        self._max_head = max_header_size
        self._method = None
        self._conn = None
        self._head = None
        self._done = True

    def start(self, method: bytes):
        """Expect the response to a request with ``method`` (HEAD has no body)."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        # h11 only reads a response after it has "sent" a request.
        conn.send(h11.Request(method=method, target=b"/",
                              headers=[(b"host", b"x"), (b"content-length", b"0")]))
        conn.send(h11.EndOfMessage())
        self._conn = conn
        self._method = method
        self._raw = bytearray()
        self._head = None
        self._done = False

    def feed(self, data: bytes) -> list:
        """Parse ``data`` (``b""`` is EOF) and return the events it completes."""
        if self._done:
            return _p.feed_after_response(self._method, self._head, data)
        if data and self._head is None:
            self._raw += data
        events = []
        try:
            self._conn.receive_data(data)
            self._pump(events)
        except h11.RemoteProtocolError as e:
            self._fail(_protocol_error(e, "response") if data else ProtocolError(_p.UPSTREAM_CLOSED))
        except ProtocolError as e:
            self._fail(e)
        if not data and not self._done:
            self._fail(ProtocolError(_p.UPSTREAM_CLOSED))
        return events

    def _fail(self, err: ProtocolError):
        self._done = True
        self._method = None
        raise err

    def _pump(self, events: list):
        while not self._done:
            ev = self._conn.next_event()
            cls = ev.__class__
            if cls is h11.Data:
                events.append(Data(bytes(ev.data)))
            elif cls is h11.Response or cls is h11.InformationalResponse:
                self._on_response(ev, events)
            elif cls is h11.EndOfMessage:
                _check_trailers(ev, self._max_head)
                events.append(END)
                self._done = True
                if self._conn.trailing_data[0]:
                    self._head.keep_alive = False   # bytes after the response: do not reuse
            else:       # NEED_DATA, ConnectionClosed, PAUSED
                return

    def _on_response(self, ev, events: list):
        end = _check_block(self._raw, "response")
        if ev.status_code == 101:
            raise ProtocolError("unexpected 101 Switching Protocols")
        head, mode = _p.check_response(ev.status_code, ev.reason, ev.http_version,
                                       ev.headers.raw_items(), self._max_head, self._method)
        if is_interim(ev.status_code):
            del self._raw[:end]     # interim response: skipped, the real head follows
            return
        self._raw = bytearray()
        self._head = head
        events.append(head)
