"""httptp.http.rules: each HTTP/1 rule once, and every reader agreeing with it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from httptp.errors import ProtocolError
from httptp.http import parser, rules, writer
from httptp.http.rules import FramingViolation
from httptp.teleport import FramingError, framing


@pytest.mark.parametrize("status,method,body", [
    (100, None, False), (101, None, False), (199, None, False),
    (200, None, True), (201, b"GET", True), (204, None, False), (205, None, True),
    (301, None, True), (304, None, False), (304, b"GET", False),
    (404, None, True), (500, b"POST", True),
    (200, b"HEAD", False), (404, b"HEAD", False), (204, b"HEAD", False),
    (200, b"head", True),            # methods are case-sensitive (RFC 9110 §9.1)
])
def test_status_has_body(status, method, body):
    assert rules.status_has_body(status, method) is body


def test_is_interim():
    assert [s for s in (99, 100, 101, 103, 199, 200, 204) if rules.is_interim(s)] == \
        [99, 100, 101, 103, 199]


def test_request_may_have_body():
    assert all(rules.request_may_have_body(m) for m in (b"GET", b"HEAD", b"POST"))
    assert [m for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE")
            if rules.request_may_have_body(m, strict=False)] == [b"POST", b"PUT", b"DELETE"]


# (headers, strict result, lenient result); a result is (length, chunked,
# expect) or the FramingViolation text.
FRAMING_CASES = [
    ([], (None, False, False), (None, False, False)),
    ([(b"Content-Length", b"5")], (5, False, False), (5, False, False)),
    ([(b"content-length", b" 0\t")], (0, False, False), (0, False, False)),
    ([(b"CONTENT-LENGTH", b"007")], (7, False, False), (7, False, False)),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"5")],
     "duplicate Content-Length", (5, False, False)),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"6")],
     "duplicate Content-Length", "conflicting Content-Length headers"),
    ([(b"Content-Length", b"5, 5")],
     "invalid Content-Length", "invalid Content-Length b'5, 5'"),
    ([(b"Content-Length", b"-1")], "invalid Content-Length", "invalid Content-Length b'-1'"),
    ([(b"Content-Length", b"+1")], "invalid Content-Length", "invalid Content-Length b'+1'"),
    ([(b"Content-Length", b"")], "invalid Content-Length", "invalid Content-Length b''"),
    ([(b"Content-Length", "\u0665".encode())],          # a non-ASCII digit
     "invalid Content-Length", "invalid Content-Length b'\\xd9\\xa5'"),
    ([(b"Content-Length", b"9" * 18)], (10 ** 18 - 1, False, False),
     (10 ** 18 - 1, False, False)),
    ([(b"Content-Length", b"1" + b"0" * 18)], "invalid Content-Length",
     "invalid Content-Length b'1000000000000000000'"),
    ([(b"Transfer-Encoding", b"chunked")], (None, True, False), (None, True, False)),
    ([(b"transfer-encoding", b" Chunked ")], (None, True, False), (None, True, False)),
    ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
     "unsupported Transfer-Encoding", "unsupported Transfer-Encoding b'chunked'"),
    ([(b"Transfer-Encoding", b"identity")],
     "unsupported Transfer-Encoding", (None, False, False)),
    ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity")],
     "unsupported Transfer-Encoding", (None, True, False)),
    ([(b"Transfer-Encoding", b"gzip, chunked")], "unsupported Transfer-Encoding",
     "unsupported Transfer-Encoding b'gzip, chunked'"),
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")],
     "both Content-Length and Transfer-Encoding", "both Content-Length and Transfer-Encoding"),
    ([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"identity")],
     "unsupported Transfer-Encoding", (3, False, False)),
    ([(b"Expect", b"100-Continue")], (None, False, True), (None, False, True)),
    ([(b"Expect", b"later")], (None, False, False), (None, False, False)),
    ([(b"X-Content-Length", b"x"), (b"Content-Lengthy", b"x")],
     (None, False, False), (None, False, False)),
]


def _framing(headers, strict):
    try:
        return rules.message_framing(headers, strict)
    except FramingViolation as e:
        return str(e)


@pytest.mark.parametrize("headers,strict_result,lenient_result", FRAMING_CASES)
def test_message_framing(headers, strict_result, lenient_result):
    assert _framing(headers, True) == strict_result
    assert _framing(headers, False) == lenient_result


def _scan(headers):
    """What the HTTP parsers' one pass says about the framing."""
    try:
        _, special = parser.scan_headers(headers)
        length, chunked, _, _, _, _, expect, _ = parser.scan_special(special)
    except ProtocolError as e:
        assert e.status == 400
        return e.detail
    return length, chunked, expect


def _teleport(headers):
    """What the teleport reader says about the framing."""
    try:
        return framing._framing(headers)
    except FramingError as e:
        return str(e)


@pytest.mark.parametrize("headers,strict_result,lenient_result", FRAMING_CASES)
def test_readers_follow_the_rules(headers, strict_result, lenient_result):
    assert _scan(headers) == strict_result
    assert _teleport(headers) == lenient_result


_names = st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding",
                          b"TRANSFER-ENCODING", b"Expect", b"Host", b"X-Length"])
_values = st.one_of(
    st.sampled_from([b"0", b"5", b"5", b"12", b" 5", b"5\t", b"chunked", b"Chunked",
                     b"identity", b"gzip", b"100-continue", b"-1", b""]),
    st.binary(max_size=6))


@given(st.lists(st.tuples(_names, _values), max_size=5))
def test_strict_rules_are_the_parsers(headers):
    """The parsers' single pass frames every head as `message_framing` does
    (Host and the rest aside), error text included."""
    assert _scan(headers) == _framing(headers, True)


@given(st.lists(st.tuples(_names, _values.map(lambda v: v.strip(b" \t"))), max_size=5))
def test_lenient_rules_are_the_teleport_readers(headers):
    """Values as the teleport reader hands them over (whitespace stripped)."""
    assert _teleport(headers) == _framing(headers, False)


@pytest.mark.parametrize("status", [100, 101, 200, 204, 205, 304, 404])
def test_writers_follow_status_has_body(status):
    """A Content-Length is written exactly when the status allows a body."""
    http = writer.response(status, b"R", [], b"", True)
    assert (b"Content-Length" in http) is rules.status_has_body(status)
    tp = framing.encode_response(1, status, b"R", [], b"")
    assert (b"Content-Length" in tp) is rules.status_has_body(status)
    if not rules.status_has_body(status):
        with pytest.raises(ValueError):
            framing.encode_response(1, status, b"R", [], b"x")


@pytest.mark.parametrize("status", [100, 200, 204, 304, 404])
@pytest.mark.parametrize("head", [False, True])
def test_teleport_reader_follows_status_has_body(status, head):
    """The response reader takes a body exactly when `status_has_body` says so."""
    reader = framing.FrameReader("response", 4096, is_head=lambda _id: head)
    frame = (b"\x01\x00\x00\x00HTTP/1.1 %d R\r\nContent-Length: 2\r\n\r\n" % status)
    out = reader.feed(frame + b"ok")
    has_body = rules.status_has_body(status, b"HEAD" if head else b"GET")
    assert out[0][2] == (b"ok" if has_body else b"")


def test_grammar_pieces_compile():
    import re
    assert re.fullmatch(rules.TOKEN, b"M-SEARCH") and not re.fullmatch(rules.TOKEN, b"A B")
    assert re.fullmatch(rules.VCHAR_OBS + b"+", b"/a?b=\x80") and \
        not re.fullmatch(rules.VCHAR_OBS + b"+", b"/a b")
    assert re.fullmatch(rules.FIELD_CHAR + b"*", b"a b\t\xff") and \
        not re.fullmatch(rules.FIELD_CHAR + b"*", b"a\x00")


def test_sans_io():
    import subprocess
    import sys
    code = ("import sys, httptp.http.rules; "
            "print(sorted({'gevent', 'socket', 'httptp.io'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
