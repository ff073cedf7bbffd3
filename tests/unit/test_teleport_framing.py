"""Frames inside the decompressed stream (PROTOCOL.md §1.4, §1.8, §1.9)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from httptp.http.events import RequestHead, ResponseHead
from httptp.teleport import FrameTooLarge, FramingError, TeleportError
from httptp.teleport.framing import FrameReader, encode_request, encode_response
from httptp.teleport.handshake import Compress, encode

MAX = 4096

EXAMPLE_REQUEST = b"GET /aaa HTTP/1.1\r\nUser-Agent: fasthttp\r\nHost: foobar0.com\r\n\r\n"
EXAMPLE_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: fasthttp\r\nDate: Fri, 05 May 2017 10:09:23 GMT\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 11\r\n\r\nfoobar0.com")


def frame(req_id: int, msg: bytes) -> bytes:
    return req_id.to_bytes(4, "little") + msg


def read(kind, data, pieces=None, **kw):
    r = FrameReader(kind, kw.pop("max_header_size", MAX), **kw)
    if pieces is None:
        return r.feed(data)
    out = []
    for i in range(0, len(data), pieces):
        out += r.feed(data[i:i + pieces])
    return out


# --- the worked example, byte for byte ---------------------------------------

def test_worked_example_request_bytes():
    assert len(EXAMPLE_REQUEST) == 62 and len(EXAMPLE_RESPONSE) == 146
    wire = encode(Compress.NONE, False) + encode_request(
        1, b"GET", b"/aaa", [(b"User-Agent", b"fasthttp"), (b"Host", b"foobar0.com")], b"")
    assert wire == bytes.fromhex("6874747074656c65706f7274000100") + b"\x01\x00\x00\x00" + EXAMPLE_REQUEST
    assert len(wire) == 15 + 4 + 62


def test_worked_example_response_decodes():
    [(rid, head, body)] = read("response", frame(1, EXAMPLE_RESPONSE))
    assert rid == 1 and body == b"foobar0.com"
    assert head == ResponseHead(200, b"OK", b"1.1", [
        (b"Server", b"fasthttp"), (b"Date", b"Fri, 05 May 2017 10:09:23 GMT"),
        (b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"11")],
        True, 11, False)


# --- encoding ----------------------------------------------------------------

def test_encode_post_adds_content_length():
    out = encode_request(7, b"POST", b"/x", [(b"Host", b"h")], b"abc")
    assert out == frame(7, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    out = encode_request(7, b"DELETE", b"/x", [(b"Host", b"h")], b"")
    assert out.endswith(b"Content-Length: 0\r\n\r\n")


def test_encode_request_refusals():
    with pytest.raises(ValueError, match="missing Host"):
        encode_request(1, b"GET", b"/", [(b"User-Agent", b"x")], b"")
    with pytest.raises(ValueError, match="missing Host"):
        encode_request(1, b"GET", b"/", [(b"Host", b"")], b"")
    with pytest.raises(ValueError, match="body"):
        encode_request(1, b"GET", b"/", [(b"Host", b"h")], b"x")
    with pytest.raises(ValueError, match="body"):
        encode_request(1, b"HEAD", b"/", [(b"host", b"h")], b"x")


def test_encode_response_always_content_length():
    out = encode_response(0xFFFFFFFF, 200, b"OK", [(b"X", b"y")], b"hi")
    assert out == b"\xff\xff\xff\xffHTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 2\r\n\r\nhi"
    # a HEAD answer is passed with an empty body: Content-Length: 0 (PROTOCOL.md §1.9)
    assert encode_response(1, 200, b"OK", [], b"").endswith(b"\r\nContent-Length: 0\r\n\r\n")
    assert encode_response(1, 404, b"", [], b"").startswith(b"\x01\x00\x00\x00HTTP/1.1 404 Not Found\r\n")


@pytest.mark.parametrize("status", [100, 204, 304])
def test_encode_response_without_body(status):
    out = encode_response(1, status, b"R", [(b"ETag", b'"x"')], b"")
    assert b"Content-Length" not in out and out.endswith(b'ETag: "x"\r\n\r\n')
    with pytest.raises(ValueError):
        encode_response(1, status, b"R", [], b"x")


# --- round trips ---------------------------------------------------------------

REQUESTS = [
    (1, b"GET", b"/a?b=c", [(b"Host", b"h"), (b"X-A", b"1")], b""),
    (2, b"POST", b"/p", [(b"Host", b"h"), (b"Content-Type", b"application/json")], b'{"a":1}'),
    (3, b"PUT", b"/big", [(b"Host", b"h")], bytes(range(256)) * 4096),
    (4, b"HEAD", b"/h", [(b"Host", b"h")], b""),
    (0xFFFFFFFF, b"DELETE", b"/d", [(b"Host", b"h")], b""),
    (5, b"POST", b"/one", [(b"Host", b"h")], b"x"),
]


@pytest.mark.parametrize("pieces", [None, 1, 7, 4096])
def test_request_round_trip(pieces):
    data = b"".join(encode_request(*r) for r in REQUESTS)
    if pieces == 1:
        data = data[:300000] if len(data) > 300000 else data
    frames = read("request", data, pieces)
    expected = REQUESTS if pieces != 1 else REQUESTS[:len(frames)]
    assert len(frames) == len(expected) > 0
    for (rid, head, body), (eid, method, target, headers, ebody) in zip(frames, expected):
        assert (rid, head.method, head.target, body) == (eid, method, target, ebody)
        assert head.headers[:len(headers)] == headers
        assert head.keep_alive and head.version == b"1.1" and not head.chunked
        assert head.content_length == (None if method in (b"GET", b"HEAD") else len(ebody))


def test_response_round_trip_split_everywhere():
    responses = [(1, 200, b"OK", [(b"Content-Type", b"text/plain")], b"hello"),
                 (9, 204, b"No Content", [], b""),
                 (3, 500, b"Internal Server Error", [], b"x" * 70000),
                 (4, 304, b"Not Modified", [(b"ETag", b'"e"')], b"")]
    data = b"".join(encode_response(*r) for r in responses)
    for pieces in (None, 1, 3, 100):
        frames = read("response", data, pieces)
        assert [(i, h.status, h.reason, b) for i, h, b in frames] == \
            [(i, s, r, b) for i, s, r, _, b in responses]


def test_4mib_body():
    body = b"z" * (4 << 20)
    [(rid, head, got)] = read("request", encode_request(1, b"POST", b"/", [(b"Host", b"h")], body), 65536)
    assert got == body and head.content_length == len(body)


# --- reader rules ----------------------------------------------------------------

def test_blank_lines_before_start_line_are_skipped():
    data = frame(1, b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for pieces in (None, 1):
        [(rid, head, body)] = read("request", data, pieces)
        assert (rid, head.target, body) == (1, b"/", b"")


def test_get_and_head_bodies_are_ignored_and_dropped():
    data = frame(1, b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n") + \
        frame(2, b"HEAD / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    frames = read("request", data)
    assert [(i, b) for i, _, b in frames] == [(1, b""), (2, b"")]
    for _, head, _ in frames:
        assert head.headers == [(b"Host", b"h")]
        assert head.content_length is None and not head.chunked


def test_post_without_length_has_empty_body():
    [(_, head, body)] = read("request", frame(1, b"POST / HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert body == b"" and head.content_length is None


def test_chunked_request_with_trailers():
    data = frame(3, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
                    b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n") + \
        frame(4, b"POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    for pieces in (None, 1, 5):
        frames = read("request", data, pieces)
        assert [(i, b) for i, _, b in frames] == [(3, b"hello0123456789"), (4, b"")]
        assert frames[0][1].chunked and frames[0][1].content_length is None


def test_transfer_encoding_identity_is_ignored():
    data = frame(1, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n"
                    b"Content-Length: 2\r\n\r\nok")
    [(_, head, body)] = read("request", data)
    assert body == b"ok" and not head.chunked


def test_expect_continue_and_raw_names():
    data = frame(1, b"PUT / HTTP/1.1\r\nhost: h\r\nexpect: 100-Continue\r\ncontent-length: 1\r\n\r\nx")
    [(_, head, body)] = read("request", data)
    assert head.expect_continue and body == b"x"
    assert head.headers[0] == (b"host", b"h")


def test_duplicate_equal_content_length_is_accepted():
    data = frame(1, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    assert read("request", data)[0][2] == b"ok"


def test_header_values_lose_surrounding_whitespace():
    [(_, head, _)] = read("request", frame(1, b"GET / HTTP/1.1\r\nHost:  h \t\r\nX-Empty:\r\n\r\n"))
    assert head.headers == [(b"Host", b"h"), (b"X-Empty", b"")]


@pytest.mark.parametrize("status", [100, 204, 304])
def test_responses_without_body(status):
    data = frame(1, b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status) + \
        frame(2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    frames = read("response", data)
    assert [(i, h.status, b) for i, h, b in frames] == [(1, status, b""), (2, 200, b"ok")]
    assert frames[0][1].content_length == 5


def test_head_response_via_is_head():
    data = frame(1, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n") + \
        frame(2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    frames = read("response", data, is_head=lambda rid: rid == 1)
    assert [(i, b) for i, _, b in frames] == [(1, b""), (2, b"ok")]
    assert frames[0][1].content_length == 9          # kept for the HTTP leg


def test_chunked_response_and_status_line_variants():
    data = frame(1, b"HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n") + \
        frame(2, b"HTTP/1.0 201 \r\nContent-Length: 0\r\n\r\n")
    frames = read("response", data)
    assert [(h.status, h.reason, h.version, b) for _, h, b in frames] == \
        [(200, b"", b"1.1", b"ok"), (201, b"", b"1.0", b"")]


def test_header_block_limit():
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 100 + b"\r\n\r\n"
    assert read("request", frame(1, head), max_header_size=len(head))
    with pytest.raises(FramingError, match="header block"):
        read("request", frame(1, head), max_header_size=len(head) - 1)
    with pytest.raises(FramingError, match="header block"):       # never ends: fails early
        read("request", frame(1, b"GET / HTTP/1.1\r\nX: " + b"a" * 200), 10, max_header_size=100)


# --- limits: one byte under and one byte over each ----------------------------

LIMIT = 100


def post(req_id: int, body: bytes, host=b"h") -> bytes:
    return frame(req_id, b"POST /p HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)


def chunked(req_id: int, sizes, kind=b"POST /p HTTP/1.1\r\nHost: h") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes)
    return frame(req_id, kind + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


def response(req_id: int, body: bytes) -> bytes:
    return frame(req_id, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("pieces", [None, 1, 7])
def test_request_body_at_the_limit_is_read(pieces):
    [(rid, head, body)] = read("request", post(1, b"b" * LIMIT), pieces, max_body_size=LIMIT)
    assert rid == 1 and body == b"b" * LIMIT
    [(rid, head, body)] = read("request", chunked(2, [60, 40]), pieces, max_body_size=LIMIT)
    assert body == b"c" * LIMIT


@pytest.mark.parametrize("pieces", [None, 1, 7, 64])
def test_request_body_over_the_limit_is_refused_and_skipped_in_sync(pieces):
    """A Content-Length one byte over: the frame comes out with body None,
    its bytes are skipped, and the frames around it are read as usual."""
    stream = post(1, b"a" * 5) + post(2, b"x" * (LIMIT + 1)) + post(3, b"b" * 7)
    frames = read("request", stream, pieces, max_body_size=LIMIT)
    assert [(rid, body) for rid, _, body in frames] == [(1, b"a" * 5), (2, None), (3, b"b" * 7)]
    refused = frames[1][1]
    assert refused.method == b"POST" and refused.content_length == LIMIT + 1


def test_a_skipped_body_is_never_held():
    """2 GB announced, fed a MiB at a time: the reader holds nothing of it."""
    r = FrameReader("request", MAX, max_body_size=LIMIT)
    out = r.feed(frame(1, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2000000000\r\n\r\n"))
    assert [(rid, body) for rid, _, body in out] == [(1, None)]
    zeros = bytes(1 << 20)
    for _ in range(64):
        assert r.feed(zeros) == []
        assert len(r._buf) == 0
    assert r._skip == 2_000_000_000 - 64 * len(zeros)


@pytest.mark.parametrize("pieces", [None, 1, 7])
def test_chunked_request_over_the_limit_closes(pieces):
    with pytest.raises(FrameTooLarge) as e:
        read("request", chunked(4, [60, 41]), pieces, max_body_size=LIMIT)
    assert (e.value.what, e.value.req_id, e.value.limit) == ("body", 4, LIMIT)
    assert isinstance(e.value, FramingError)


@pytest.mark.parametrize("pieces", [None, 1, 7])
def test_response_body_limit(pieces):
    [(rid, _, body)] = read("response", response(5, b"r" * LIMIT), pieces, max_body_size=LIMIT)
    assert body == b"r" * LIMIT
    with pytest.raises(FrameTooLarge) as e:
        read("response", response(5, b"r" * (LIMIT + 1)), pieces, max_body_size=LIMIT)
    assert (e.value.what, e.value.req_id, e.value.size) == ("body", 5, LIMIT + 1)
    chunked_response = chunked(6, [LIMIT, 1], kind=b"HTTP/1.1 200 OK")
    with pytest.raises(FrameTooLarge) as e:
        read("response", chunked_response, pieces, max_body_size=LIMIT)
    assert e.value.req_id == 6


@pytest.mark.parametrize("kind", ["request", "response"])
@pytest.mark.parametrize("pieces", [None, 1, 5])
def test_header_block_one_byte_under_and_over(kind, pieces):
    start = b"GET / HTTP/1.1" if kind == "request" else b"HTTP/1.1 204 No Content"
    head = start + b"\r\nHost: h\r\nX-Pad: "
    head += b"p" * (LIMIT - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == LIMIT
    assert len(read(kind, frame(9, head), pieces, max_header_size=LIMIT)) == 1
    with pytest.raises(FrameTooLarge) as e:
        read(kind, frame(9, head), pieces, max_header_size=LIMIT - 1)
    assert (e.value.what, e.value.req_id) == ("header", 9)


def test_a_head_that_never_ends_fails_at_the_limit_without_growing():
    r = FrameReader("request", LIMIT)
    r.feed(frame(3, b"GET / HTTP/1.1\r\nX: "))
    with pytest.raises(FrameTooLarge):
        for _ in range(LIMIT):
            r.feed(b"a")
    assert len(r._buf) <= LIMIT + 4 + 6


@pytest.mark.parametrize("msg", [
    b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 1\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 2000,
    b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
])
def test_malformed_requests(msg):
    with pytest.raises(FramingError) as info:
        read("request", frame(1, msg))
    assert isinstance(info.value, TeleportError)


@pytest.mark.parametrize("msg", [
    b"HTTP/1.1 200 OK\r\n\r\n",                                      # Go would read until EOF
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nbad trailer\r\n\r\n",
])
def test_malformed_responses(msg):
    with pytest.raises(FramingError):
        read("response", frame(1, msg))


@pytest.mark.parametrize("method", [b"GET", b"POST"])
@pytest.mark.parametrize("hosts", [
    b"Host: a b\r\n", b"Host:\r\n", b"Host: u@a\r\n", b"Host: a/b\r\n", b"Host: a:8o\r\n",
    b"Host: caf\xc3\xa9\r\n", b"Host: [::g]\r\n", b"Host: a\r\nhost: a\r\n",
], ids=["space", "empty", "userinfo", "slash", "port", "non-ascii", "bad-v6", "two"])
def test_request_frame_with_an_invalid_host(method, hosts):
    """The Host rule of the HTTP parsers (httptp.http.host), on each frame,
    also when the same headers came before with a valid Host."""
    msg = method + b" /x HTTP/1.1\r\n" + hosts + b"Content-Length: 0\r\n\r\n"
    with pytest.raises(FramingError, match="Host"):
        read("request", frame(1, msg))
    good = encode_request(1, method, b"/x", [(b"Host", b"example.com:8080")], b"")
    with pytest.raises(FramingError, match="Host"):
        read("request", good + good.replace(b"1.1\r\nHost: example.com:8080\r\n",
                                            b"1.1\r\n" + hosts))


def test_request_frame_hosts_that_are_valid():
    for host in (b"a", b"example.com:8080", b"10.0.0.1:80", b"[::1]:443", b"a%2Db"):
        [(_, head, _)] = read("request", encode_request(1, b"GET", b"/", [(b"Host", host)], b""))
        assert head.headers == [(b"Host", host)]
    [(_, head, _)] = read("request", frame(1, b"GET / HTTP/1.1\r\nX: y\r\n\r\n"))   # none: as before
    [(_, head, _)] = read("response", frame(1, b"HTTP/1.1 200 OK\r\nHost: a b\r\n"
                                                b"Content-Length: 0\r\n\r\n"))  # not a request


def test_response_without_content_length_message():
    with pytest.raises(FramingError, match="response without Content-Length"):
        read("response", frame(1, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"))


def test_partial_data_yields_nothing_until_complete():
    data = encode_request(1, b"POST", b"/", [(b"Host", b"h")], b"0123456789")
    r = FrameReader("request", MAX)
    assert r.feed(data[:-1]) == []
    [(rid, head, body)] = r.feed(data[-1:] + data[:3])
    assert body == b"0123456789" and isinstance(head, RequestHead)
    assert r.feed(data[3:]) and r.feed(b"") == []


def test_kind_is_checked():
    with pytest.raises(ValueError):
        FrameReader("both", MAX)


def test_request_ids_that_look_like_crlf():
    data = b"".join(encode_request(rid, b"POST", b"/", [(b"Host", b"h")], b"\r\n\r\n")
                    for rid in (0x0A0D0A0D, 0x0D0A0D0A, 0, 0x0A0D0000))
    for pieces in (None, 1, 2, 3):
        frames = read("request", data, pieces)
        assert [(i, b) for i, _, b in frames] == \
            [(0x0A0D0A0D, b"\r\n\r\n"), (0x0D0A0D0A, b"\r\n\r\n"), (0, b"\r\n\r\n"), (0x0A0D0000, b"\r\n\r\n")]


@pytest.mark.parametrize("kind, msg, what", [
    ("request", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
     "malformed request line b'GET /a b HTTP/1.1'"),
    ("request", b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
     "malformed header line b'Bad Name: x'"),
    ("response", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
     "malformed status line b'HTTP/1.1 2000 OK'"),
    ("response", b"HTTP/1.1 200 OK\r\nX\x01: y\r\n\r\n", "malformed header line b'X\\x01: y'"),
])
def test_malformed_head_errors_name_the_line(kind, msg, what):
    with pytest.raises(FramingError) as info:
        read(kind, frame(1, msg))
    assert str(info.value) == what


def test_header_values_keep_inner_whitespace_and_drop_outer():
    values = [b"a", b" a", b"a ", b"\ta\t", b"a b", b"a \t b", b"  ", b"\t", b"", b"\x80\xff",
              b" x\ty ", b":", b": :"]
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X%d:%s\r\n" % (i, v)
                                                    for i, v in enumerate(values)) + b"\r\n"
    [(_, h, _)] = read("request", frame(1, head))
    assert h.headers[1:] == [(b"X%d" % i, v.strip(b" \t")) for i, v in enumerate(values)]


# --- remembered header blocks (the same headers, another Content-Length) -----

def test_repeated_heads_with_other_lengths(monkeypatch):
    from httptp.teleport import framing
    monkeypatch.setattr(framing, "HEAD_CACHE_SIZE", 2)          # cleared as it fills, too
    hdrs = [(b"Host", b"h"), (b"Content-Type", b"application/json")]
    bodies = [b"x" * n for n in (0, 1, 10, 1, 0, 300, 10)]
    data = b"".join(encode_request(i + 1, b"POST", b"/%d" % i, hdrs, body)
                    for i, body in enumerate(bodies))
    data += encode_request(99, b"GET", b"/g", hdrs, b"") * 2
    frames = read("request", data, 7)
    assert [(i, h.target, h.content_length, b) for i, h, b in frames[:-2]] == \
        [(i + 1, b"/%d" % i, len(body), body) for i, body in enumerate(bodies)]
    assert [h.headers for _, h, _ in frames[:-2]] == \
        [hdrs + [(b"Content-Length", b"%d" % len(body))] for body in bodies]
    assert [(h.headers, h.content_length) for _, h, _ in frames[-2:]] == [(hdrs, None)] * 2
    frames[0][1].headers.append((b"X", b"y"))                  # each head owns its list
    assert frames[3][1].headers == hdrs + [(b"Content-Length", b"1")]
    assert frames[-1][1].headers is not frames[-2][1].headers


@pytest.mark.parametrize("first, msg, what", [
    # the last line conflicts before the end-of-block check
    (None, b"POST / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n", "conflicting Content-Length headers"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
     "both Content-Length and Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok",
     b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
     "conflicting Content-Length headers"),
])
def test_a_remembered_block_keeps_the_errors_of_the_whole(first, msg, what):
    """The block without its last Content-Length line is remembered; the
    whole block's own error still wins, remembered (``first``) or not."""
    for data in [frame(1, msg)] + ([frame(1, first) + frame(2, msg)] if first else []):
        with pytest.raises(FramingError) as info:
            read("request", data)
        assert str(info.value) == what


def test_a_new_last_field_reads_one_line(monkeypatch):
    """Our proxies add a request id before Content-Length, new every time:
    a block that differs from a remembered one only in its last line reads
    that line alone, and gives what the whole block gives."""
    from httptp.teleport import framing
    base = [(b"Host", b"h"), (b"Content-Type", b"application/json")]
    msgs = [(b"POST", base + [(b"X-Request-Id", b"ab-%x" % i)], b"x" * i) for i in range(1, 6)]
    msgs.append((b"GET", base + [(b"X-Request-Id", b"ab-ff")], b""))
    msgs.append((b"GET", base + [(b"X-Request-Id", b"ab-100")], b""))
    data = b"".join(encode_request(i + 1, m, b"/", h, b) for i, (m, h, b) in enumerate(msgs))
    calls = []
    real = framing._block
    monkeypatch.setattr(framing, "_block", lambda *a: calls.append(a) or real(*a))
    frames = FrameReader("request", MAX).feed(data)
    assert len(calls) == 2          # the first POST and the first GET; the rest from memory
    assert [h.headers for _, h, _ in frames] == [
        h + ([(b"Content-Length", b"%d" % len(b))] if m == b"POST" else []) for m, h, b in msgs]
    assert [b for _, _, b in frames] == [b for _, _, b in msgs]
    assert all(not h.expect_continue and not h.chunked for _, h, _ in frames)


_LINES = [b"Host: h", b"Host: other", b"Host: a b", b"X-Id: 1", b"X-Id: 2", b"X-Id:", b"x-id: \t3 ",
          b"Expect: 100-continue", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
          b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: x", b"bad line",
          b"X-Bin: \x80", b"X-Ctl: a\x01", b"Cookie: a=b"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_LINES), max_size=3),
       st.lists(st.tuples(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]),
                          st.lists(st.sampled_from(_LINES), max_size=2),
                          st.sampled_from([None, b"0", b"3", b"12"])),
                min_size=1, max_size=8))
def test_remembered_blocks_read_as_fresh_ones(prefix, messages):
    """One reader, remembering blocks and last lines, gives each frame (or
    error) that a fresh reader gives it.  The messages share their first
    lines, as a peer's do, and differ in their last ones."""
    for kind in ("request", "response"):
        one = FrameReader(kind, MAX)
        for i, (method, last, length) in enumerate(messages):
            lines = prefix + last
            start = (b"%s / HTTP/1.1" % method) if kind == "request" else b"HTTP/1.1 200 OK"
            body = b""
            block = b"".join(line + b"\r\n" for line in lines)
            if length is not None:
                block += b"Content-Length: " + length + b"\r\n"
                if kind == "response" or method in (b"POST", b"PUT"):   # a GET's is not read
                    body = b"y" * int(length)
            data = frame(i + 1, start + b"\r\n" + block + b"\r\n" + body)
            try:
                want = FrameReader(kind, MAX).feed(data)
            except FramingError as e:
                want = str(e)
            try:
                got = one.feed(data)
            except FramingError as e:
                got = str(e)
                one = FrameReader(kind, MAX)     # a failed reader is done: start afresh
            assert got == want
            if isinstance(got, list):
                assert [h.headers for _, h, _ in got] == [h.headers for _, h, _ in want]
                if not got:                     # a chunked body this test does not frame
                    one = FrameReader(kind, MAX)
