"""HTTP/1.1 parsing on httptools (llhttp): the default, hot-path back-end.

llhttp in its default (strict) mode already refuses obs-fold, bare CR/LF,
control characters, bad tokens, CL+TE, duplicate CL and bad chunk sizes; the
rest of the contract (versions, Host, TE on 1.0, limits, CONNECT, keep-alive)
is ``parser.check_request``/``check_response``, run once per head.

What llhttp does not give us, and how we cope:
- No byte offsets.  The header-size limit is checked exactly on the complete
  block (from its parts) and, while a head is still incomplete, on a lower
  bound: whole feeds when the head started at a feed boundary, else the parts
  seen so far (so memory stays bounded by the limit plus one feed).
- ``Upgrade`` + ``Connection: upgrade`` makes llhttp skip the body and pause
  (HttpParserUpgrade, the offset after the head).  We are not a tunnel, so we
  start a fresh parser and, if the request has a body, feed it a synthetic
  head with the same framing whose events are dropped; the body and any
  pipelined requests then parse as usual (compare uvicorn #2722).
- Bare CRs before a request line: llhttp skips CR and LF bytes alike there
  (so does nginx), but RFC 9112 §2.2 allows only empty lines.  A feed
  without a CR that lacks its LF goes to llhttp whole (one regex search that
  skips a Content-Length body's bytes).  Otherwise llhttp is fed in steps
  that end where a request may end (before such a CR, at the end of a
  Content-Length body, after a CRLF CRLF in a chunked one), and the bytes
  between two requests are checked before llhttp gets them: a chunked
  binary upload costs a step per CRLF CRLF in its data, not per CR.
- Keep-alive is ours, not llhttp's: llhttp would also close on
  ``Proxy-Connection: close`` and refuse what follows, and would read on
  after ``Connection: close, keep-alive`` in HTTP/1.0.  Request parsers run
  with ``lenient_keep_alive`` and stop at the first byte of a message after
  one that ``check_request`` found not to keep the connection alive.
- Trailer fields of a chunked message come through ``on_header`` after the
  head: they go to a ``_Trailers`` sink, which bounds them by the header
  limit (431, as h11) and drops them.  They never join the head's headers (a
  ``Host`` in a trailer would otherwise reach the upstream).
- ``Transfer-Encoding: chunked<HTAB>`` is not chunked to llhttp, though it is
  to us once trailing whitespace is stripped: refused (400) in both
  back-ends, so the two framings can never differ.
- No way to skip a response body (HEAD) and no ``finish()`` for EOF: the
  response parser finds the end of the head itself, feeds llhttp only the head
  when there is no body, and completes read-until-close bodies at EOF.

The fast path.  llhttp calls back into Python once per field, and the
proxy then filters and serialises the fields again; the usual head instead
is read with bytes methods (`_fast`, `_fast_head`, `_read_fields`): a
complete head of printable bytes (obs-text in values), CRLF line ends,
``token: value`` fields with exactly one space and no trailing whitespace,
an origin-form target, ``HTTP/1.1`` or ``HTTP/1.0``, and no
Transfer-Encoding.  Then the same ``parser.request_head`` /
``response_head`` as llhttp's heads.  That language is a strict subset of
what llhttp accepts, read into the same fields (tests/unit/test_http_fastpath.py
holds the two to each other); anything else, including every head the checks
refuse, is read by llhttp from the same byte, so errors and their texts are
llhttp's.  A request takes the fast path at a message boundary when its
Content-Length body (if any) is in the same feed; a response when it has no
body or a Content-Length one.

The same pass keeps the lines a proxy forwards (``head.raw``: every field but
hop-by-hop, Connection, framing and, in a request, Expect), so that the proxy
writes them as they came instead of a filtered list.  A head whose Connection
field names more fields has no raw, nor has a request with a field the proxy
sets itself (`own_fields`).  Each parser remembers its last field block: the
same bytes again (a load generator's requests, an upstream's answers within
one ``Date`` second) cost a comparison, and only the start line is read; the
same but for the ``Content-Length: `` line (a POST's) costs that line too.
Python per proxied request: 220.7K instructions before, 146K after
(docs/benchmarks.md).
"""

from __future__ import annotations

import re

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from httptp.errors import ProtocolError
from httptp.http import parser as _p
from httptp.http.events import END, Data
from httptp.http.policy import HOP_BY_HOP
from httptp.http.rules import MAX_CONTENT_LENGTH_DIGITS, OWS, is_interim

_OWS = tuple(OWS)        # as ints: compared with value[-1]
# a CR not followed by LF (also one at the end: its LF may follow); about 0.15 us on a GET
_find_cr_without_lf = re.compile(rb"\r(?!\n)").search
_SYNTHETIC = {True: b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
              False: b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"}


# -- the fast path (module docstring) ------------------------------------------------

_CONTROL = bytes(range(0x20)) + b"\x7f"
"""Deleted from a head block, they must be its CRLFs alone (so no HTAB: a
field with one is llhttp's).  (``find``, not ``in``: on bytes, ``in`` first
tries its operand as an int, a TypeError that costs more than the search.)"""
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VERSIONS = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}
_STATUS_FIRST = frozenset(b"12345")
_KNOWN_METHODS = _p.KNOWN_METHODS
# The kind of each field name as spelt: parser.field_kind's (0: none),
# _HOP for another hop-by-hop field, _NOT_TOKEN.  Names come from peers:
# bounded as parser._KINDS is.
_HOP, _NOT_TOKEN = 16, -1
_FAST_KINDS: dict = {}
_MEMO_MAX = 1024        # field bytes a parser remembers (_read_fields): an idle
                        # connection holds at most ~4 KiB of memo, whatever the header limit
_FAST_KINDS_MAX, _NAME_MAX = 4096, 64
_TE = _p.field_kind(b"transfer-encoding")
_CRLF = b"\r\n"
_CL_NAME = b"Content-Length"
_CL_LINE = b"\r\nContent-Length: "
_CL_LINE_LEN = len(_CL_LINE)
_MAX_CL_DIGITS = MAX_CONTENT_LENGTH_DIGITS
_FRAMING = _p.FRAMING_KINDS
# kinds a proxy leaves out of the lines it forwards (policy.py), each way
_REQUEST_DROPS = frozenset(
    {_HOP} | {_p.field_kind(n) for n in (b"content-length", b"transfer-encoding",
                                         b"connection", b"expect")})
_RESPONSE_DROPS = frozenset(
    {_HOP} | {_p.field_kind(n) for n in (b"content-length", b"transfer-encoding",
                                         b"connection")})


# Fields a proxy sets itself in a request (own_fields): a request with one
# gets no ``raw``, so the policy reads its fields.
_OWNED = 32
_OWNED_NAMES: set = set()


_generation = 0         # of _OWNED_NAMES: a parser's memo of older ones is stale


def own_fields(names) -> None:
    """Say which request fields (names, any case) the proxy sets itself: a
    request with one of them gets no ``raw``.  Names add up over calls (a
    process with two proxies takes the slow path for either's)."""
    global _generation
    new = {n.lower() for n in names if n} - _OWNED_NAMES
    if new:
        _OWNED_NAMES.update(new)
        _FAST_KINDS.clear()
        _generation += 1


def _fast_kind(name: bytes) -> int:
    if not name or name.translate(None, _TOKEN_BYTES):
        kind = _NOT_TOKEN
    else:
        kind = _p.field_kind(name)
        if not kind:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                kind = _HOP
            elif lower in _OWNED_NAMES:
                kind = _OWNED
    if len(_FAST_KINDS) < _FAST_KINDS_MAX and len(name) <= _NAME_MAX:
        _FAST_KINDS[name] = kind
    return kind


def _fast_fields(lines: list, drops: frozenset):
    """``(headers, special, raw)`` from a head's field lines (CRLFs and
    whitespace checked by the caller): the ``(name, value)`` fields as llhttp
    and ``on_header`` give them, the ``(kind, value)`` pairs
    ``parser.scan_special`` reads, and the lines of the fields a proxy
    forwards (kinds not in ``drops``), each with its CRLF (None for a request
    with a field of `own_fields`).  None when a line
    is not ``token ": " value`` or is Transfer-Encoding: the head is
    llhttp's to read."""
    headers = []
    special = []
    kept = []
    kinds = _FAST_KINDS
    owned = False
    for line in lines:
        name, colon, value = line.partition(b": ")
        kind = kinds.get(name)
        if kind is None:
            kind = _fast_kind(name)
        if kind < 0 or not colon:
            return None
        headers.append((name, value))
        if kind:
            if kind in _FRAMING:
                if kind == _TE:
                    return None
                special.append((kind, value))
            elif kind == _OWNED:
                owned = True
            if kind in drops:
                continue
        kept.append(line)
    if owned and drops is _REQUEST_DROPS:
        return headers, special, None
    kept.append(b"")
    return headers, special, _CRLF.join(kept)


def _read_fields(parser, block: bytes, drops: frozenset):
    """``(start line, entry, headers)`` for a head the fast path reads, or
    None when it is llhttp's to read.  The entry is what the fast path reads
    of the fields: ``(key, generation, headers, scan, raw, where, at,
    block)`` (``scan``: parser.scan_special's tuple; ``block``: the field
    bytes; ``key``: those less a ``Content-Length: `` line, ``at`` where
    that line was in them and ``where`` its field's index in ``headers``,
    both -1 for none); ``headers`` is a list of the fields the head owns.
    ``parser._memo`` keeps the last entry (of at most _MEMO_MAX bytes),
    given back when the field bytes are the same: a client or upstream
    connection mostly sends the same fields, and only the start line is
    then read."""
    memo = parser._memo
    start_end = block.find(_CRLF)
    line = block[:start_end]
    if len(line.translate(None, _CONTROL)) != start_end:
        return None                 # a control byte (HTAB too) in the start line
    key = block[start_end:]         # CRLF, the field lines, CRLF CRLF
    if memo is not None and memo[7] == key and memo[1] == _generation:
        return line, memo, list(memo[2])        # the same fields again
    # Else the same but for a "Content-Length: " line?  A POST's length
    # changes with its body, its other fields do not.
    cl_at = key.find(_CL_LINE)
    if cl_at >= 0:
        cl_end = key.find(_CRLF, cl_at + 2)
        length = key[cl_at + _CL_LINE_LEN:cl_end]
        memo_key = key[:cl_at] + key[cl_end:]
        if (memo is not None and memo[6] == cl_at and memo[0] == memo_key
                and memo[1] == _generation and length.isdigit()
                and len(length) <= _MAX_CL_DIGITS):
            headers = list(memo[2])             # the remembered fields with this length
            headers[memo[5]] = (_CL_NAME, length)
            return line, (memo_key, _generation, headers, (int(length), *memo[3][1:]),
                          memo[4], memo[5], cl_at, memo[7]), headers
    else:
        memo_key = key
    if key.find(b":  ") >= 0 or key.find(b" \r\n") >= 0:
        return None                 # OWS around a value
    lines = key[2:-4].split(_CRLF) if len(key) > 4 else []
    if len(key.translate(None, _CONTROL)) != len(key) - 2 * len(lines) - 4:
        return None                 # a control byte, or a CR or LF alone
    fields = _fast_fields(lines, drops)
    if fields is None:
        return None
    headers, special, raw = fields
    try:
        scan = _p.scan_special(special)
    except ProtocolError:
        return None                 # llhttp reads it again, and says what is wrong
    # where the Content-Length line is among the fields (-1: none): as many
    # lines come before it as CRLFs (the key starts with the start line's)
    entry = (memo_key, _generation, headers, scan, raw,
             key.count(_CRLF, 0, cl_at) if cl_at >= 0 else -1, cl_at, key)
    if len(key) > _MEMO_MAX:        # an idle connection holds its memo: small ones only
        return line, entry, headers
    parser._memo = entry
    return line, entry, list(headers)


class _AfterClose(Exception):
    """Raised in a callback: a message begins after one that closes."""


class _Headers:
    """The llhttp header callback both parsers share."""

    __slots__ = ()

    def on_header(self, name: bytes, value: bytes):
        if value and value[-1] in _OWS:         # llhttp keeps trailing OWS, h11 does not
            stripped = value.rstrip(OWS)
            if len(name) == 17 and b"\t" in value[len(stripped):] and \
                    name.lower() == b"transfer-encoding":
                raise self._fail(ProtocolError(_p.TE_TRAILING_HTAB))
            value = stripped
        self._headers.append((name, value))

    def _fail(self, err: ProtocolError) -> ProtocolError:
        """``err``, remembered for ``feed`` (llhttp wraps what a callback raises)."""
        self._error = err
        return err


class _Trailers:
    """Where ``on_header`` puts the trailer fields of a chunked message:
    counted against the header limit, then dropped (module docstring)."""

    __slots__ = ("owner", "limit", "left")

    def __init__(self, owner, limit: int):
        self.owner = owner
        self.limit = self.left = limit

    def reset(self) -> _Trailers:
        self.left = self.limit
        return self

    def append(self, field: tuple) -> None:
        self.left -= len(field[0]) + len(field[1]) + 4
        if self.left < 0:
            raise self.owner._fail(ProtocolError("trailer fields too large", 431))


def _request_parser(handler):
    p = httptools.HttpRequestParser(handler)
    p.set_dangerous_leniencies(lenient_keep_alive=True)    # keep-alive is ours: see above
    return p


class RequestParser(_Headers):
    """Requests from a client connection; see ``httptp.http.parser``."""

    __slots__ = ("_max_head", "_max_body", "_p", "_events", "_target", "_headers",
                 "_head", "_in_head", "_started", "_completed", "_head_bytes",
                 "_body_bytes", "_closed", "_dead", "_error", "_synthetic", "_cr", "_line",
                 "_trailers", "_memo")

    def __init__(self, max_header_size: int, max_body_size: int):
        self._max_head = max_header_size
        self._max_body = max_body_size
        self._p = _request_parser(self)
        self._events = []
        self._target = b""
        self._headers = []
        self._head = None
        self._in_head = True        # waiting for, or inside, a header block
        self._started = False       # a byte of the current message has arrived
        self._completed = False     # a message ended during the current feed
        self._head_bytes = 0        # lower bound of the incomplete head's size
        self._body_bytes = 0
        self._closed = False        # the last request did not keep the connection alive
        self._dead = None
        self._error = None          # a ProtocolError raised inside a callback
        self._synthetic = False
        self._cr = False            # the last feed ended in a CR between requests
        self._line = False          # the incomplete head's request line is complete
        self._trailers = _Trailers(self, max_header_size)    # reused: no allocation a request
        self._memo = None           # the fast path's last fields (_read_fields)

    # -- llhttp callbacks ------------------------------------------------------
    def on_message_begin(self):
        if self._closed:        # the last request closes: nothing after it is read
            raise _AfterClose()
        self._started = True
        self._target = b""
        self._headers = []
        self._line = False

    def on_url(self, url: bytes):
        self._target += url

    def on_headers_complete(self):
        if self._synthetic:
            self._synthetic = False
            self._headers = self._trailers.reset()
            return
        p = self._p
        try:
            head = _p.check_request(p.get_method(), self._target, p.get_http_version(),
                                    self._headers, self._max_head, self._max_body)
        except ProtocolError as e:
            self._error = e
            raise
        self._headers = self._trailers.reset()
        self._head = head
        self._in_head = False
        self._head_bytes = 0
        self._events.append(head)

    def on_body(self, data: bytes):
        self._body_bytes += len(data)
        if self._body_bytes > self._max_body:
            self._error = ProtocolError("request body too large", 413, self._head)
            raise self._error
        self._events.append(Data(data))

    def on_message_complete(self):
        head = self._head
        if (head.chunked or head.content_length) and self._p.should_upgrade():
            return      # llhttp skipped the body of an Upgrade request: _upgrade() re-parses it
        self._events.append(END)
        self._in_head = True
        self._started = False
        self._completed = True
        self._body_bytes = 0
        if not head.keep_alive:
            self._closed = True

    # -- public ----------------------------------------------------------------
    def feed(self, data: bytes) -> list:
        """Parse ``data`` (``b""`` is EOF) and return the events it completes."""
        if self._dead is not None:
            raise ProtocolError(self._dead.detail, self._dead.status)
        if self._closed:
            return []
        if not data:
            return self._eof()
        events = self._events = []
        self._completed = False
        try:
            if self._in_head and not self._started and not self._cr:
                done = self._fast(data, events)
                if done:
                    if done == len(data) or self._closed:
                        return events
                    data = data[done:]
            self._feed(data)
            if self._in_head and self._started and not self._closed:
                self._count_head(data)
        except HttpParserError as e:
            if self._closed and self._error is None:
                return events           # bytes after a non-keep-alive request: ignored
            self._dead = self._error or ProtocolError(f"malformed request: {e}")
            return _p.after_complete(events, self._dead)
        except ProtocolError as e:
            self._dead = e
            return _p.after_complete(events, e)
        return events

    def _fast(self, data: bytes, events: list) -> int:
        """Read the whole requests at the start of ``data`` that the fast path
        takes (module docstring) into ``events``; llhttp is between messages
        and stays so.  Returns how many bytes they took."""
        pos = 0
        n = len(data)
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                return pos
            block = data[pos:end + 4]
            read = _read_fields(self, block, _REQUEST_DROPS)
            if read is None:
                return pos
            line, memo, headers = read
            line = line.split(b" ")
            if len(line) != 3:
                return pos
            method, target, version = line
            version = _VERSIONS.get(version)
            if (version is None or method not in _KNOWN_METHODS or target[:1] != b"/"
                    or not target.isascii()):   # (no control byte: the block has none)
                return pos
            scan, raw = memo[3], memo[4]
            try:
                head = _p.request_head(method, target, version, headers, len(block),
                                       scan, self._max_head, self._max_body)
            except ProtocolError:
                return pos                  # llhttp reads it again, and says what is wrong
            if not scan[7]:                 # no Connection field names more to drop
                head.raw = raw              # (None: a field the proxy sets itself)
            start = end + 4
            length = head.content_length
            events.append(head)
            if length:
                if n - start < length:      # the body goes on: llhttp reads it all
                    events.pop()
                    return pos
                events.append(Data(data[start:start + length]))
                start += length
            events.append(END)
            self._completed = True
            pos = start
            if not head.keep_alive:
                self._closed = True
                return pos
            if pos == n:
                return pos

    def _feed(self, data):
        """Feed llhttp, refusing a CR without LF between requests (module docstring)."""
        if self._cr:
            self._cr = False
            if data[0] != 10:
                raise ProtocolError(_p.BARE_CR)
        if _find_cr_without_lf(data, 0 if self._in_head else self._body_left()) is None:
            self._execute(data)         # nearly always
            return
        view = memoryview(data)
        n = len(data)
        pos = 0
        while pos < n and not self._closed:     # once closed, the rest is ignored (see feed)
            stop = self._next_stop(data, pos)
            self._execute(view[pos:stop])
            pos = stop

    def _next_stop(self, data: bytes, pos: int) -> int:
        """Where to pause llhttp next, so that the bytes between two requests
        are looked at before llhttp skips them (``data`` has a CR without LF)."""
        n = len(data)
        if not self._started:       # between requests: empty lines, then a head
            end = pos
            while end < n and data[end] in b"\r\n":
                end += 1
            self._cr = _p.check_empty_lines(data[pos:end], end == n)
            pos = end
        if self._in_head:           # a CR without LF in a head is llhttp's to refuse
            m = _find_cr_without_lf(data, pos + 1)
            return n if m is None else m.start()
        if not self._head.chunked:
            return min(n, pos + max(1, self._body_left()))
        # A chunked message ends with CRLF CRLF, which may have begun before
        # this step (any match from pos - 3 ends after pos) or in the last
        # feed (then it ends at one of the first three bytes' LFs).
        end = data.find(b"\r\n\r\n", max(0, pos - 3))
        stop = n if end < 0 else end + 4
        if pos < 3:
            lf = data.find(b"\n", pos, 3)
            if lf >= 0:
                stop = min(stop, lf + 1)
        return stop

    def _body_left(self) -> int:
        """Bytes of a Content-Length body still to come (0 elsewhere)."""
        head = self._head
        if self._in_head or head.chunked:
            return 0
        return head.content_length - self._body_bytes

    def _execute(self, data):
        while True:
            try:
                self._p.feed_data(data)
                return
            except HttpParserUpgrade as e:
                data = self._upgrade(data[e.args[0]:])
                if not data or self._closed:
                    return

    def _upgrade(self, rest: bytes) -> bytes:
        """llhttp paused after an Upgrade request's head; continue as plain HTTP."""
        self._p = _request_parser(self)
        head = self._head
        if self._closed or not (head.chunked or head.content_length):
            return rest
        self._synthetic = True
        framing = _SYNTHETIC[head.chunked]
        if not head.chunked:
            framing %= head.content_length
        self._p.feed_data(framing)
        return rest

    def _count_head(self, data: bytes):
        """``data`` left the head incomplete: 431 once it is surely too large."""
        if self._completed:     # the head began mid-feed: count what we have seen of it
            n = len(self._target) + sum(len(k) + len(v) + 4 for k, v in self._headers)
            self._line = bool(self._headers)
        else:
            if not self._line:  # llhttp says nothing when the request line ends
                self._line = b"\n" in (data if self._head_bytes else data.lstrip(b"\r\n"))
            n = self._head_bytes + len(data)
        self._head_bytes = n
        if n > self._max_head:
            request = None
            if self._line:      # the method, target and version are this head's
                p = self._p
                request = _p.request_line(p.get_method(), self._target, p.get_http_version())
            self._dead = ProtocolError("request header too large", 431, request)
            raise self._dead

    def _eof(self) -> list:
        if self._started or not self._in_head:
            self._dead = ProtocolError("client closed connection in the middle of a request")
            raise self._dead
        return []


class ResponseParser(_Headers):
    """One response at a time from an upstream connection; see ``httptp.http.parser``."""

    __slots__ = ("_max_head", "_method", "_buf", "_p", "_events", "_reason", "_headers",
                 "_head", "_mode", "_done", "_msg_done", "_left", "_error", "_trailers",
                 "_memo")

    def __init__(self, max_header_size: int):
        self._max_head = max_header_size
        self._memo = None           # the fast path's last fields (_read_fields)
        self._trailers = _Trailers(self, max_header_size)
        self.start(None)
        self._done = True               # no request outstanding yet

    def start(self, method: bytes):
        """Expect the response to a request with ``method`` (HEAD has no body)."""
        self._method = method
        self._buf = b""
        self._p = None
        self._head = None
        self._done = False
        self._left = -1
        self._error = None

    # -- llhttp callbacks ------------------------------------------------------
    def on_status(self, reason: bytes):
        self._reason += reason

    def on_body(self, data: bytes):
        self._events.append(Data(data))

    def on_message_complete(self):
        self._msg_done = True
        if self._head is not None and not self._done:
            self._events.append(END)
            self._done = True

    def on_message_begin(self):
        if self._done and self._head is not None:
            self._head.keep_alive = False   # bytes after the response: do not reuse

    # -- public ----------------------------------------------------------------
    def feed(self, data: bytes) -> list:
        """Parse ``data`` (``b""`` is EOF) and return the events it completes."""
        if self._done:
            return _p.feed_after_response(self._method, self._head, data)
        events = self._events = []
        if not data:
            return self._eof(events)
        if self._left >= 0:
            self._content(data)
            return events
        try:
            if self._head is None:
                data = self._feed_head(data)
                if self._left >= 0:
                    if data:
                        self._content(data)
                    return events
            if data and not self._done:
                self._p.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:
            if self._done:                      # junk after the response: do not reuse
                self._head.keep_alive = False
            else:
                self._done = True
                self._method = None
                if self._error is not None:     # ours, raised in a callback
                    raise self._error from None
                detail = ("unexpected 101 Switching Protocols" if isinstance(e, HttpParserUpgrade)
                          else f"malformed response: {e}")
                raise ProtocolError(detail) from None
        except ProtocolError:
            self._done = True
            self._method = None
            raise
        return events

    def _feed_head(self, data: bytes) -> bytes:
        """Collect the head (skipping 1xx); return the body bytes that followed it."""
        buf = self._buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_head:
                    raise ProtocolError("response header too large", 431)
                self._buf = buf
                return b""
            end += 4
            if end > self._max_head:
                raise ProtocolError("response header too large", 431)
            block = buf[:end]
            result = self._fast_head(block)
            head, mode = self._parse_head(block) if result is None else result
            buf = buf[end:]
            if head.status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            if not is_interim(head.status):
                break
        self._buf = b""
        self._head = head
        self._events.append(head)
        if mode == _p.NO_BODY or self._msg_done:     # no body, or Content-Length: 0
            self._events.append(END)
            self._done = True
            if buf:
                head.keep_alive = False
            return b""
        self._mode = mode
        if mode == _p.FRAMED and not head.chunked:    # Content-Length: counted here, not by llhttp
            self._left = head.content_length
        return buf

    def _content(self, data: bytes) -> None:
        """Body bytes of a Content-Length response (``data`` is not empty)."""
        left = self._left
        n = len(data)
        if n < left:
            self._left = left - n
            self._events.append(Data(data))
            return
        if n > left:                    # bytes after the response: do not reuse
            self._head.keep_alive = False
            data = data[:left]
        self._events.append(Data(data))
        self._events.append(END)
        self._left = -1
        self._done = True

    def _parse_head(self, block: bytes):
        self._msg_done = False
        self._reason = b""
        self._headers = []
        self._p = p = httptools.HttpResponseParser(self)
        # keep-alive is ours here too: with Proxy-Connection: close llhttp
        # would skip the bytes after the response instead of showing them
        p.set_dangerous_leniencies(lenient_keep_alive=True)
        p.feed_data(block)
        result = _p.check_response(p.get_status_code(), self._reason, p.get_http_version(),
                                   self._headers, self._max_head, self._method)
        self._headers = self._trailers.reset()      # a chunked body's trailers go there
        return result

    def _fast_head(self, block: bytes):
        """``_parse_head`` without llhttp for a head the fast path takes
        (module docstring), else None (then call ``_parse_head``)."""
        read = _read_fields(self, block, _RESPONSE_DROPS)
        if read is None:
            return None
        line, memo, headers = read
        line = line.split(b" ", 2)
        if len(line) != 3:
            return None
        version, status, reason = line
        version = _VERSIONS.get(version)
        if (version is None or len(status) != 3 or not status.isdigit()
                or status[0] not in _STATUS_FIRST or reason[:1] == b" "):
            return None
        scan, raw = memo[3], memo[4]
        try:
            head, mode = _p.response_head(int(status), reason, version, headers,
                                          len(block), scan, self._max_head, self._method)
        except ProtocolError:
            return None
        if mode == _p.UNTIL_CLOSE:         # llhttp reads that body
            return None
        if not scan[7]:                    # no Connection field names more to drop
            head.raw = raw
        self._p = None
        self._headers = self._trailers
        self._msg_done = head.content_length == 0
        return head, mode

    def _eof(self, events: list) -> list:
        self._done = True
        self._left = -1
        if self._head is not None and self._mode == _p.UNTIL_CLOSE:
            events.append(END)
            return events
        self._method = None
        raise ProtocolError(_p.UPSTREAM_CLOSED)
