"""The sans-IO HTTP/1.1 parsers: one suite, run against both back-ends
(STYLE.md §7.9, uvicorn's http_protocol_cls pattern)."""

import random

import pytest

from httptp.errors import ProtocolError
from httptp.http.events import END, Data, EndOfMessage, RequestHead, ResponseHead
from httptp.http.parser import select_backend
from tests.fuzz.support import raising

MAX_HEAD = 4096
MAX_BODY = 1000


@pytest.fixture(params=["httptools", "h11"])
def backend(request):
    return select_backend(request.param)


@pytest.fixture
def req(backend):
    return backend.RequestParser(MAX_HEAD, MAX_BODY)


def parse_all(parser, *chunks, eof=True):
    """Every event; a ProtocolError raises (also one that ``feed`` returned as
    the last event, after the whole requests before the bad bytes)."""
    events = []
    for chunk in chunks:
        events += raising(parser.feed(chunk))
    if eof:
        events += raising(parser.feed(b""))
    return events


def messages(events):
    """Group events into (head, body bytes) per complete message."""
    out, head, body = [], None, []
    for ev in events:
        if isinstance(ev, (RequestHead, ResponseHead)):
            assert head is None
            head, body = ev, []
        elif isinstance(ev, Data):
            assert head is not None
            body.append(ev.data)
        else:
            assert isinstance(ev, EndOfMessage)
            out.append((head, b"".join(body)))
            head = None
    assert head is None, "incomplete message"
    return out


def test_select_backend():
    assert select_backend("auto").__name__.endswith("httptools_backend")
    for name in ("httptools", "h11"):
        mod = select_backend(name)
        assert mod.RequestParser and mod.ResponseParser
    with pytest.raises(ValueError):
        select_backend("nope")


# -- valid requests ------------------------------------------------------------

def test_simple_get(req):
    events = req.feed(b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nX-Y: z\r\n\r\n")
    assert events == [RequestHead(b"GET", b"/a?b=c", b"1.1",
                                  [(b"Host", b"example.com"), (b"X-Y", b"z")],
                                  True, None, False, False), END]
    assert req.feed(b"") == []


def test_pipelined_three_in_one_feed(req):
    raw = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
           b"PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    msgs = messages(parse_all(req, raw))
    assert [(h.method, h.target, b) for h, b in msgs] == [
        (b"GET", b"/1", b""), (b"POST", b"/2", b"hello"), (b"PUT", b"/3", b"abc")]
    assert msgs[1][0].content_length == 5 and msgs[2][0].chunked


RAW_PAIR = (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
            b"POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
            b"GET /z HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")


def test_byte_by_byte(req):
    msgs = messages(parse_all(req, *[RAW_PAIR[i:i + 1] for i in range(len(RAW_PAIR))]))
    assert [(h.target, b) for h, b in msgs] == [
        (b"/x", b"hello world"), (b"/y", b"hello world"), (b"/z", b"")]
    assert msgs[2][0].version == b"1.0" and msgs[2][0].keep_alive


def test_whole_and_split_feeds_agree(req, backend):
    whole = messages(parse_all(req, RAW_PAIR))
    for cut in (1, 40, 57, 80, 140, len(RAW_PAIR) - 3):
        other = backend.RequestParser(MAX_HEAD, MAX_BODY)
        assert messages(parse_all(other, RAW_PAIR[:cut], RAW_PAIR[cut:])) == whole


def test_chunk_extensions_ignored(req):
    raw = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;a=b;c=\"d\"\r\nWiki\r\n5;x\r\npedia\r\n0;last\r\n\r\n")
    [(head, body)] = messages(parse_all(req, raw))
    assert body == b"Wikipedia" and head.chunked and head.content_length is None


def test_head_before_body_and_split_body(req):
    events = req.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    assert len(events) == 1 and events[0].content_length == 10
    assert req.feed(b"01234") == [Data(b"01234")]
    assert req.feed(b"56789") == [Data(b"56789"), END]


def test_expect_continue(req):
    [head] = req.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n"
                      b"Content-Length: 3\r\n\r\n")
    assert head.expect_continue
    assert req.feed(b"abc") == [Data(b"abc"), END]


@pytest.mark.parametrize("version,conn,keep_alive", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive, CLOSE", False),
    (b"1.0", None, False),
    (b"1.0", b"Keep-Alive", True),
    (b"1.0", b"close", False),
])
def test_keep_alive(req, version, conn, keep_alive):
    raw = b"GET / HTTP/" + version + b"\r\nHost: a\r\n"
    if conn:
        raw += b"Connection: " + conn + b"\r\n"
    raw += b"\r\n"
    events = req.feed(raw + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events[0].keep_alive is keep_alive
    # after a request that closes the connection, further bytes are ignored
    assert len(events) == (4 if keep_alive else 2)
    assert req.feed(b"") == []


def test_header_case_order_and_ows(req):
    [head, _] = req.feed(b"GET / HTTP/1.1\r\nhOsT: a\r\nX-LoWeR:   v  \r\nx-lower: w\r\n"
                         b"Empty:\r\nObs: caf\xe9\tbar\r\n\r\n")
    assert head.headers == [(b"hOsT", b"a"), (b"X-LoWeR", b"v"), (b"x-lower", b"w"),
                            (b"Empty", b""), (b"Obs", b"caf\xe9\tbar")]


EMPTY_LINES = [b"\r\n", b"\r\n\r\n", b"\n", b"\n\n", b"\r\n\n", b"\n\r\n"]
# RFC 9112 §2.2 allows empty lines before a request line, not lone CRs (llhttp
# and nginx skip both; h11_backend used to lstrip both)
BARE_CRS = [b"\r\r\r\r\r", b"\r", b"\r\r\n", b"\r\n\r", b"\n\r", b"\r\n\r\r\n"]
GET_A = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def _splits(raw: bytes):
    """``raw`` whole, cut in two at every byte, and byte by byte."""
    yield [raw]
    for cut in range(1, len(raw)):
        yield [raw[:cut], raw[cut:]]
    yield [raw[i:i + 1] for i in range(len(raw))]


@pytest.mark.parametrize("lines", EMPTY_LINES, ids=repr)
def test_leading_empty_lines_ignored(backend, lines):
    for chunks in _splits(lines + GET_A + lines + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"):
        p = backend.RequestParser(MAX_HEAD, MAX_BODY)
        assert [h.target for h, _ in messages(parse_all(p, *chunks))] == [b"/", b"/2"], chunks


@pytest.mark.parametrize("crs", BARE_CRS, ids=repr)
@pytest.mark.parametrize("before", [
    b"", GET_A, b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n\r\rx",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n\r\r\r\n0\r\n\r\n",
], ids=["first", "after-get", "after-cl-body", "after-chunked-body"])
def test_bare_cr_before_request_line_is_400(backend, crs, before):
    raw = before + crs + GET_A
    for chunks in _splits(raw):
        p = backend.RequestParser(MAX_HEAD, MAX_BODY)
        events = []
        with pytest.raises(ProtocolError) as e:
            for chunk in chunks:
                events += p.feed(chunk)
            p.feed(b"")
        assert e.value.status == 400, chunks
        # at most the request before: never the one after the CR
        assert len([ev for ev in events if isinstance(ev, RequestHead)]) <= (1 if before else 0)


def test_bare_cr_at_eof_between_requests(req):
    assert req.feed(b"\r") == [] and req.feed(b"") == []


def _random_stream(rnd: random.Random):
    """Pipelined requests with CR/LF-rich bodies, split at random; returns
    (feeds, the (target, body) pairs before the first bad gap, whether one is bad)."""
    data, expected, bad = [], [], False
    for i in range(rnd.randint(1, 5)):
        gap = rnd.choice([b"", b"", b"", b"\r\n", b"\n", b"\r\n\n", b"\r", b"\r\r\n", b"\n\r"])
        bad = bad or b"\r" in gap.replace(b"\r\n", b"")
        body = bytes(rnd.choice(b"\r\n0a") for _ in range(rnd.randint(0, 12)))
        target = b"/%d" % i
        kind = rnd.choice(["get", "cl", "chunked"])
        if kind == "get":
            body = b""
            msg = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        elif kind == "cl":
            msg = (b"POST " + target + b" HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                   % len(body) + body)
        else:
            cut = rnd.randint(0, len(body))
            chunks = b"".join(b"%x;e=1\r\n%s\r\n" % (len(c), c) for c in (body[:cut], body[cut:]) if c)
            msg = (b"POST " + target + b" HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + chunks + b"0\r\n" + rnd.choice([b"", b"T: v\r\n"]) + b"\r\n")
        data.append(gap + msg)
        if not bad:
            expected.append((target, body))
    raw = b"".join(data)
    cuts = sorted(rnd.sample(range(1, len(raw)), min(len(raw) - 1, rnd.randint(0, 8))))
    return [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])], expected, bad


def test_random_pipelines_with_crs_agree_with_the_rule(backend):
    """Bodies full of CR and LF, empty lines and bare CRs between requests,
    random feed boundaries: exactly the requests before a bare CR come out."""
    rnd = random.Random(9112)
    for _ in range(400):
        feeds, expected, bad = _random_stream(rnd)
        p = backend.RequestParser(MAX_HEAD, MAX_BODY)
        events = []
        try:
            for chunk in feeds:
                events += p.feed(chunk)
            events += p.feed(b"")
        except ProtocolError as e:
            assert bad and e.status == 400, feeds
            heads = [ev.target for ev in events if isinstance(ev, RequestHead)]
            assert heads == [t for t, _ in expected][:len(heads)], feeds
            continue
        assert not bad, feeds
        assert [(h.target, b) for h, b in messages(events)] == expected, feeds


@pytest.mark.parametrize("body", [b"\r", b"a\rb", b"\r\r\r", b"ab\r"], ids=repr)
def test_bare_cr_in_a_body_is_data(backend, body):
    raw = (b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
           + b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" + GET_A)
    for chunks in _splits(raw):
        p = backend.RequestParser(MAX_HEAD, MAX_BODY)
        msgs = messages(parse_all(p, *chunks))
        assert [(h.target, b) for h, b in msgs] == [(b"/cl", body), (b"/te", body), (b"/", b"")]


def test_upgrade_parsed_as_plain_request(req):
    raw = (b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Content-Length: 3\r\n\r\nabc"
           b"GET /ws2 HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
           b"POST /c HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nConnection: upgrade\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
           b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
    msgs = messages(parse_all(req, raw))
    assert [(h.target, b) for h, b in msgs] == [
        (b"/ws", b"abc"), (b"/ws2", b""), (b"/c", b"hi"), (b"/last", b"")]
    assert (b"Upgrade", b"websocket") in msgs[0][0].headers


def test_upgrade_body_across_feeds(req):
    events = req.feed(b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nContent-Length: 6\r\n\r\nab")
    events += req.feed(b"cdef")
    events += req.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [(h.target, b) for h, b in messages(events)] == [(b"/ws", b"abcdef"), (b"/", b"")]


def test_eof(req, backend):
    assert req.feed(b"") == []
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    p.feed(b"GET / HTTP/1.1\r\nHo")
    with pytest.raises(ProtocolError) as e:
        p.feed(b"")
    assert e.value.status == 400
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    assert len(p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")) == 2
    with pytest.raises(ProtocolError):
        p.feed(b"")


def test_dead_after_error(req):
    with pytest.raises(ProtocolError):
        req.feed(b"GARBAGE\r\n\r\n")
    with pytest.raises(ProtocolError):
        req.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


# -- invalid requests -----------------------------------------------------------

G = b"GET / HTTP/1.1\r\nHost: a\r\n"
P = b"POST / HTTP/1.1\r\nHost: a\r\n"
TE = P + b"Transfer-Encoding: chunked\r\n\r\n"

INVALID = {
    "cl+te": P + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te+cl": P + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "dup-cl-equal": P + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "dup-cl-differ": P + b"Content-Length: 1\r\ncontent-length: 2\r\n\r\nxy",
    "cl-list": P + b"Content-Length: 1, 1\r\n\r\nx",
    "cl-plus": P + b"Content-Length: +5\r\n\r\nhello",
    "cl-minus": P + b"Content-Length: -1\r\n\r\n",
    "cl-inner-space": P + b"Content-Length: 5 5\r\n\r\nhello",
    "cl-hex": P + b"Content-Length: 0x5\r\n\r\nhello",
    "cl-empty": P + b"Content-Length:\r\n\r\n",
    "cl-huge": P + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "te-gzip": P + b"Transfer-Encoding: gzip\r\n\r\n",
    "te-gzip-chunked": P + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-gzip": P + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-twice": P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-identity": P + b"Transfer-Encoding: identity\r\n\r\n",
    "te-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk-nonhex": TE + b"z\r\nhello\r\n0\r\n\r\n",
    "chunk-0x": TE + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-negative": TE + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk-overlong": TE + b"f" * 24 + b"\r\nhello\r\n0\r\n\r\n",
    "chunk-missing-crlf": TE + b"5\r\nhelloX0\r\n\r\n",
    "chunk-bare-lf": TE + b"5\nhello\r\n0\r\n\r\n",
    "chunk-empty-size": TE + b"\r\nhello\r\n0\r\n\r\n",
    "obs-fold-sp": G + b"X: a\r\n b\r\n\r\n",
    "obs-fold-tab": G + b"X: a\r\n\tb\r\n\r\n",
    "bare-cr-value": G + b"X: a\rb\r\n\r\n",
    "bare-cr-line": G + b"X: ab\r\r\n\r\n",
    "bare-lf-header": b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    "bare-lf-reqline": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-lf-end": G + b"\n",
    "nul-value": G + b"X: a\x00b\r\n\r\n",
    "ctl-value": G + b"X: a\x01b\r\n\r\n",
    "esc-value": G + b"X: a\x1bb\r\n\r\n",
    "del-value": G + b"X: a\x7fb\r\n\r\n",
    "ctl-name": G + b"X\x01: b\r\n\r\n",
    "space-before-colon": G + b"X : b\r\n\r\n",
    "tab-before-colon": G + b"X\t: b\r\n\r\n",
    "empty-name": G + b": b\r\n\r\n",
    "no-colon": G + b"Xb\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    "two-hosts-1.0": b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "http-2.0": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "http-0.9": b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    "http-1.1x": b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n",
    "http-lower": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "http-0.9-simple": b"GET /\r\n\r\n",
    "pri-h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "target-space": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-ctl": b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-tab": b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-nul": b"GET /a\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "method-ctl": b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "method-unknown": b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    "method-lower": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "garbage": b"garbage\r\n\r\n",
    "binary": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "trailing-space-version": b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    "no-target": b"GET HTTP/1.1\r\nHost: a\r\n\r\n",
    # Host must be host[:port] (RFC 3986), in every form of the request-target
    "host-space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host-ctl": b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
    "host-empty": b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    "host-empty-1.0": b"GET / HTTP/1.0\r\nHost: \r\n\r\n",
    "host-space-1.0": b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n",
    "host-userinfo": b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
    "host-slash": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host-bad-port": b"GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n",
    "host-two-ports": b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n",
    "host-non-ascii": b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n",
    "host-bad-v6": b"GET / HTTP/1.1\r\nHost: [::g]:80\r\n\r\n",
    "host-v6-unbracketed": b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",
    "host-bad-pct": b"GET / HTTP/1.1\r\nHost: a%2g\r\n\r\n",
    "absolute-host-space": b"GET http://example/ HTTP/1.1\r\nHost: a b\r\n\r\n",
    "absolute-host-ctl": b"GET http://example/ HTTP/1.1\r\nHost: a\x01\r\n\r\n",
    "absolute-host-empty": b"GET http://example/ HTTP/1.1\r\nHost:\r\n\r\n",
    "absolute-no-host": b"GET http://example/ HTTP/1.1\r\n\r\n",
    # request-targets a reverse proxy does not serve
    "absolute-userinfo": b"GET http://u:p@example/ HTTP/1.1\r\nHost: example\r\n\r\n",
    "absolute-empty-authority": b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-ftp": b"GET ftp://example/x HTTP/1.1\r\nHost: example\r\n\r\n",
    "absolute-bad-port": b"GET http://example:x/ HTTP/1.1\r\nHost: example\r\n\r\n",
    "authority-form": b"GET example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "asterisk-get": b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("raw", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_is_400(req, raw):
    with pytest.raises(ProtocolError) as e:
        parse_all(req, raw)
    assert e.value.status == 400


@pytest.mark.parametrize("raw", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_after_a_valid_one(backend, raw):
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    assert len(p.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")) == 2
    with pytest.raises(ProtocolError) as e:
        parse_all(p, raw)
    assert e.value.status == 400


VALID_HOSTS = [b"a", b"example.com", b"example.com:8080", b"example.com:", b"10.0.0.1:80",
               b"[::1]", b"[2001:db8::1]:443", b"[::ffff:10.0.0.1]", b"[v1.fe80::a+en1]",
               b"xn--caf-dma.example", b"a%2Db", b"a_b-c~d"]


@pytest.mark.parametrize("host", VALID_HOSTS)
def test_valid_hosts(req, host):
    [head, _] = req.feed(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.headers == [(b"Host", host)]


@pytest.mark.parametrize("target", [
    b"http://example/p?q", b"HTTPS://example:8443/", b"http://[::1]:8080/x", b"http://example",
    b"http://example?q", b"//double/slash"])
def test_target_forms_accepted_as_sent(req, target):
    """The parser hands the target on as sent; the pipeline makes absolute-form
    origin-form (see test_http_writer_policy)."""
    [head, _] = req.feed(b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n\r\n")
    assert head.target == target


def test_options_asterisk(req):
    [head, _] = req.feed(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.target == b"*"


def _sized_request(size: int) -> bytes:
    """A canonical request whose header block is exactly ``size`` bytes."""
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    return base.replace(b"X: ", b"X: " + b"v" * (size - len(base)))


def test_header_size_limit_exact(backend):
    for size, ok in ((MAX_HEAD, True), (MAX_HEAD + 1, False)):
        raw = _sized_request(size)
        assert len(raw) == size
        p = backend.RequestParser(MAX_HEAD, MAX_BODY)
        if ok:
            assert len(p.feed(raw)) == 2
        else:
            with pytest.raises(ProtocolError) as e:
                p.feed(raw)
            assert e.value.status == 431


def test_header_size_limit_incomplete(backend):
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(ProtocolError) as e:
        for _ in range(100):
            p.feed(b"v" * 100)
    assert e.value.status == 431


def test_header_size_limit_many_headers(req):
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Header: value\r\n" * 300 + b"\r\n"
    with pytest.raises(ProtocolError) as e:
        req.feed(raw)
    assert e.value.status == 431


def test_header_size_limit_after_pipelined_body(backend):
    # a big body followed by the start of the next head in one feed is not 431
    p = backend.RequestParser(MAX_HEAD, 100_000)
    body = b"b" * 20_000
    events = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + body
                    + b"GET /2 HTTP/1.1\r\nHo")
    events += p.feed(b"st: a\r\n\r\n")
    assert [(h.target, len(b)) for h, b in messages(events)] == [(b"/", 20_000), (b"/2", 0)]


def test_body_limit_content_length_at_head_time(req):
    with pytest.raises(ProtocolError) as e:
        req.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert e.value.status == 413


def test_body_limit_content_length_at_limit(req):
    events = parse_all(req, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % MAX_BODY,
                       b"x" * MAX_BODY)
    assert messages(events)[0][1] == b"x" * MAX_BODY


def test_body_limit_chunked(req):
    assert len(req.feed(TE)) == 1
    req.feed(b"%x\r\n%s\r\n" % (MAX_BODY, b"x" * MAX_BODY))     # exactly at the limit
    with pytest.raises(ProtocolError) as e:
        req.feed(b"1\r\nx\r\n0\r\n\r\n")
    assert e.value.status == 413
    with pytest.raises(ProtocolError):
        req.feed(b"")


# -- what a 413 or 431 knows of the request it refuses (the access log's line) --

def _refusal(parser, *chunks) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        for chunk in chunks:
            raising(parser.feed(chunk))
    return e.value


def _line(err):
    r = err.request
    return None if r is None else (r.method, r.target, r.version)


def test_413_content_length_carries_the_whole_head(req):
    err = _refusal(req, b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: ua\r\n"
                        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert err.status == 413 and _line(err) == (b"POST", b"/up?x=1", b"1.1")
    assert (b"User-Agent", b"ua") in err.request.headers


@pytest.mark.parametrize("split", [False, True])
def test_413_chunked_carries_the_head(backend, split):
    body = b"%x\r\n%s\r\n" % (MAX_BODY + 1, b"x" * (MAX_BODY + 1))
    chunks = [TE.replace(b"POST /", b"PUT /big"), body] if split else \
        [TE.replace(b"POST /", b"PUT /big") + body]
    err = _refusal(backend.RequestParser(MAX_HEAD, MAX_BODY), *chunks)
    assert err.status == 413 and _line(err) == (b"PUT", b"/big", b"1.1")


def test_431_complete_block_carries_the_request_line(req):
    raw = _sized_request(MAX_HEAD + 1).replace(b"GET / HTTP/1.1", b"GET /431 HTTP/1.0")
    err = _refusal(req, raw)
    assert err.status == 431 and _line(err) == (b"GET", b"/431", b"1.0")


@pytest.mark.parametrize("first", [b"", GET_A], ids=["first", "after-a-request"])
def test_431_incomplete_head_carries_the_request_line(backend, first):
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    if first:
        assert len(p.feed(first)) == 2
    err = _refusal(p, b"\r\nDELETE /d?q HTTP/1.1\r\nHo", b"st: a\r\nX: ", *[b"v" * 100] * 50)
    assert err.status == 431 and _line(err) == (b"DELETE", b"/d?q", b"1.1")


def test_431_pipelined_in_one_feed_carries_the_request_line(req):
    raw = GET_A + b"GET /two HTTP/1.1\r\nHost: a\r\n" + b"X-Header: value\r\n" * 300
    err = _refusal(req, raw)
    assert err.status == 431 and _line(err) == (b"GET", b"/two", b"1.1")


def test_431_before_the_request_line_ends_names_no_request(backend):
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    err = _refusal(p, b"GET /", *[b"a" * 100] * 50)
    assert err.status == 431 and err.request is None


KNOWN_DIFFERENCES = {
    # llhttp accepts several spaces between method and target; h11 does not.
    "double-space": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "httptools"),
    # llhttp accepts any number of leading zeros in a chunk size; h11 at most 20 digits.
    "chunk-leading-zeros": (TE + b"0" * 21 + b"5\r\nhello\r\n0\r\n\r\n", "httptools"),
    # h11 accepts whitespace after the chunk size; llhttp (strict) does not.
    "chunk-size-ows": (TE + b"5 \r\nhello\r\n0\r\n\r\n", "h11"),
}


@pytest.mark.parametrize("raw,accepted_by", KNOWN_DIFFERENCES.values(), ids=KNOWN_DIFFERENCES.keys())
def test_known_differences(backend, raw, accepted_by):
    """Pinned, documented drift between the libraries (none is a framing
    ambiguity for us: we re-frame every body with Content-Length)."""
    p = backend.RequestParser(MAX_HEAD, MAX_BODY)
    if backend.__name__.endswith(accepted_by + "_backend"):
        assert len(messages(parse_all(p, raw))) == 1
    else:
        with pytest.raises(ProtocolError):
            parse_all(p, raw)


# -- responses ------------------------------------------------------------------

@pytest.fixture
def resp(backend):
    return backend.ResponseParser(MAX_HEAD)


def response_of(parser, method, *chunks, eof=False):
    parser.start(method)
    return parse_all(parser, *chunks, eof=eof)


def test_response_content_length(resp):
    events = response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                       b"Content-Length: 5\r\n\r\nhello")
    [(head, body)] = messages(events)
    assert head == ResponseHead(200, b"OK", b"1.1", [(b"Content-Type", b"text/plain"),
                                                     (b"Content-Length", b"5")], True, 5, False)
    assert body == b"hello"


def test_response_chunked_byte_by_byte(resp):
    raw = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [(head, body)] = messages(response_of(resp, b"POST", *[raw[i:i + 1] for i in range(len(raw))]))
    assert (head.status, head.reason, head.chunked, head.keep_alive) == (201, b"Created", True, True)
    assert body == b"hello world"


def test_response_until_close(resp):
    resp.start(b"GET")
    events = resp.feed(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nsome")
    events += resp.feed(b" body")
    assert not any(isinstance(e, EndOfMessage) for e in events)
    events += resp.feed(b"")
    [(head, body)] = messages(events)
    assert body == b"some body" and not head.keep_alive and head.content_length is None


def test_response_http10(resp):
    [(head, _)] = messages(response_of(resp, b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert head.version == b"1.0" and not head.keep_alive
    [(head, _)] = messages(response_of(resp, b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n"
                                                     b"Connection: keep-alive\r\n\r\n"))
    assert head.keep_alive
    [(head, _)] = messages(response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                                                     b"Connection: close\r\n\r\n"))
    assert not head.keep_alive


def test_response_to_head_has_no_body(resp):
    events = response_of(resp, b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    [(head, body)] = messages(events)
    assert head.content_length == 1234 and body == b"" and head.keep_alive


@pytest.mark.parametrize("status", [204, 304])
def test_response_without_body_status(resp, status):
    raw = b"HTTP/1.1 %d X\r\nETag: \"a\"\r\n\r\n" % status
    [(head, body)] = messages(response_of(resp, b"GET", raw))
    assert head.status == status and body == b"" and head.keep_alive


def test_response_interim_skipped(resp):
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    events = response_of(resp, b"POST", raw[:10], raw[10:30], raw[30:])
    [(head, body)] = messages(events)
    assert head.status == 200 and body == b"ok"


def test_response_reuse(resp):
    for i in range(3):
        [(head, body)] = messages(response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\n"
                                              b"Content-Length: 1\r\n\r\n%d" % i))
        assert body == b"%d" % i


def test_response_bytes_after_end_prevent_reuse(resp):
    [(head, _)] = messages(response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
                                                     b"xHTTP/1.1 200 OK\r\n"))
    assert not head.keep_alive


RESPONSE_INVALID = {
    "garbage": b"garbage\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "bad-status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "http-2": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "cl+te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "dup-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "dup-cl-equal": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "ctl": b"HTTP/1.1 200 OK\r\nX: a\x01\r\nContent-Length: 0\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
}


@pytest.mark.parametrize("raw", RESPONSE_INVALID.values(), ids=RESPONSE_INVALID.keys())
def test_response_invalid(resp, raw):
    with pytest.raises(ProtocolError):
        response_of(resp, b"GET", raw, eof=True)


def test_response_header_too_large(resp):
    with pytest.raises(ProtocolError):
        response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\nX: " + b"v" * MAX_HEAD + b"\r\n\r\n")
    with pytest.raises(ProtocolError):
        response_of(resp, b"GET", b"HTTP/1.1 200 OK\r\nX: ", b"v" * MAX_HEAD, b"v" * MAX_HEAD)


@pytest.mark.parametrize("raw", [
    b"", b"HTTP/1.1 20", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", 
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"HTTP/1.1 100 Continue\r\n\r\n",
])
def test_response_truncated(resp, raw):
    with pytest.raises(ProtocolError) as e:
        response_of(resp, b"GET", raw, eof=True)
    assert e.value.detail == "upstream closed connection"


# -- findings of the fuzz tests (issue 10 §4) ------------------------------------
# Each finding has its regression test in tests/fuzz/test_fuzz_http.py
# (test_finding_*, both back-ends at once); here only what those do not cover.

CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_trailer_fields_never_join_the_head_fed_byte_by_byte(req):
    """A Host (or anything) in a chunked request's trailers is dropped: it must
    not reach the upstream as a header (httptools appended it to the head)."""
    raw = CHUNKED_POST + b"3\r\nabc\r\n0\r\nHost: evil\r\nX-T: 1\r\n\r\n"
    [(head, body)] = messages(parse_all(req, *[raw[i:i + 1] for i in range(len(raw))]))
    assert body == b"abc" and head.headers == [(b"Host", b"a"),
                                               (b"Transfer-Encoding", b"chunked")]


def test_transfer_encoding_with_a_trailing_space_is_still_chunked(req):
    """Only a tab after "chunked" is refused (llhttp does not read it as
    chunked); a trailing space is plain OWS to both back-ends."""
    events = parse_all(req, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked \r\n\r\n"
                            b"1\r\nz\r\n0\r\n\r\n")
    assert messages(events)[0][1] == b"z"
