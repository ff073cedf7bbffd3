"""Frames inside the decompressed teleport stream (PROTOCOL.md §1.4).

Theory of operation
-------------------
Each frame is ``[uint32 LE request id][one HTTP/1.1 message]`` with no length
prefix: HTTP framing alone says where a message ends.  ``encode_request`` and
``encode_response`` write one frame the way a Go peer can read it (always a
Content-Length, never chunked or read-until-close, no Connection header).
`FrameReader` turns a byte stream into complete frames and follows the Go
reader's body rules, which are not plain RFC 9112:

===========  ==========================================================
request      GET/HEAD: never a body (Content-Length and
             Transfer-Encoding are ignored and dropped from the head).
             Others: chunked if Transfer-Encoding says so, else
             Content-Length, else empty.
response     1xx/204/304, and HEAD when ``is_head(id)`` says so: no body.
             Otherwise chunked or Content-Length; neither is an error
             (Go would read until EOF; our peers never send that).
===========  ==========================================================

These are the lenient rules of ``httptp.http.rules`` (``strict=False``),
where the HTTP parsers' strict ones live too.
This stream feeds a proxy whose other leg is plain HTTP, so anything a plain
HTTP parser could read two ways is refused: conflicting Content-Length,
Content-Length with chunked, Transfer-Encoding other than chunked/identity,
bad chunk sizes, control characters, obs-fold.  Any `FramingError` means the
stream is out of sync and the connection must be dropped.

The reader keeps one bytearray and an offset: the header search resumes where
the last one stopped, bodies are sliced out once, consumed bytes are dropped
once per ``feed``.

Limits: a peer decides how much it sends, so the reader bounds what it holds
to one header block (``max_header_size``) or one body (``max_body_size``)
plus the feed at hand, and checks both as bytes arrive, before buffering
them (the decompressor hands them out in slices: ``codecs``).  Over a limit:

- a request body with a Content-Length: the frame comes out with body
  ``None`` (the server answers 413 for that id) and the body is skipped as
  it arrives, never held, so the stream stays in sync;
- anything else (a header block, a chunked body, any response): raises
  `FrameTooLarge`, a `FramingError`, and the connection is dropped.

Header blocks repeat: a peer sends the same headers with every request or
answer, only the Content-Length differs, and our encoders write it last.  So
the reader remembers, per connection, what a header block without that last
``Content-Length: DIGITS`` line parses to (validated pairs and framing), and
adds the length back: a repeated head costs a dict lookup instead of two
regex passes and a loop (about 2 us a frame).  Anything else a block holds
(a Content-Length elsewhere, Transfer-Encoding) goes through the full rules,
so results and errors are exactly those of parsing the whole block.  A proxy
of ours also adds a request id as the last field before Content-Length, new
with every request: the reader also remembers each block without its last
line, and a block that differs from a remembered one only there reads that
one line (when it is a valid field that neither frames the body nor is Host).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from http import HTTPStatus

from httptp.http import rules
from httptp.http.events import RequestHead, ResponseHead
from httptp.http.host import valid_host
from httptp.http.rules import request_may_have_body, status_has_body
from httptp.teleport import FrameTooLarge, FramingError

_TOKEN, _VCHAR, _FIELD = rules.TOKEN, rules.VCHAR_OBS, rules.FIELD_CHAR
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (" + _VCHAR + rb"+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9][0-9])(?: (" + _FIELD + rb"*))?")
# A header block (each line with its CRLF) is checked by one fullmatch and
# split by one findall: two C passes instead of a Python loop per line.
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":" + _FIELD + rb"*\r\n)*")
# The value is greedy up to its last non-blank character (a lazy value would
# try the line's end at every character: 1.5x slower on real heads).
_HEADER_PAIRS = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:" + _FIELD + rb"*"
                           + _VCHAR + rb")?)[ \t]*\r\n")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;" + _FIELD + rb"*)?")
_MAX_CL_DIGITS = rules.MAX_CONTENT_LENGTH_DIGITS
_MAX_CHUNK_LINE = 1024

_NO_BODY_METHODS = rules.LENIENT_BODYLESS_METHODS      # a Go peer reads no body for these
_ID = struct.Struct("<I")
_LENGTH_LINE = b"Content-Length: "      # as encode_request/encode_response write it
_LENGTH_NAME = b"Content-Length"
HEAD_CACHE_SIZE = 256     # header blocks remembered per reader (cleared when full)
HEAD_CACHE_BLOCK = 1024   # ... of at most this many bytes: 256 KiB per reader at most
_CL, _TE = 14, 17          # lengths of the names we look at


# --- writing ---------------------------------------------------------------

def encode_request(req_id: int, method: bytes, target: bytes, headers: list | bytes,
                   body: bytes) -> bytes:
    """One client -> server frame.

    ``headers`` are written as given: the caller has already removed
    hop-by-hop headers, Content-Length, Transfer-Encoding and Expect, and
    passes names and values that its HTTP parser validated.  They may also
    be those fields as their wire lines, each with its CRLF (bytes: an
    HTTP/1.1 head's ``raw`` plus the proxy's own lines), which the parser
    has checked to hold one valid Host.  Content-Length is added for every
    method but GET/HEAD.  Raises ValueError when a list has no Host header
    (fasthttp refuses it) or a GET/HEAD has a body (a Go peer never reads
    it, so the stream would lose sync).
    """
    if headers.__class__ is not bytes:
        for name, value in headers:         # a loop: 0.4 us cheaper than any(genexpr)
            if len(name) == 4 and value and name.lower() == b"host":
                break
        else:
            raise ValueError("missing Host")
    has_body = request_may_have_body(method, strict=False)
    if body and not has_body:
        raise ValueError(f"a {method.decode('latin-1')} request cannot carry a body")
    return _frame([req_id.to_bytes(4, "little"), method, b" ", target, b" HTTP/1.1\r\n"],
                  headers, body, has_body)


def encode_response(req_id: int, status: int, reason: bytes, headers: list | bytes,
                    body: bytes) -> bytes:
    """One server -> client frame.

    ``headers`` as given (hop-by-hop and Content-Length already removed), a
    list of pairs or their wire lines (bytes: a response head's ``raw``).
    Content-Length: len(body) is always written except for 1xx/204/304, which
    must have an empty body (ValueError otherwise).  A HEAD response is passed
    with body b"" and so says Content-Length: 0: a Go client reads the body a
    Content-Length announces even after a HEAD (PROTOCOL.md §1.9).
    """
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
    has_body = status_has_body(status)
    if body and not has_body:
        raise ValueError(f"a {status} response cannot carry a body")
    return _frame([req_id.to_bytes(4, "little"), b"HTTP/1.1 %d " % status, reason, b"\r\n"],
                  headers, body, has_body)


def _frame(parts: list, headers: list | bytes, body: bytes, has_body: bool) -> bytes:
    """``parts`` (id and start line), then ``headers``, then Content-Length
    (last: the readers' header-block memory relies on it) and ``body`` when
    the message has one, else just the empty line.  ``headers``: pairs, or
    their lines (bytes)."""
    if headers.__class__ is bytes:
        parts.append(headers)
    else:
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
    if has_body:
        parts += (b"Content-Length: ", b"%d" % len(body), b"\r\n\r\n", body)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


# --- reading ---------------------------------------------------------------

def _framing(headers: list) -> tuple[int | None, bool, bool]:
    """``(content_length, chunked, expect_100)`` from a head's headers, by
    the lenient rules of ``httptp.http.rules`` (a Go peer's); raises
    FramingError on what a plain HTTP parser could read two ways."""
    try:
        return rules.message_framing(headers, strict=False)
    except rules.FramingViolation as e:
        raise FramingError(str(e)) from None


def _parse_headers(block: bytes) -> list:
    """``block`` is the header lines, each ending in CRLF; return the
    ``(name, value)`` pairs, values without surrounding whitespace."""
    if _HEADER_BLOCK.fullmatch(block) is None:
        bad = next(line for line in block.split(b"\r\n")
                   if _HEADER_BLOCK.fullmatch(line + b"\r\n") is None)
        raise FramingError(f"malformed header line {bad[:40]!r}")
    return _HEADER_PAIRS.findall(block)


def _split_length(block: bytes) -> tuple[bytes, bytes | None]:
    """``(rest, digits)`` when the last line of ``block`` is exactly
    ``Content-Length: DIGITS``, else ``(block, None)``."""
    last = block.rfind(b"\n", 0, len(block) - 2) + 1
    if block.startswith(_LENGTH_LINE, last):
        digits = block[last + len(_LENGTH_LINE):-2]
        if digits.isdigit() and len(digits) <= _MAX_CL_DIGITS:    # ASCII digits only
            return block[:last], digits
    return block, None


def _check_hosts(headers: list) -> None:
    """A request's Host: at most one, and ``host[:port]`` (``httptp.http.host``),
    as the HTTP parsers require: the upstream must not pick among bad ones."""
    seen = False
    for name, value in headers:
        if len(name) == 4 and name.lower() == b"host":
            if seen or not valid_host(value):
                raise FramingError(f"invalid or second Host header {value[:40]!r}")
            seen = True


def _block(block: bytes, no_body: bool,
           request: bool = False) -> tuple[list, int | None, bool, bool]:
    """Parse and check a header block: ``(headers, content_length, chunked,
    expect_100)``; ``no_body`` (GET/HEAD) drops Content-Length and
    Transfer-Encoding first, as Go reads no body for them; ``request`` checks
    Host (`_check_hosts`)."""
    headers = _parse_headers(block)
    if request:
        _check_hosts(headers)
    if no_body:
        headers = [(k, v) for k, v in headers
                   if len(k) not in (_CL, _TE) or k.lower() not in
                   (b"content-length", b"transfer-encoding")]
    return (headers, *_framing(headers))


# Fields that decide framing or are checked across the block (Host): a
# block's last line may be read on its own only when it is none of these.
_BLOCK_WIDE = frozenset((b"host", b"content-length", b"transfer-encoding", b"expect"))


def _ordinary_last(key: bytes) -> tuple[int, tuple | None]:
    """Where ``key``'s last line starts, and its ``(name, value)`` when it
    is a valid field of none of the `_BLOCK_WIDE` names (else None); 0 when
    ``key`` has one line at most."""
    last = key.rfind(b"\n", 0, len(key) - 2) + 1
    if not last:
        return 0, None
    m = _HEADER_PAIRS.fullmatch(key, last)       # as _HEADER_BLOCK, on one line
    if m is None or m.group(1).lower() in _BLOCK_WIDE:
        return last, None
    return last, m.groups()


def _take(buf: bytearray, pos: int, size: int) -> bytes:
    """bytes(buf[pos:pos + size]) with one copy instead of two for big bodies."""
    if size < 4096:
        return bytes(buf[pos:pos + size])
    with memoryview(buf) as view, view[pos:pos + size] as part:
        return bytes(part)


class FrameReader:
    """Cut a decompressed teleport stream into frames.

    ``kind`` is ``"request"`` (server side) or ``"response"`` (client side).
    ``max_header_size`` bounds one header block, start line and final empty
    line included (Go's ReadBufferSize: a larger block kills the connection).
    ``is_head(req_id)`` tells a client-side reader which responses answer a
    HEAD and so have no body whatever their Content-Length.
    ``max_body_size`` (optional) bounds one body (module docstring: what
    happens above it).
    """

    def __init__(self, kind: str, max_header_size: int,
                 is_head: Callable[[int], bool] | None = None,
                 max_body_size: int | None = None):
        if kind not in ("request", "response"):
            raise ValueError(f"kind must be 'request' or 'response', not {kind!r}")
        self._parse_head = self._request_head if kind == "request" else self._response_head
        self._max_header = max_header_size
        self._max_body = max_body_size
        self._is_head = is_head
        self._buf = bytearray()
        self._pos = 0           # first unconsumed byte
        self._scan = 0          # where the search for the end of the head resumes
        self._state = self._read_head
        self._id = 0
        self._head = None
        self._need = 0          # body bytes (Content-Length) or chunk bytes still to read
        self._parts: list[bytes] = []   # chunked body so far
        self._size = 0          # chunked body size so far
        self._heads: dict = {}          # header block -> _block(): see the module docstring
        self._no_body_heads: dict = {}  # the same for GET/HEAD requests
        self._skip = 0          # bytes of a refused request body still to drop
        self._requests = kind == "request"

    def feed(self, data: bytes) -> list[tuple[int, RequestHead | ResponseHead, bytes]]:
        """Add stream bytes; return the frames they complete, in order.

        Each frame is ``(req_id, head, body)`` with the whole (de-chunked)
        body, or body ``None`` for a request whose Content-Length is over
        ``max_body_size`` (its body is skipped).  Partial data is kept for the
        next call.  Raises FramingError (FrameTooLarge over a limit) on
        anything malformed; the reader is then unusable.
        """
        if self._skip:
            n = len(data)
            if n <= self._skip:
                self._skip -= n
                return []
            data = data[self._skip:]
            self._skip = 0
        buf = self._buf
        buf += data
        out: list = []
        while self._state(out):
            pass
        if self._pos:
            del buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        return out

    def _emit(self, out: list, body: bytes) -> bool:
        out.append((self._id, self._head, body))
        self._head = None
        self._state = self._read_head
        return True

    # --- head

    def _read_head(self, out: list) -> bool:
        buf, pos = self._buf, self._pos
        n = len(buf)
        block = pos + 4
        if n - block < 2:
            return False
        start = block
        while buf.startswith(b"\r\n", start):      # Go skips blank lines here
            start += 2
        end = buf.find(b"\r\n\r\n", max(start, self._scan))
        if end < 0:
            if n - block > self._max_header:
                raise FrameTooLarge("header", n - block, self._max_header,
                                    _ID.unpack_from(buf, pos)[0])
            self._scan = max(start, n - 3)
            return False
        if end + 4 - block > self._max_header:
            raise FrameTooLarge("header", end + 4 - block, self._max_header,
                                _ID.unpack_from(buf, pos)[0])
        self._id = _ID.unpack_from(buf, pos)[0]
        # the head with the CRLF of its last line; the header lines start
        # after the start line's CRLF
        head = bytes(buf[start:end + 2])
        self._pos = self._scan = end + 4
        return self._parse_head(out, head, head.find(b"\r\n") + 2)

    def _headers(self, cache: dict, block: bytes, no_body: bool, request: bool = False):
        """``_block(block, no_body, request)``, remembered in ``cache`` by the
        block without its trailing Content-Length line (module docstring), so
        a repeated head's checks (Host too) cost nothing; a block whose last
        field changes every time (the request id a proxy of ours adds) costs
        that one line: the block without it is remembered too."""
        key, digits = _split_length(block)
        hit = cache.get(key)
        if hit is None:
            # the last line read on its own, when it is an ordinary field
            # (so neither the framing, nor the Host check, nor what a GET or
            # HEAD drops depends on it): the rest may be remembered
            last, field = _ordinary_last(key)
            if field is not None:
                rest = cache.get(key[:last])
                if rest is not None:
                    hit = (rest[0] + [field], *rest[1:])
        if hit is None:
            try:
                hit = _block(key, no_body, request)
            except FramingError:
                if digits is None:
                    raise
                # the whole block may fail first on its last line
                # ("conflicting Content-Length headers"): its own error
                return _block(block, no_body, request)
            if len(key) <= HEAD_CACHE_BLOCK:
                if len(cache) >= HEAD_CACHE_SIZE - 1:
                    cache.clear()
                cache[key] = hit
                if field is not None:           # the field is the last of hit's
                    cache[key[:last]] = (hit[0][:-1], *hit[1:])
        headers, content_length, chunked, expect = hit
        if digits is None or no_body:          # GET/HEAD drop the line anyway
            return list(headers), content_length, chunked, expect
        headers = headers + [(_LENGTH_NAME, digits)]
        if content_length is None and not chunked:
            return headers, int(digits), False, expect
        return (headers, *_framing(headers))   # the full rules: same result or error

    def _request_head(self, out: list, head: bytes, lines: int) -> bool:
        m = _REQUEST_LINE.fullmatch(head, 0, lines - 2)
        if m is None:
            raise FramingError(f"malformed request line {head[:lines - 2][:60]!r}")
        method, target, version = m.groups()
        if method in _NO_BODY_METHODS:
            headers, content_length, chunked, expect = self._headers(
                self._no_body_heads, head[lines:], True, True)
            out.append((self._id, RequestHead(method, target, version, headers, True,
                                              content_length, chunked, expect), b""))
            return True
        headers, content_length, chunked, expect = self._headers(self._heads, head[lines:],
                                                                 False, True)
        head = RequestHead(method, target, version, headers, True, content_length, chunked,
                           expect)
        return self._body(out, head, content_length, chunked, True)

    def _response_head(self, out: list, head: bytes, lines: int) -> bool:
        m = _STATUS_LINE.fullmatch(head, 0, lines - 2)
        if m is None:
            raise FramingError(f"malformed status line {head[:lines - 2][:60]!r}")
        version, status, reason = m.groups()
        status = int(status)
        headers, content_length, chunked, _ = self._headers(self._heads, head[lines:], False)
        head = ResponseHead(status, reason or b"", version, headers, True, content_length,
                            chunked)
        if not status_has_body(status) or (self._is_head is not None
                                            and self._is_head(self._id)):
            out.append((self._id, head, b""))
            return True
        return self._body(out, head, content_length, chunked, False)

    def _body(self, out: list, head, content_length: int | None, chunked: bool,
              empty_ok: bool) -> bool:
        """The body of ``head``: taken at once in the usual case (a
        Content-Length body already in the buffer), else by the body states."""
        if content_length is not None and not chunked:
            pos = self._pos
            if len(self._buf) - pos >= content_length and (
                    self._max_body is None or content_length <= self._max_body):
                self._pos = pos + content_length
                out.append((self._id, head, _take(self._buf, pos, content_length)))
                return True
        self._head = head
        return self._start_body(out, content_length, chunked, empty_ok)

    def _start_body(self, out: list, content_length: int | None, chunked: bool,
                    empty_ok: bool) -> bool:
        if chunked:
            self._parts, self._size = [], 0
            self._state = self._read_chunk_size
            return True
        if content_length is None:
            if empty_ok:
                return self._emit(out, b"")
            raise FramingError("response without Content-Length")
        if self._max_body is not None and content_length > self._max_body:
            if not self._requests:
                raise FrameTooLarge("body", content_length, self._max_body, self._id)
            # refused, and skipped as it comes: the stream stays in sync
            out.append((self._id, self._head, None))
            self._head = None
            self._state = self._read_head
            pos = self._pos
            here = min(len(self._buf) - pos, content_length)
            self._pos = pos + here
            self._skip = content_length - here
            return not self._skip
        self._need = content_length
        self._state = self._read_body
        return True

    # --- bodies

    def _read_body(self, out: list) -> bool:
        pos, need = self._pos, self._need
        if len(self._buf) - pos < need:
            return False
        self._pos = pos + need
        return self._emit(out, _take(self._buf, pos, need))

    def _read_chunk_size(self, out: list) -> bool:
        buf, pos = self._buf, self._pos
        eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
        if eol < 0:
            if len(buf) - pos >= _MAX_CHUNK_LINE:
                raise FramingError("chunk size line too long")
            return False
        m = _CHUNK_LINE.fullmatch(buf, pos, eol)
        if m is None:
            raise FramingError(f"bad chunk size line {bytes(buf[pos:eol])[:40]!r}")
        size = int(m.group(1), 16)
        self._pos = eol + 2
        if size == 0:
            self._state = self._read_trailer
            return True
        self._size += size
        if self._max_body is not None and self._size > self._max_body:
            raise FrameTooLarge("body", self._size, self._max_body, self._id)
        self._need = size
        self._state = self._read_chunk_data
        return True

    def _read_chunk_data(self, out: list) -> bool:
        buf, pos, need = self._buf, self._pos, self._need
        if len(buf) - pos < need + 2:
            return False
        if buf[pos + need:pos + need + 2] != b"\r\n":
            raise FramingError("chunk data not followed by CRLF")
        self._parts.append(_take(buf, pos, need))
        self._pos = pos + need + 2
        self._state = self._read_chunk_size
        return True

    def _read_trailer(self, out: list) -> bool:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 2:
            return False
        if buf.startswith(b"\r\n", pos):
            end = pos
        else:                                   # trailers: checked, then dropped
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0 or end + 4 - pos > self._max_header:
                if len(buf) - pos > self._max_header:
                    raise FramingError("chunked trailer larger than the read buffer")
                return False
            _parse_headers(bytes(buf[pos:end + 2]))
            end += 2
        self._pos = end + 2
        body = b"".join(self._parts)
        self._parts = []
        return self._emit(out, body)
