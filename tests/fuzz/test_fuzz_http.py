"""Property and fuzz tests of the two HTTP/1.1 back-ends (docs/fuzzing.md).

Every test runs both back-ends on the same bytes.  Properties:

- valid messages drawn from the grammar parse to exactly the drawn events,
  whole or split anywhere, on both back-ends (so they agree);
- damaged messages: only ProtocolError (400/413/431) escapes, a split feed
  gives what a byte-by-byte feed gives (events, or the same status after a
  prefix of them), and the back-ends agree on structural damage;
- limits (drawn anywhere, or at the size of a drawn head, trailer block or
  body, give or take a byte or two) are kept the same way whole, split
  anywhere and on both back-ends;
- what a parser holds between feeds stays within its header limit plus
  one feed;
- ``httptp.http.writer`` output reads back as written.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from httptp.errors import BadGateway, HeaderTooLarge, PayloadTooLarge, ProtocolError
from httptp.http import writer
from httptp.http.events import END, Data, RequestHead, ResponseHead
from tests.fuzz.http_messages import (AGREED, damaged_pipelines, damaged_responses, field_lines,
                                      field_values, origin_forms, pipelines, responses, tokens)
from tests.fuzz.support import (BACKENDS, agree, bytewise, coalesce, cuts, run_parser,
                                same_outcome, without_known_drift as normal)

MAX_HEAD, MAX_BODY = 1 << 16, 1 << 20      # far from anything drawn: no limit in play


# Open findings of these tests, pinned by the strict xfails at the end, are
# stepped around until they are fixed: here those of responses, predicates
# on the lowercased wire bytes; elsewhere TE-CASE
# (support.without_known_drift), HEAD-SIZE and CHUNK-LINE
# (requests(canonical=True)), TRAILER-SIZE (the limit test), CHUNK-EXT
# (m_chunk_lenient is not in AGREED).
_STRAY_CRLF = re.compile(rb"^[\r\n]|\r\n\r\n[\r\n]")
_RESPONSE_FINDINGS = {
    # llhttp skips CR and LF around responses: before the status line, and
    # after a chunked response in the same read
    "STRAY-CRLF": lambda low: _STRAY_CRLF.search(low),
}


def _known(raw: bytes) -> bool:
    low = raw.lower()
    return any(found(low) for found in _RESPONSE_FINDINGS.values())


def _requests(backend, pieces, max_head=MAX_HEAD, max_body=MAX_BODY, bound=None):
    return run_parser(backend.RequestParser(max_head, max_body), pieces, bound=bound)


def _response(backend, method, pieces, max_head=MAX_HEAD, bound=None):
    return run_parser(backend.ResponseParser(max_head), pieces, start=method, bound=bound)


# -- requests ---------------------------------------------------------------------

@given(pipelines(), st.data())
def test_valid_requests_parse_as_drawn(case, data):
    raw, expected = case
    pieces = data.draw(cuts(raw))
    for name, be in BACKENDS.items():
        for feeds in ([raw], pieces):
            events, status = _requests(be, feeds)
            assert status is None, name
            assert normal(events) == normal(expected), name


@given(damaged_pipelines(AGREED, bytewise=False))
def test_backends_agree_on_damaged_requests(raw):
    agree(*(_requests(be, [raw]) for be in BACKENDS.values()))


@given(damaged_pipelines(), st.data())
def test_damaged_requests_parse_the_same_split_anywhere(raw, data):
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        reference = _requests(be, bytewise(raw))
        same_outcome(reference, _requests(be, [raw]))
        same_outcome(reference, _requests(be, pieces))


_BLOCK_END = re.compile(rb"\r\n\r\n")
_TRAILER_BLOCK = re.compile(rb"\r\n0+\r\n((?:[!-~][^\r\n]*\r\n)+)\r\n")


def _trailer_sizes(raw: bytes) -> list:
    """What each trailer block of a canonical pipeline counts against the
    header limit (its ``name: value`` lines)."""
    return [len(m.group(1)) for m in _TRAILER_BLOCK.finditer(raw)]


@st.composite
def limits(draw, case):
    """``(max_head, max_body)`` for a pipeline: anywhere in a range, or at a
    boundary of the drawn messages (a head's or a trailer block's size, a
    body's length, give or take a byte or two), where off-by-ones live."""
    raw, events = case
    if draw(st.integers(0, 2)) == 0:
        return draw(st.integers(20, 300)), draw(st.integers(0, 100))
    blocks, start = [], 0
    for m in _BLOCK_END.finditer(raw):
        blocks.append(m.end() - start)
        start = m.end()
    trailers = _trailer_sizes(raw)
    sizes = trailers if trailers and draw(st.booleans()) else blocks
    lengths = [len(ev.data) for ev in coalesce(events) if isinstance(ev, Data)]
    lengths += [ev.content_length for ev in events
                if isinstance(ev, RequestHead) and ev.content_length is not None]
    near = st.sampled_from([0, 0, 1, -1, 2, -2])
    max_head = max(1, draw(st.sampled_from(sizes)) + draw(near))
    max_body = max(0, draw(st.sampled_from(lengths or [0])) + draw(near))
    return max_head, max_body


@given(pipelines(max_body=120, canonical=True), st.data())
def test_request_limits_are_kept_the_same_way_split_anywhere(case, data):
    raw, _ = case
    max_head, max_body = data.draw(limits(case))
    assume(max_head not in _trailer_sizes(raw))        # finding TRAILER-SIZE
    pieces = data.draw(cuts(raw))
    outcomes = []
    for be in BACKENDS.values():
        reference = _requests(be, bytewise(raw), max_head, max_body, bound=max_head)
        for feeds in ([raw], pieces):
            same_outcome(reference, _requests(be, feeds, max_head, max_body, bound=max_head))
        outcomes.append(reference)
    agree(*outcomes)


@given(damaged_pipelines(), st.integers(16, 300), st.integers(0, 100), st.data())
def test_damaged_requests_are_held_within_the_limit(raw, max_head, max_body, data):
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        _requests(be, pieces, max_head, max_body, bound=max_head)


@given(st.binary(max_size=400), st.sampled_from([b"GET", b"HEAD", b"POST"]), st.data())
def test_random_bytes_only_raise_protocol_error(raw, method, data):
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        _requests(be, pieces, 64, 64, bound=64)
        _response(be, method, pieces, 64, bound=64)


# -- responses --------------------------------------------------------------------

@given(responses(), st.data())
def test_valid_responses_parse_as_drawn(case, data):
    method, m = case
    raw = m.raw()
    pieces = data.draw(cuts(raw))
    for name, be in BACKENDS.items():
        for feeds in ([raw], pieces):
            events, status = _response(be, method, feeds)
            assert status is None, name
            assert normal(events) == normal(m.events()), name


@given(damaged_responses(AGREED, bytewise=False))
def test_backends_agree_on_damaged_responses(case):
    method, raw = case
    assume(not _known(raw))
    agree(*(_response(be, method, [raw]) for be in BACKENDS.values()))


@given(damaged_responses(), st.data())
def test_damaged_responses_parse_the_same_split_anywhere(case, data):
    method, raw = case
    assume(not _known(raw))
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        reference = _response(be, method, bytewise(raw))
        same_outcome(reference, _response(be, method, [raw]))
        same_outcome(reference, _response(be, method, pieces))


@given(damaged_responses(), st.integers(16, 300), st.data())
def test_damaged_responses_are_held_within_the_limit(case, max_head, data):
    method, raw = case
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        _response(be, method, pieces, max_head, bound=max_head)


# -- the writer, read back --------------------------------------------------------

plain_fields = st.lists(field_lines(values=field_values(max_size=20)), max_size=5).map(
    lambda fs: [(name, value) for name, value, _ in fs])


@given(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"]),
       origin_forms(), plain_fields, st.binary(max_size=100), st.data())
def test_writer_requests_read_back(method, target, fields, body, data):
    headers = [(b"Host", b"example.com"), *fields]
    raw = writer.request_head(method, target, headers, len(body)) + body
    framed = body or method in (b"POST", b"PUT", b"PATCH")
    expected = RequestHead(method, target, b"1.1",
                           headers + ([(b"Content-Length", b"%d" % len(body))] if framed else []),
                           True, len(body) if framed else None, False, False)
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        events, status = _requests(be, pieces)
        assert status is None
        assert coalesce(events) == [expected, *([Data(body)] if body else []), END]


@given(st.integers(200, 599), tokens | st.just(b""), plain_fields, st.binary(max_size=100),
       st.booleans(), st.sampled_from([b"GET", b"HEAD", b"POST"]), st.booleans(), st.data())
def test_writer_responses_read_back(status, reason, headers, body, keep_alive, method,
                                    interim, data):
    no_body = status in (204, 304)
    head_length = len(body) if method == b"HEAD" and not no_body else None
    if no_body or method == b"HEAD":
        body = b""
    raw = writer.response(status, reason, headers, body, keep_alive, head_length)
    if interim:
        raw = writer.CONTINUE_100 + raw
    length = None if no_body else (head_length if head_length is not None else len(body))
    expected_headers = list(headers)
    if length is not None:
        expected_headers.append((b"Content-Length", b"%d" % length))
    if not keep_alive:
        expected_headers.append((b"Connection", b"close"))
    expected = ResponseHead(status, reason, b"1.1", expected_headers, keep_alive, length, False)
    pieces = data.draw(cuts(raw))
    for be in BACKENDS.values():
        events, err = _response(be, method, pieces)
        assert err is None
        assert coalesce(events) == [expected, *([Data(body)] if body else []), END]


@given(st.sampled_from([ProtocolError("x"), ProtocolError("x", 413), ProtocolError("x", 431),
                        PayloadTooLarge(), HeaderTooLarge(), BadGateway()]), st.booleans())
def test_writer_error_responses_read_back(err, keep_alive):
    raw = writer.error_response(err, keep_alive)
    for be in BACKENDS.values():
        events, status = _response(be, b"GET", [raw])
        assert status is None
        head, body, end = events
        assert head.status == err.status and head.keep_alive == keep_alive
        assert body == Data(err.payload) and end == END


# -- findings ------------------------------------------------------------------------
# Back-end defects these tests found, each with its minimal reproducer.
# Fixed ones stay as regression tests; open ones are strict xfails that
# state the right behaviour (strict: a fix turns them into an error, so the
# marker and the matching step-around above go).

def _both(raw: bytes, method: bytes | None = None, max_head=4096, max_body=1000):
    out = {}
    for name, be in BACKENDS.items():
        parser = (be.RequestParser(max_head, max_body) if method is None
                  else be.ResponseParser(max_head))
        events, status = run_parser(parser, [raw], start=method)
        out[name] = (status, coalesce(events))
    return out


# fixed in 52b24da

@pytest.mark.parametrize("method", [None, b"GET"], ids=["request", "response"])
def test_finding_trailers_are_not_headers(method):
    """TRAILERS: httptools added chunked trailer fields to the head it had
    already returned (a 2nd Host got past check_request)."""
    start = (b"POST / HTTP/1.1\r\nHost: a\r\n" if method is None else b"HTTP/1.1 200 OK\r\n")
    raw = start + b"Transfer-Encoding: chunked\r\n\r\n0\r\nHost: evil\r\n\r\n"
    for status, events in _both(raw, method).values():
        assert status is None and (b"Host", b"evil") not in events[0].headers


@pytest.mark.parametrize("method", [None, b"GET"], ids=["request", "response"])
def test_finding_trailers_are_bounded(method):
    """TRAILERS: httptools kept trailer fields without limit."""
    start = (b"POST / HTTP/1.1\r\nHost: a\r\n" if method is None else b"HTTP/1.1 200 OK\r\n")
    raw = start + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: %s\r\n" % (b"v" * 100) * 100
    for name, (status, _) in _both(raw + b"\r\n", method, max_head=4096).items():
        assert status == 431, name


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n",
    b"POST / HTTP/1.0\r\nUpgrade: x\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nConnection: close, upgrade\r\n"
    b"Content-Length: 1\r\n\r\nx",
], ids=["http10-close-keep-alive", "http10-upgrade-body", "close-upgrade-body"])
def test_finding_nothing_is_read_after_close(first):
    """AFTER-CLOSE: httptools returned pipelined requests after one that
    closes the connection, when llhttp thought it stayed open."""
    results = _both(first + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    for status, events in results.values():
        assert status is None and [ev.target for ev in events if hasattr(ev, "target")] == [b"/"]


@pytest.mark.parametrize("where", ["host", "target"])
def test_finding_ipvfuture_v_is_case_insensitive(where):
    """IPVFUTURE-CASE: host.py took only a lowercase 'v' in an IPvFuture
    literal; ABNF literals are case-insensitive (RFC 5234 §2.3)."""
    raw = (b"GET / HTTP/1.1\r\nHost: [V1.x]\r\n\r\n" if where == "host"
           else b"GET http://[V1.x]/ HTTP/1.1\r\nHost: a\r\n\r\n")
    for status, _ in _both(raw).values():
        assert status is None


def test_finding_proxy_connection_is_an_ordinary_response_header():
    """PROXY-CONNECTION (responses): llhttp took it for Connection: close and
    skipped the bytes after a chunked response: the connection stayed
    reusable (h11: not reusable)."""
    a, b = _both(b"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", b"GET").values()
    assert a == b


def test_finding_proxy_connection_is_an_ordinary_request_header():
    """PROXY-CONNECTION (requests): llhttp took Proxy-Connection: close for
    Connection: close, and the next request got 400 (h11 served it)."""
    a, b = _both(b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Connection: close\r\n\r\n"
                 b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n").values()
    assert a == b and a[0] is None and [ev.target for ev in a[1] if hasattr(ev, "target")] == \
        [b"/", b"/2"]


@pytest.mark.parametrize("value", [b"chunked\t", b"chunked \t", b"chunked\t "])
@pytest.mark.parametrize("method", [None, b"GET"], ids=["request", "response"])
def test_finding_te_chunked_with_trailing_htab(method, value):
    """TE-HTAB: llhttp did not see 'chunked<HTAB>' as chunked (a request got
    400, a response body was read until close with head.chunked)."""
    start = (b"POST / HTTP/1.1\r\nHost: a\r\n" if method is None else b"HTTP/1.1 200 OK\r\n")
    raw = start + b"Transfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"
    for status, _ in _both(raw, method).values():
        assert status == 400


@pytest.mark.parametrize("reason", [b"O\x00K", b"O\x1bK", b"OK\x7f"])
def test_finding_control_characters_in_reason(reason):
    """REASON-CTL: httptools accepted control characters in a reason phrase,
    which is relayed to clients."""
    results = _both(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n", b"GET")
    for status, _ in results.values():
        assert status == 400


# fixed by the Host and request-target rules (httptp/http/host.py)

@pytest.mark.parametrize("target", [b"a", b"?a", b"example.com:443", b"%2F", b"http://u@a/",
                                    b"ftp://a/", b"http://a b/"])
def test_finding_request_target_forms(target):
    """TARGET-FORM: h11 accepted a request-target in none of the RFC 9112
    forms (no leading /, not absolute, not *)."""
    for status, _ in _both(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n").values():
        assert status == 400


# open



@pytest.mark.xfail(strict=True, reason="TE-CASE: h11 lowercases Transfer-Encoding values, "
                   "httptools keeps them as sent")
def test_finding_te_value_case_is_kept():
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"
    a, b = _both(raw).values()
    assert a == b


@pytest.mark.xfail(strict=True, reason="STRAY-CRLF: httptools lets a CRLF after a chunked "
                   "response in the same read through: the connection stays reusable")
@pytest.mark.parametrize("stray", [b"\r\n", b"\n"])
def test_finding_stray_crlf_after_chunked_response(stray):
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + stray
    for status, events in _both(raw, b"GET").values():
        assert status is None and events[0].keep_alive is False


@pytest.mark.xfail(strict=True, reason="STRAY-CRLF: httptools skips CR/LF before a status line, "
                   "h11 refuses it (400)")
def test_finding_stray_cr_before_a_response():
    a, b = _both(b"\rHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET").values()
    assert a == b


@pytest.mark.xfail(strict=True, reason="HEAD-SIZE: the header limit is checked on raw bytes while "
                   "a head arrives and on a normalised size (no OWS, no empty lines) once "
                   "complete: a head over the limit in raw bytes passes in one read, 431 in pieces")
def test_finding_header_limit_does_not_depend_on_reads():
    raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 40 + b"v" + b" " * 40 + b"\r\n\r\n"
    for be in BACKENDS.values():
        whole = _requests(be, [raw], max_head=40)
        pieces = _requests(be, [raw[:60], raw[60:]], max_head=40)
        assert (whole[1], coalesce(whole[0])) == (pieces[1], coalesce(pieces[0]))


@pytest.mark.xfail(strict=True, reason="CHUNK-EXT: h11 takes any bytes after ';' in a chunk-size "
                   "line (even NUL, an empty name, an open quote); httptools: 400")
@pytest.mark.parametrize("ext", [b";", b";\x00", b';a="b', b"; a", b";;"])
@pytest.mark.parametrize("start", [b"POST / HTTP/1.1\r\nHost: a\r\n", b"HTTP/1.1 200 OK\r\n"],
                         ids=["request", "response"])
def test_finding_chunk_extension_grammar(start, ext):
    raw = start + b"Transfer-Encoding: chunked\r\n\r\n5" + ext + b"\r\nhello\r\n0\r\n\r\n"
    method = None if start.startswith(b"POST") else b"GET"
    for status, _ in _both(raw, method).values():
        assert status == 400




@pytest.mark.xfail(strict=True, reason="TRAILER-SIZE: h11_backend bounds incomplete trailer fields "
                   "by their raw bytes (the CR of the last CRLF too), complete ones by name: value "
                   "lines: trailer fields exactly at the limit pass in one read, 431 in pieces")
def test_finding_trailer_limit_does_not_depend_on_reads():
    fields = b"X: " + b"v" * 60 + b"\r\n"          # 65 bytes: the header limit
    raw = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + fields
           + b"\r\n")
    outcomes = []
    for be in BACKENDS.values():
        whole = _requests(be, [raw], max_head=len(fields))
        pieces = _requests(be, [raw[:-1], raw[-1:]], max_head=len(fields))
        assert (whole[1], coalesce(whole[0])) == (pieces[1], coalesce(pieces[0]))
        outcomes.append(whole[1])
    assert outcomes[0] == outcomes[1]


@pytest.mark.xfail(strict=True, reason="CHUNK-LINE: h11_backend refuses a chunk-size line longer "
                   "than the header limit (h11's incomplete-event bound, 431) when it arrives in "
                   "pieces, takes it in one read; httptools takes it either way")
@pytest.mark.parametrize("start", [b"POST / HTTP/1.1\r\nHost: a\r\n", b"HTTP/1.1 200 OK\r\n"],
                         ids=["request", "response"])
def test_finding_chunk_size_line_does_not_depend_on_reads(start):
    raw = (start + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 100 + b"\r\nhello\r\n"
           b"0\r\n\r\n")
    method = None if start.startswith(b"POST") else b"GET"
    outcomes = []
    for be in BACKENDS.values():
        runs = [run_parser(be.RequestParser(80, 1000) if method is None else be.ResponseParser(80),
                           feeds, start=method) for feeds in ([raw], bytewise(raw))]
        (whole, whole_status), (pieces, pieces_status) = runs
        assert (whole_status, coalesce(whole)) == (pieces_status, coalesce(pieces))
        outcomes.append(whole_status)
    assert outcomes[0] == outcomes[1]
