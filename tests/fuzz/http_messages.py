"""Hypothesis strategies for HTTP/1.1 messages (docs/fuzzing.md).

Valid messages are drawn from the RFC 9110/9112 grammar (token methods and
header names, field values of VCHAR/obs-text with inner SP/HTAB, optional
whitespace around values, Host values and absolute-form authorities from the
RFC 3986 grammar as ``httptp/http/host.py`` reads it, origin/absolute/asterisk
targets, Content-Length or chunked bodies with extensions and trailers,
leading empty lines, pipelining) together with the events a parser must
return for them.  The ``m_*`` mutations then damage a message the way
attackers and broken peers do: structurally (a duplicated header, CL+TE,
obs-fold, bare CR or LF, control characters, huge numbers, odd versions,
methods and targets, an empty or malformed Host, userinfo, a bare CR before
the request line) and byte by byte (flips, insertions, deletions,
truncation), so the parsers reach their deep states and their error paths.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from hypothesis import strategies as st

from httptp.http.events import END, Data, RequestHead, ResponseHead
from httptp.http.parser import KNOWN_METHODS

TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
VCHAR = bytes(range(0x21, 0x7F))
OBS_TEXT = bytes(range(0x80, 0x100))
CRLF = b"\r\n"

# Headers both back-ends (and llhttp itself) treat specially: drawn on purpose,
# never by chance as "any other header".
SPECIAL = {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect",
           b"upgrade", b"proxy-connection"}
COMMON_NAMES = [b"Accept", b"User-Agent", b"Content-Type", b"Cookie", b"X-Forwarded-For",
                b"Authorization", b"Cache-Control", b"Accept-Encoding", b"If-None-Match",
                b"Keep-Alive", b"TE", b"Trailer", b"Via", b"X-Request-Id", b"Date", b"ETag",
                b"Server", b"Set-Cookie", b"Location", b"Vary"]


def _bytes_of(alphabet: bytes, min_size=0, max_size=20):
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


tokens = st.text(TCHAR, min_size=1, max_size=16).map(str.encode)
header_names = st.one_of(st.sampled_from(COMMON_NAMES), tokens).filter(
    lambda n: n.lower() not in SPECIAL)
_FIELD_VCHAR = VCHAR + OBS_TEXT


@st.composite
def field_values(draw, max_size=40):
    """RFC 9110 field-value: empty, or field-vchar at both ends with SP/HTAB inside."""
    if draw(st.integers(0, 9)) == 0:
        return b""
    inner = draw(_bytes_of(_FIELD_VCHAR + b" \t", 0, max_size))
    if not inner:
        return draw(st.sampled_from(_FIELD_VCHAR)).to_bytes(1, "big")
    return (draw(st.sampled_from(_FIELD_VCHAR)).to_bytes(1, "big") + inner
            + draw(st.sampled_from(_FIELD_VCHAR)).to_bytes(1, "big"))


ows = st.sampled_from([b"", b"", b"", b" ", b" ", b"\t", b"  ", b" \t "])


@st.composite
def field_lines(draw, names=header_names, values=field_values(), canonical=False):
    """``(name, value, line)``: the pair a parser must give and the wire line
    (``canonical``: exactly ``name: value``, no other whitespace)."""
    name, value = draw(names), draw(values)
    return name, value, _line(draw, name, value, canonical)


def _line(draw, name: bytes, value: bytes, canonical=False, htab_after=True) -> bytes:
    if canonical:
        return name + b": " + value + CRLF
    after = draw(ows) if htab_after else draw(ows).replace(b"\t", b" ")
    return name + b":" + draw(ows) + value + after + CRLF


def _case(draw, word: bytes) -> bytes:
    return draw(st.sampled_from([word, word.lower(), word.upper(), word.title()]))


# -- targets --------------------------------------------------------------------

_UNRESERVED = (string.ascii_letters + string.digits + "-._~").encode()
_SUB_DELIMS = b"!$&'()*+,;="
_PCHAR = _UNRESERVED + _SUB_DELIMS + b":@"


@st.composite
def _pct(draw):
    return b"%" + draw(st.sampled_from(b"0123456789ABCDEFabcdef")).to_bytes(1, "big") + \
        draw(st.sampled_from(b"0123456789ABCDEF")).to_bytes(1, "big")


@st.composite
def _segment(draw):
    parts = draw(st.lists(st.one_of(_bytes_of(_PCHAR, 1, 8), _pct()), max_size=4))
    return b"".join(parts)


@st.composite
def origin_forms(draw):
    path = b"/" + b"/".join(draw(st.lists(_segment(), max_size=4)))
    if draw(st.booleans()):
        path += b"?" + draw(_bytes_of(_PCHAR + b"/?", 0, 20))
    return path


# -- hosts (RFC 3986 §3.2.2/§3.2.3, as httptp/http/host.py reads them) ----------

_HEX = b"0123456789abcdefABCDEF"
_DIGITS = string.digits.encode()
_REG_CHARS = _UNRESERVED + _SUB_DELIMS


@st.composite
def reg_names(draw):
    """A reg-name: DNS-like labels mostly, else any run of unreserved,
    sub-delims and pct-encoded octets (``a!$&'()*+,;=``, ``%41``, ``~x``)."""
    if draw(st.integers(0, 2)):
        alnum = (string.ascii_letters + string.digits).encode()
        labels = draw(st.lists(st.builds(lambda a, b: a + b, _bytes_of(alnum, 1, 8),
                                         _bytes_of(alnum + b"-", 0, 6)), min_size=1, max_size=4))
        return b".".join(labels) + draw(st.sampled_from([b"", b"", b"", b"."]))
    return b"".join(draw(st.lists(st.one_of(_bytes_of(_REG_CHARS, 1, 8), _pct()),
                                  min_size=1, max_size=4)))


_dec_octets = st.integers(0, 255).map(lambda n: b"%d" % n)
ipv4s = st.lists(_dec_octets, min_size=4, max_size=4).map(b".".join)


@st.composite
def ipv6s(draw):
    """``[IPv6address]``: 8 groups (zeros often) with or without leading zeros
    in either case, the last two maybe as a dotted IPv4, one run of zero
    groups (any, even a single one) maybe compressed to ``::``."""
    v4 = draw(st.integers(0, 3)) == 0
    n = 6 if v4 else 8
    groups = draw(st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=n, max_size=n))
    words = [draw(st.sampled_from([b"%x", b"%X", b"%04x", b"%02X"])) % g for g in groups]
    runs = [(a, b) for a in range(n) for b in range(a + 1, n + 1)
            if not any(groups[a:b])]
    if runs and draw(st.integers(0, 3)):
        a, b = draw(st.sampled_from(runs))
        text = b":".join(words[:a]) + b"::" + b":".join(words[b:])
    else:
        text = b":".join(words)
    if v4:
        text += (b"" if text.endswith(b"::") else b":") + draw(ipv4s)
    return b"[" + text + b"]"


@st.composite
def ip_futures(draw):
    """``[vHEX.x]``, the ``v`` in either case (RFC 5234 §2.3)."""
    return (b"[" + draw(st.sampled_from([b"v", b"V"])) + draw(_bytes_of(_HEX, 1, 3)) + b"."
            + draw(_bytes_of(_UNRESERVED + _SUB_DELIMS + b":", 1, 12)) + b"]")


ports = st.one_of(st.just(b""), st.sampled_from([b":80", b":443", b":8080", b":1", b":"]),
                  _bytes_of(_DIGITS, 0, 6).map(lambda d: b":" + d))
hosts = st.builds(lambda name, port: name + port,
                  st.one_of(reg_names(), reg_names(), reg_names(), ipv4s, ipv6s(), ip_futures()),
                  st.one_of(st.just(b""), ports))

# What host.py refuses in a Host value or an authority (damage only): nothing,
# a space or control inside, userinfo, a path, a second colon, a bad port,
# broken IP-literals, bad pct-encoding, non-ASCII, characters outside RFC 3986.
BAD_HOSTS = [b"", b" ", b"a b", b"a\tb", b"a@b", b"u:p@a", b"@a", b"a/b", b"a:b", b"a:80:80",
             b"a:-1", b"a:+80", b"a: 80", b"a:8 0", b"[::1", b"::1", b"[::1]]", b"[::g]",
             b"[1:2:3:4:5:6:7:8:9]", b"[1::2::3]", b"[::1%eth0]", b"[::1%25eth0]", b"[::1]x",
             b"[::1]:a", b"[]", b"[v1.]", b"[v.x]", b"[vz.x]", b"[::01.2.3.4]",
             b"%zz", b"%4", b"a%", b"a\xe9", b"\xc3\xa9.com", b"a\x00", b"a\x7f", b'a"b',
             b"a<b>", b"a#b", b"a?b", b"a\\b", b"a{b}", b"a|b", b"a^b", b"a`b", b"a[b]", b":80"]


@st.composite
def bad_hosts(draw):
    """A value host.py refuses: from ``BAD_HOSTS``, or a valid host with one
    character outside the grammar put in."""
    if draw(st.booleans()):
        return draw(st.sampled_from(BAD_HOSTS))
    host = draw(hosts)
    pos = draw(st.integers(0, len(host)))
    return host[:pos] + draw(st.sampled_from([b" ", b"@", b"/", b"\\", b"#", b"?", b"\x80", b'"',
                                              b"<", b"%z", b"^", b"|", b"`", b"{"])) + host[pos:]


# -- targets --------------------------------------------------------------------

_ABSOLUTE_AUTHORITY = re.compile(rb"[^:]*://([^/?]*)")


@st.composite
def absolute_forms(draw):
    """``http(s)://host[:port]`` then a path, a query or nothing (the scheme
    in any case)."""
    scheme = _case(draw, draw(st.sampled_from([b"http", b"https"])))
    rest = draw(st.one_of(origin_forms(), st.just(b""),
                          _bytes_of(_PCHAR + b"/?", 0, 20).map(lambda q: b"?" + q)))
    return scheme + b"://" + draw(hosts) + rest


@st.composite
def targets(draw, method: bytes):
    """A request-target of a form httptp serves: origin-form mostly,
    absolute-form, ``*`` with OPTIONS."""
    kind = draw(st.integers(0, 9))
    if kind == 0 and method == b"OPTIONS":
        return b"*"
    if kind <= 2:
        return draw(absolute_forms())
    return draw(origin_forms())


# -- messages -------------------------------------------------------------------

@dataclass
class Message:
    """A message as wire lines, with what it parses to when it is valid.

    ``lines[0]`` is the start line; every line keeps its own line ending so a
    mutation can change one.  ``body`` is the framed body (chunked encoding
    included).  ``head``/``data`` are the expected events; ``keep_alive``
    says whether a pipelined message after it is read.
    """

    lines: list
    body: bytes = b""
    lead: bytes = b""
    end: bytes = CRLF
    head: object = None
    data: bytes = b""
    tail: bytes = b""           # bytes after a response (make it non-reusable)

    def raw(self) -> bytes:
        return self.lead + b"".join(self.lines) + self.end + self.body + self.tail

    def events(self) -> list:
        return [self.head, *([Data(self.data)] if self.data else []), END]


@st.composite
def chunked_bodies(draw, canonical=False):
    """``(wire bytes, decoded body)`` of a chunked body with extensions and
    trailer fields (``canonical``: no extensions, fields as ``name: value``)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    # canonical: no chunk extensions (finding CHUNK-LINE, test_fuzz_http.py)
    ext = (lambda: b"") if canonical else (lambda: draw(chunk_exts()))
    out = []
    for c in chunks:
        size = b"%x" % len(c)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size, b"00" + size]))
        out.append(size + ext() + CRLF + c + CRLF)
    out.append(draw(st.sampled_from([b"0", b"00", b"000"])) + ext() + CRLF)
    # now and then a long one: trailer fields as large as a head meet its limit
    values = st.one_of(field_values(), _bytes_of(VCHAR, 40, 160))
    for _, _, line in draw(st.lists(field_lines(values=values, canonical=canonical), max_size=3)):
        out.append(line)
    out.append(CRLF)
    return b"".join(out), b"".join(chunks)


_QDTEXT = b"\t !" + bytes(range(0x23, 0x5C)) + bytes(range(0x5D, 0x7F))


@st.composite
def chunk_exts(draw):
    exts = []
    for _ in range(draw(st.integers(0, 2) if draw(st.integers(0, 3)) == 0 else st.just(0))):
        ext = b";" + draw(tokens)
        kind = draw(st.integers(0, 2))
        if kind == 1:
            ext += b"=" + draw(tokens)
        elif kind == 2:
            ext += b'="' + draw(_bytes_of(_QDTEXT, 0, 10)) + b'"'
        exts.append(ext)
    return b"".join(exts)


_CONN_TOKENS = [b"close", b"keep-alive", b"upgrade", b"te", b"x-hop"]


@st.composite
def connection_values(draw):
    words = draw(st.lists(st.sampled_from(_CONN_TOKENS), min_size=1, max_size=3))
    words = [_case(draw, w) for w in words]
    value = words[0]
    for w in words[1:]:
        value += draw(st.sampled_from([b",", b", ", b" , ", b",\t"])) + w
    return value, {w.lower() for w in words}


def _insert(draw, lines: list, line: bytes, pairs: list, pair) -> None:
    """Insert a header line (and its expected pair) at the same random place."""
    i = draw(st.integers(0, len(pairs)))
    lines.insert(1 + i, line)
    pairs.insert(i, pair)


@st.composite
def requests(draw, versions=(b"1.1", b"1.1", b"1.0"), max_body=60, canonical=False):
    """A valid request and its expected events (``Message``).

    The Host (always on 1.1, sometimes on 1.0) is a valid ``host[:port]``,
    whatever the target; with an absolute-form target it is the target's
    authority or another host (the parser keeps the client's Host in the
    head).  ``canonical`` writes every header and trailer field as ``name:
    value`` and no empty line before the request, so that the head is
    exactly the size ``check_request`` measures (finding HEAD-SIZE), and
    chunk-size lines without extensions (finding CHUNK-LINE)."""
    method = draw(st.sampled_from(sorted(KNOWN_METHODS)))
    version = draw(st.sampled_from(versions))
    target = draw(targets(method))
    fields = draw(st.lists(field_lines(canonical=canonical), max_size=6))
    lines = [method + b" " + target + b" HTTP/" + version + CRLF] + [f[2] for f in fields]
    pairs = [(f[0], f[1]) for f in fields]
    if version == b"1.1" or draw(st.booleans()):
        host = draw(hosts)
        if target[:1] not in b"/*" and draw(st.booleans()):   # the target's authority
            host = _ABSOLUTE_AUTHORITY.match(target).group(1)
        name = _case(draw, b"Host")
        _insert(draw, lines, _line(draw, name, host, canonical), pairs, (name, host))
    conn = set()
    if draw(st.integers(0, 2)) == 0:
        value, conn = draw(connection_values())
        name = _case(draw, b"Connection")
        _insert(draw, lines, name + b": " + value + CRLF, pairs, (name, value))
    words = {w.decode() for w in conn}
    keep_alive = "close" not in words and (version == b"1.1" or "keep-alive" in words)
    if "upgrade" in words and draw(st.booleans()):
        _insert(draw, lines, b"Upgrade: websocket" + CRLF, pairs, (b"Upgrade", b"websocket"))
    if draw(st.integers(0, 5)) == 0:       # an ordinary header in a request
        value = draw(st.sampled_from([b"close", b"keep-alive", b"Close"]))
        _insert(draw, lines, b"Proxy-Connection: " + value + CRLF, pairs,
                (b"Proxy-Connection", value))
    expect = draw(st.integers(0, 5)) == 0
    if expect:
        value = _case(draw, b"100-continue")
        _insert(draw, lines, b"Expect: " + value + CRLF, pairs, (b"Expect", value))
    mode = draw(st.sampled_from(["none", "cl", "cl", "chunked"] if version == b"1.1"
                                else ["none", "cl"]))
    content_length, chunked, body, data = None, False, b"", b""
    if mode == "cl":
        data = body = draw(st.binary(max_size=max_body))
        content_length = len(body)
        digits = draw(st.sampled_from([b"%d", b"%d", b"0%d"])) % content_length
        name = _case(draw, b"Content-Length")
        _insert(draw, lines, _line(draw, name, digits, canonical), pairs, (name, digits))
    elif mode == "chunked":
        chunked = True
        body, data = draw(chunked_bodies(canonical))
        value = _case(draw, b"chunked")
        name = _case(draw, b"Transfer-Encoding")
        # no HTAB after the value: both back-ends refuse it (400; m_add_framing draws it)
        _insert(draw, lines, _line(draw, name, value, canonical, htab_after=False), pairs,
                (name, value))
    head = RequestHead(method, target, version, pairs, keep_alive, content_length, chunked,
                       expect)
    # empty lines before the request line: CRLF, or a bare LF (RFC 9112 §2.2)
    lead = b"" if canonical else draw(st.sampled_from([b"", b"", b"", b"", CRLF, CRLF * 2, b"\n",
                                                       b"\r\n\n"]))
    return Message(lines, body, lead, CRLF, head, data)


@st.composite
def pipelines(draw, max_messages=3, **kw):
    """``(wire bytes, expected events)`` of pipelined requests: nothing after a
    request that does not keep the connection alive is read."""
    msgs = draw(st.lists(requests(**kw), min_size=1, max_size=max_messages))
    raw, events = b"".join(m.raw() for m in msgs), []
    for m in msgs:
        events += m.events()
        if not m.head.keep_alive:
            break
    return raw, events


_INTERIM = [100, 102, 103]
_NO_BODY = (204, 304)


@st.composite
def responses(draw, max_body=60):
    """``(method, Message)``: a valid response to ``method``, its expected
    events, optionally preceded by interim 1xx responses and followed by
    stray bytes."""
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    status = draw(st.one_of(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500, 503]),
                            st.integers(200, 599)))
    reason = draw(st.one_of(st.sampled_from([b"OK", b"Not Found", b""]),
                            field_values(max_size=20)))
    sp = b" " if reason or draw(st.booleans()) else b""
    fields = draw(st.lists(field_lines(), max_size=5))
    lines = [b"HTTP/" + version + b" %d" % status + sp + reason + CRLF] + [f[2] for f in fields]
    pairs = [(f[0], f[1]) for f in fields]
    conn = set()
    if draw(st.integers(0, 2)) == 0:
        value, words = draw(connection_values().filter(lambda v: b"upgrade" not in v[1]))
        conn = {w.decode() for w in words}
        _insert(draw, lines, b"Connection: " + value + CRLF, pairs, (b"Connection", value))
    no_body = method == b"HEAD" or status in _NO_BODY
    modes = ["cl", "cl", "chunked", "close"] if version == b"1.1" else ["cl", "close"]
    mode = draw(st.sampled_from(modes))
    content_length, chunked, body, data = None, False, b"", b""
    if mode == "cl" and (not no_body or draw(st.booleans())):
        data = body = b"" if no_body else draw(st.binary(max_size=max_body))
        content_length = draw(st.integers(0, 10**6)) if no_body else len(body)
        _insert(draw, lines, b"Content-Length: %d" % content_length + CRLF, pairs,
                (b"Content-Length", b"%d" % content_length))
    elif mode == "chunked" and (not no_body or draw(st.booleans())):
        chunked = True
        if not no_body:
            body, data = draw(chunked_bodies())
        _insert(draw, lines, b"Transfer-Encoding: chunked" + CRLF, pairs,
                (b"Transfer-Encoding", b"chunked"))
    elif mode == "close" and not no_body:
        data = body = draw(st.binary(max_size=max_body))
    until_close = not no_body and content_length is None and not chunked
    keep_alive = not until_close and "close" not in conn and (
        version == b"1.1" or "keep-alive" in conn)
    tail = b""
    if not until_close and draw(st.integers(0, 4)) == 0:
        # not a lone CRLF after a chunked body (finding STRAY-CRLF)
        tail = draw(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"x"] + ([] if chunked else [CRLF])))
        keep_alive = False
    head = ResponseHead(status, reason, version, pairs, keep_alive, content_length, chunked)
    lead = b""
    for _ in range(draw(st.integers(0, 2) if draw(st.integers(0, 3)) == 0 else st.just(0))):
        interim = draw(st.sampled_from(_INTERIM))
        extra = b"".join(f[2] for f in draw(st.lists(field_lines(), max_size=2)))
        lead += b"HTTP/" + version + b" %d Interim\r\n" % interim + extra + CRLF
    return method, Message(lines, body, lead, CRLF, head, data, tail)


# -- mutations --------------------------------------------------------------------

_CTL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
_HUGE = [b"99999999999999999999999", b"18446744073709551616", b"9223372036854775808",
         b"1000000000000000000", b"999999999999999999", b"4294967296"]


def _pick_line(draw, m: Message, first=1) -> int | None:
    if len(m.lines) <= first:
        return None
    return draw(st.integers(first, len(m.lines) - 1))


def _header_line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + CRLF


def m_dup_header(draw, m):
    i = _pick_line(draw, m)
    if i is not None:
        m.lines.insert(draw(st.integers(1, len(m.lines))), m.lines[i])


def m_add_framing(draw, m):
    """Content-Length and/or Transfer-Encoding, plain or odd."""
    cl = draw(st.sampled_from([b"0", b"5", b"1, 1", b"+5", b"-1", b"5 5", b"0x5", b"", b" 7",
                               b"\xd9\xa5", b"1_0", *_HUGE]))
    te = draw(st.sampled_from([b"chunked", b"gzip", b"gzip, chunked", b"chunked, gzip",
                               b"identity", b"chunked, chunked", b"xchunked", b"chunked\x00",
                               b"\"chunked\"", b"chunked;q=1", b"Chunked", b"chunked\t",
                               b"chunked \t", b"chunked\t "]))
    what = draw(st.sampled_from(["cl", "te", "both"]))
    if what in ("cl", "both"):
        m.lines.insert(draw(st.integers(1, len(m.lines))),
                       _header_line(_case(draw, b"Content-Length"), cl))
    if what in ("te", "both"):
        m.lines.insert(draw(st.integers(1, len(m.lines))),
                       _header_line(_case(draw, b"Transfer-Encoding"), te))


def m_obs_fold(draw, m):
    i = _pick_line(draw, m)
    if i is not None:
        line = m.lines[i].rstrip(b"\r\n")
        cut = draw(st.integers(0, len(line)))
        m.lines[i] = line[:cut] + CRLF + draw(st.sampled_from([b" ", b"\t", b"  "])) + \
            line[cut:] + CRLF


def m_line_ending(draw, m):
    """One line ends in a bare LF, a bare CR, LF CR, or CR CR LF."""
    eol = draw(st.sampled_from([b"\n", b"\r", b"\n\r", b"\r\r\n", b"\r\n\r"]))
    i = draw(st.integers(0, len(m.lines)))
    if i == len(m.lines):
        m.end = eol
    else:
        m.lines[i] = m.lines[i].rstrip(b"\r\n") + eol


def m_inline_byte(draw, m):
    """A control character, bare CR/LF, NUL, DEL, obs-text, space or colon
    inside a line."""
    i = draw(st.integers(0, len(m.lines) - 1))
    line = m.lines[i].rstrip(b"\r\n")
    pos = draw(st.integers(0, len(line)))
    byte = draw(st.one_of(st.sampled_from(_CTL), st.sampled_from(b" :\t\x80\xff;,\"\\")))
    m.lines[i] = line[:pos] + bytes((byte,)) + line[pos:] + CRLF


def m_colon_space(draw, m):
    i = _pick_line(draw, m)
    if i is not None:
        m.lines[i] = m.lines[i].replace(b":", draw(st.sampled_from([b" :", b"\t:", b"::", b""])), 1)


_ODD_TARGETS = [b"", b"/a b", b"/a\x01", b"/\xe9", b"/a#frag", b"//", b"*", b"a", b"?a", b"%2F",
                b"http://[::1]:80/", b"example.com:443", b"/%zz", b"/" + b"a" * 300,
                b"http://u@a/", b"http://u:p@a/", b"http://@a/", b"http://", b"http:///",
                b"https://a b/", b"ftp://a/", b"http:/a/", b"http://a:b/", b"http://[::1/",
                b"http://a%zz/", b"http://a\x7f/", b"HTTPS://[v1.x]/", b"http://[V1.x]/",
                b"http://a/#f", b"http://a?#", b"http://a#", b"*a", b"http://a:80:80/"]


def m_start_line(draw, m):
    """An odd version, method or target in the start line."""
    words = m.lines[0].rstrip(b"\r\n").split(b" ", 2)
    if len(words) < 3:
        return
    which = draw(st.integers(0, 2))
    if words[0].startswith(b"HTTP/"):            # a status line: version, code, reason
        alt = [[b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1x", b"HTTP/1", b"HTTP/0.9",
                b"HTTP/1.10", b"HTTP/01.1", b"ICY"],
               [b"2x0", b"99", b"1000", b"-200", b"0200", b"600", b"101", b"100", b"199"],
               [b"", b"O\x00K", b"O\rK", b"OK\x7f", b"\xffOK"]]
    else:
        alt = [[b"get", b"FOO", b"CONNECT", b"PRI", b"G\x01T", b"", b"GET\t", b"M-SEARCHX",
                b"HEAD", b"GET", b"POST"],
               _ODD_TARGETS,
               [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1x", b"HTTP/1", b"HTTP/0.9",
                b"HTTP/1.1 ", b"HTTP/01.1", b"HTTP/1.10", b""]]
    words[which] = draw(st.sampled_from(alt[which]))
    m.lines[0] = b" ".join(words) + CRLF


def m_host(draw, m):
    """A second Host, none, or a Host value host.py refuses (``bad_hosts``)."""
    hosts_at = [i for i, line in enumerate(m.lines) if line[:5].lower() == b"host:"]
    what = draw(st.integers(0, 2))
    if hosts_at and what == 0:
        del m.lines[draw(st.sampled_from(hosts_at))]
    elif hosts_at and what == 1:
        m.lines[draw(st.sampled_from(hosts_at))] = _header_line(
            _case(draw, b"Host"), draw(bad_hosts()))
    else:
        m.lines.insert(draw(st.integers(1, len(m.lines))), _header_line(
            _case(draw, b"Host"), draw(st.one_of(hosts, bad_hosts()))))


def m_target(draw, m):
    """A request-target of no form httptp serves, built around the drawn
    one: userinfo, a bad authority, another scheme, a missing ``//``, ``*``
    with another method than OPTIONS, no leading ``/``."""
    words = m.lines[0].rstrip(b"\r\n").split(b" ", 2)
    if len(words) < 3 or words[0].startswith(b"HTTP/"):
        return
    method, target = words[0], words[1]
    m_abs = _ABSOLUTE_AUTHORITY.match(target)
    path = target[m_abs.end():] if m_abs else (b"" if target == b"*" else target)
    authority = m_abs.group(1) if m_abs else draw(hosts)
    kind = draw(st.integers(0, 6))
    if kind == 0:
        userinfo = draw(st.sampled_from([b"u", b"u:p", b"", b":", b"u%40x", b"a@b"]))
        target = b"http://" + userinfo + b"@" + authority + path
    elif kind == 1:
        target = _case(draw, b"http") + b"://" + draw(bad_hosts()) + path
    elif kind == 2:
        scheme = draw(st.sampled_from([b"ftp", b"ws", b"httpx", b"http+s", b"h", b"", b"1http"]))
        target = scheme + b"://" + authority + path
    elif kind == 3:
        sep = draw(st.sampled_from([b":/", b":", b"//", b":///", b"/:/"]))
        target = b"http" + sep + authority + path
    elif kind == 4:
        target = b"*" if method != b"OPTIONS" else draw(st.sampled_from([b"*/", b"**", b"*?"]))
    elif kind == 5:
        target = authority + path        # authority-form, or a relative path
    else:
        target = path.lstrip(b"/") or draw(st.sampled_from([b"a", b"?a", b"%2F", b".", b"#"]))
    m.lines[0] = b" ".join((method, target, words[2])) + CRLF


def m_lead(draw, m):
    """Empty lines before the start line, or CRs that end no line (400
    before a request line; before a status line, finding STRAY-CRLF)."""
    m.lead = draw(st.sampled_from([b"\r", b"\r\r\n", b"\n\r", b"\r\n\r", b"\n\r\n\r",
                                   b"\r\n\r\r\n", b"\r\r", b"\n", b"\r\n\n", CRLF * 3])) + m.lead


def m_name_case(draw, m):
    i = _pick_line(draw, m)
    if i is not None:
        name, sep, rest = m.lines[i].partition(b":")
        name = draw(st.sampled_from([name.lower(), name.upper(), name.swapcase()]))
        m.lines[i] = name + sep + rest


def _chunk_size_line(draw, m, bad: bytes):
    eol = draw(st.sampled_from([CRLF, b"\n", b"\r"]))
    cut = m.body.find(CRLF)
    rest = m.body[cut + 2:] if cut >= 0 else b"hello" + CRLF + b"0" + CRLF + CRLF
    m.body = bad + eol + rest


def m_chunk(draw, m):
    """Damage the first chunk-size line (or append a chunked body)."""
    _chunk_size_line(draw, m, draw(st.sampled_from([
        b"z", b"0x5", b"-5", b"f" * 24, b"", b" 5", b"ffffffffffffffff", b"8000000000000000",
        b"5;a=", b"5;=b", b"1" * 17, b"0" * 20 + b"5"])))


def m_chunk_lenient(draw, m):
    """What h11 takes after a chunk size and llhttp does not: whitespace (a
    known difference, tests/unit/test_http_parser.py) and chunk extensions
    that are not ``;token[=value]`` (finding CHUNK-EXT, test_fuzz_http.py)."""
    _chunk_size_line(draw, m, draw(st.sampled_from([
        b"5 ", b"5\t", b"5 ;x", b"5;", b"5;a=\"b", b"5;\x00", b"5; a", b"5;a b", b"5;;"])))


def m_connection(draw, m):
    m.lines.insert(draw(st.integers(1, len(m.lines))), _header_line(
        draw(st.sampled_from([b"Connection", b"Proxy-Connection", b"Upgrade", b"Expect",
                              b"Keep-Alive"])),
        draw(st.sampled_from([b"close", b"keep-alive", b"upgrade", b"Upgrade", b"websocket",
                              b"h2c", b"100-continue", b"close, upgrade", b"", b"te, close"]))))


def m_body_length(draw, m):
    """The body shorter or longer than announced."""
    if draw(st.booleans()) and m.body:
        m.body = m.body[:draw(st.integers(0, len(m.body) - 1))]
    else:
        m.body += draw(st.binary(min_size=1, max_size=20))


# What both back-ends must treat alike (AGREED), and everything.
AGREED = [m_dup_header, m_add_framing, m_obs_fold, m_line_ending, m_inline_byte,
          m_colon_space, m_start_line, m_host, m_target, m_lead, m_name_case, m_chunk,
          m_connection, m_body_length]
STRUCTURAL = AGREED + [m_chunk_lenient]


@st.composite
def byte_mutations(draw, raw: bytes) -> bytes:
    """1-4 byte-level edits: flip, insert, delete, duplicate, truncate."""
    for _ in range(draw(st.integers(1, 4))):
        n = len(raw)
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, n))
        if op == 0 and n:
            pos = min(pos, n - 1)
            raw = raw[:pos] + bytes((raw[pos] ^ (1 << draw(st.integers(0, 7))),)) + raw[pos + 1:]
        elif op == 1:
            ins = draw(st.one_of(st.binary(min_size=1, max_size=4),
                                 st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b":",
                                                  b"\t", b"0", b"f", b"\x80", b"\r\n\r\n",
                                                  b"9" * 20])))
            raw = raw[:pos] + ins + raw[pos:]
        elif op == 2:
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 8)):]
        elif op == 3:
            end = min(n, pos + draw(st.integers(1, 40)))
            raw = raw[:end] + raw[pos:end] + raw[end:]
        else:
            raw = raw[:pos]
    return raw


@st.composite
def damaged_pipelines(draw, structural=STRUCTURAL, bytewise=True):
    """Wire bytes of 1-3 pipelined requests, one of them damaged by 1-3 of
    the ``structural`` mutations, then maybe byte edits over the whole."""
    msgs = draw(st.lists(requests(), min_size=1, max_size=3))
    if structural:
        m = msgs[draw(st.integers(0, len(msgs) - 1))]
        for fn in draw(st.lists(st.sampled_from(structural), min_size=1, max_size=3)):
            fn(draw, m)
    raw = b"".join(m.raw() for m in msgs)
    if bytewise and (not structural or draw(st.booleans())):
        raw = draw(byte_mutations(raw))
    return raw


@st.composite
def damaged_responses(draw, structural=STRUCTURAL, bytewise=True):
    """``(method, wire bytes)`` of a response damaged like ``damaged_pipelines``."""
    method, m = draw(responses())
    if structural:
        for fn in draw(st.lists(st.sampled_from(structural), min_size=1, max_size=3)):
            fn(draw, m)
    raw = m.raw()
    if bytewise and (not structural or draw(st.booleans())):
        raw = draw(byte_mutations(raw))
    return method, raw
