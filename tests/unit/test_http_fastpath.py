"""The httptools back-end's fast path (httptools_backend's module docstring)
against llhttp: the same events and errors for any bytes, and the lines it
forwards (``head.raw``) equal to what the header policy and the writer make
of the fields.  Each property fails if the fast path reads a head llhttp
would refuse or read otherwise, or forwards a field the policy drops."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from httptp.errors import ProtocolError
from httptp.http import httptools_backend as hb
from httptp.http import policy, writer
from httptp.http.events import RequestHead, ResponseHead
from tests.fuzz.support import cuts

NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Connection",
         b"connection", b"Keep-Alive", b"Upgrade", b"Transfer-Encoding", b"TE", b"Trailer",
         b"Proxy-Connection", b"Expect", b"X-Forwarded-For", b"X-Request-Id",
         b"X-Forwarded-Proto", b"Accept", b"User-Agent", b"X-A", b"x a", b"X(A)", b"",
         b"X-\x80"]
VALUES = [b"x", b"127.0.0.1:80", b"5", b"0", b"05", b"+5", b"5, 5", b"keep-alive", b"close",
          b"Close", b"upgrade", b"Keep-Alive, X-A", b"X-A", b"chunked", b"identity",
          b"100-continue", b"websocket", b"a: b", b"a\tb", b"\x80\xff", b"a\x7fb", b"", b" x",
          b"x ", b"a\rb", b"a\nb", b"a\x00b", b"1.2.3.4"]
SEPARATORS = [b": ", b": ", b": ", b":", b":  ", b": \t", b"\t: ", b" : "]
ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n"]


@st.composite
def fields(draw) -> bytes:
    """Header lines, half the time only well-formed ones (the fast path's)."""
    plain = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(NAMES[:20] if plain else NAMES))
        out.append(name + (b": " if plain else draw(st.sampled_from(SEPARATORS)))
                   + draw(st.sampled_from(VALUES[:19] if plain else VALUES))
                   + (b"\r\n" if plain else draw(st.sampled_from(ENDS))))
    return b"".join(out)


@st.composite
def requests(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        line = b" ".join((draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"FOO",
                                                  b"CONNECT", b"get"])),
                          draw(st.sampled_from([b"/", b"/a?b=c#d", b"*", b"http://h/p", b"/\x80",
                                                b"/a b", b"//x", b"/%20"])),
                          draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0",
                                                b"HTTP/2.0", b"http/1.1"]))))
        host = draw(st.sampled_from([b"Host: h\r\n", b"Host: h\r\n", b""]))
        body = draw(st.sampled_from([b"", b"", b"abcde", b"ab", b"0\r\n\r\n"]))
        parts.append(draw(st.sampled_from([b"", b"", b"\r\n"])) + line
                     + draw(st.sampled_from(ENDS)) + host + draw(fields()) + b"\r\n" + body)
    return b"".join(parts)


@st.composite
def responses(draw) -> bytes:
    line = b"%s %s%s" % (draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0",
                                               b"HTTP/2.0"])),
                         draw(st.sampled_from([b"200", b"200", b"204", b"304", b"100", b"404",
                                               b"099", b"2000", b"abc", b"600"])),
                         draw(st.sampled_from([b" OK", b" ", b"", b"  OK", b" O\tK", b" \x80",
                                               b" Not Found"])))
    body = draw(st.sampled_from([b"", b"abcde", b"ab", b"0\r\n\r\n"]))
    return line + draw(st.sampled_from(ENDS)) + draw(fields()) + b"\r\n" + body


def _slow(monkeypatch):
    monkeypatch.setattr(hb.RequestParser, "_fast", lambda self, data, events: 0)
    monkeypatch.setattr(hb.ResponseParser, "_fast_head", lambda self, block: None)


def _run(parser, pieces, method=None) -> list:
    """Events (ProtocolError as ``(status, detail)``) and, last, what EOF said."""
    out = []
    if method is not None:
        parser.start(method)
    try:
        for piece in pieces + [b""]:
            for ev in parser.feed(piece):
                out.append((ev.status, ev.detail) if isinstance(ev, ProtocolError) else ev)
    except ProtocolError as e:
        out.append((e.status, e.detail))
    return out


def _lines(headers) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in headers)


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.data())
def test_requests_read_as_llhttp_reads_them(monkeypatch, data):
    raw = data.draw(requests())
    pieces = data.draw(cuts(raw))
    fast = _run(hb.RequestParser(600, 1000), pieces)
    with monkeypatch.context() as m:
        _slow(m)
        slow = _run(hb.RequestParser(600, 1000), pieces)
    assert fast == slow
    for ev in fast:
        if isinstance(ev, RequestHead) and ev.raw is not None:
            assert ev.raw == _lines(policy.forward_request_headers(ev.headers, None, None))


@SETTINGS
@given(st.data())
def test_responses_read_as_llhttp_reads_them(monkeypatch, data):
    raw = data.draw(responses())
    pieces = data.draw(cuts(raw))
    method = data.draw(st.sampled_from([b"GET", b"HEAD"]))
    fast = _run(hb.ResponseParser(600), pieces, method)
    with monkeypatch.context() as m:
        _slow(m)
        slow = _run(hb.ResponseParser(600), pieces, method)
    assert fast == slow
    for ev in fast:
        if isinstance(ev, ResponseHead) and ev.raw is not None:
            assert ev.raw == _lines(policy.forward_response_headers(ev.headers))
            for keep in (True, False):
                assert writer.response_lines(ev.status, ev.reason, ev.raw, b"body", keep) == \
                    writer.response(ev.status, ev.reason,
                                    policy.forward_response_headers(ev.headers), b"body", keep)


def test_the_usual_heads_take_the_fast_path():
    """If this fails the fast path is dead code and the properties above prove nothing."""
    p = hb.RequestParser(8192, 1 << 20)
    [head, _] = p.feed(b"GET /a?b HTTP/1.1\r\nHost: h\r\nUser-Agent: u\r\nConnection: keep-alive"
                       b"\r\nAccept: */*\r\n\r\n")
    assert head.raw == b"Host: h\r\nUser-Agent: u\r\nAccept: */*\r\n"
    [head, data, _] = p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab")
    assert head.raw == b"Host: h\r\n" and data.data == b"ab"
    r = hb.ResponseParser(8192)
    r.start(b"GET")
    [head, _, _] = r.feed(b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\n"
                          b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok")
    assert head.raw == b"Server: s\r\n"


def test_a_request_with_a_field_the_proxy_sets_has_no_raw():
    """own_fields: the proxy must see such a request's fields (it replaces or
    appends to them); a response with the same field keeps its raw."""
    hb.own_fields([b"X-Own-Test", None])
    p = hb.RequestParser(8192, 1 << 20)
    [head, _] = p.feed(b"GET / HTTP/1.1\r\nHost: h\r\nx-own-test: 1\r\n\r\n")
    assert head.raw is None and head.headers == [(b"Host", b"h"), (b"x-own-test", b"1")]
    r = hb.ResponseParser(8192)
    r.start(b"GET")
    [head, _] = r.feed(b"HTTP/1.1 204 No Content\r\nX-Own-Test: 1\r\n\r\n")
    assert head.raw == b"X-Own-Test: 1\r\n"


# -- what the proxy sends upstream: the same bytes either way ---------------------------

@pytest.mark.parametrize("args", [
    [],
    ["-clientIPHeader=X-Forwarded-For"],
    ["-clientIPHeader=X-Real-IP", "-requestIDHeader="],
    ["-requestIDHeader=X-Trace"],
    ["-clientIPHeader=X-%s", "-requestIDHeader=X-%d"],      # names are tokens: % is one
])
@pytest.mark.parametrize("client_ip", [b"127.0.0.1", None])
def test_the_proxy_sends_the_same_request_either_way(args, client_ip):
    from tests.unit.test_dataplane import Rig
    rig = Rig("127.0.0.1:9", "httptools", *args)
    try:
        heads = [
            b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nx-real-ip: 10.0.0.1\r\nX-Request-Id: abc\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nX-Trace: t\r\nX-Forwarded-Proto: https\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, TE\r\nTE: trailers\r\n\r\n",
        ]
        sent = []
        for raw in heads:
            [head, _] = hb.RequestParser(8192, 1 << 20).feed(raw)
            both = []
            for fast in (True, False):
                if not fast:
                    head.raw = None
                rig.proxy._request_ids = 0
                ex = rig.proxy.begin(head, client_ip, None, rig.proxy.exchange_timer(),
                                     body_done=True)
                ex.upstream = rig.proxy.upstreams[0]
                both.append(ex._request_head())
                ex.timer.close()
            assert both[0] == both[1], raw
            sent.append(both[0])
        assert sent[0].startswith(b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n")
    finally:
        rig.close()


@pytest.mark.parametrize("args", [[], ["-clientIPHeader=X-Real-IP", "-requestIDHeader="]])
def test_the_proxy_sends_the_same_teleport_frame_either_way(args):
    """Over teleport the kept lines go into the frame (framing.encode_request)."""
    from httptp.io.pipeline import TeleportExchange
    from httptp.teleport.framing import encode_request
    from tests.unit.test_dataplane import Rig
    rig = Rig("127.0.0.1:9", "httptools", "-outType=teleport", *args)
    try:
        heads = [
            b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Type: a/b\r\nContent-Length: 0\r\n\r\n",
            b"HEAD /h HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n",
        ]
        for raw in heads:
            [head, _] = hb.RequestParser(8192, 1 << 20).feed(raw)
            assert head.raw is not None
            both = []
            for fast in (True, False):
                if not fast:
                    head.raw = None
                rig.proxy._request_ids = 0
                ex = rig.proxy.begin(head, b"127.0.0.1", None, rig.proxy.exchange_timer(),
                                     body_done=True)
                assert isinstance(ex, TeleportExchange)
                both.append(encode_request(7, head.method, ex.target, ex.headers, b""))
                ex.timer.close()
            assert both[0] == both[1], raw
    finally:
        rig.close()


def test_a_get_with_a_body_is_refused_for_teleport_either_way():
    from httptp.errors import ProxyError
    from tests.unit.test_dataplane import Rig
    rig = Rig("127.0.0.1:9", "httptools", "-outType=teleport")
    try:
        [head, _, _] = hb.RequestParser(8192, 1 << 20).feed(
            b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab")
        assert head.raw is not None
        timer = rig.proxy.exchange_timer()
        err = rig.proxy.begin(head, b"127.0.0.1", None, timer, body_done=True)
        timer.close()
        assert isinstance(err, ProxyError) and err.status == 400
    finally:
        rig.close()


def test_the_memo_gives_each_head_its_own_fields_and_goes_stale():
    """A parser remembers its last field block (_read_fields): the same bytes
    again give equal fields in a new list, other bytes are read afresh, and
    own_fields makes the memo stale (a field it names must lose raw)."""
    p = hb.RequestParser(8192, 1 << 20)
    get = b"GET /%d HTTP/1.1\r\nHost: h\r\nX-Memo-Test: 1\r\n\r\n"
    [a, _, b, _] = p.feed(get % 1 + get % 2)
    assert a.headers == b.headers and a.headers is not b.headers
    assert (a.target, b.target) == (b"/1", b"/2") and a.raw == b.raw is not None
    [c, _] = p.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Memo-Test: 2\r\n\r\n")
    assert c.headers[-1] == (b"X-Memo-Test", b"2")
    hb.own_fields([b"x-memo-test"])
    [d, _] = p.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Memo-Test: 2\r\n\r\n")
    assert d.raw is None
    # a bad start line is still refused with a remembered field block
    with pytest.raises(ProtocolError, match="malformed request"):
        p.feed(b"GET / HTTP/1.1 x\r\nHost: h\r\nX-Memo-Test: 2\r\n\r\n")
    r = hb.ResponseParser(8192)
    ok = b"HTTP/1.1 %d OK\r\nServer: s\r\nContent-Length: 0\r\n\r\n"
    heads = []
    for status in (200, 404, 200):
        r.start(b"GET")
        heads.append(r.feed(ok % status)[0])
    assert [h.status for h in heads] == [200, 404, 200]
    assert heads[0].headers == heads[2].headers and heads[0].headers is not heads[2].headers


def test_a_long_field_block_is_not_remembered():
    """The memo is bounded (_MEMO_MAX), not by the header limit: an idle
    connection keeps its parser, so 100,000 of them keep 100,000 memos."""
    p = hb.RequestParser(1 << 16, 1 << 20)
    p.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    small = p._memo
    long_get = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: %s\r\n\r\n" % (b"v" * hb._MEMO_MAX)
    [head, _] = p.feed(long_get)
    assert head.raw is not None and p._memo is small
    [again, _] = p.feed(long_get)
    assert again.headers == head.headers


def test_the_memo_leaves_content_length_out():
    """A POST's length changes with its body: the memo takes the other fields
    and reads the length each time, at the same place only."""
    p = hb.RequestParser(8192, 1 << 20)
    post = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nX-A: 1\r\n\r\n%s"
    events = p.feed(post % (3, b"abc") + post % (5, b"abcde"))
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.content_length for h in heads] == [3, 5]
    assert heads[1].headers == [(b"Host", b"h"), (b"Content-Length", b"5"), (b"X-A", b"1")]
    assert [e.data for e in events if e.__class__.__name__ == "Data"] == [b"abc", b"abcde"]
    assert heads[0].raw == heads[1].raw == b"Host: h\r\nX-A: 1\r\n"
    # the same other fields with the length elsewhere: read afresh, in order
    [head, data, _] = p.feed(b"POST /b HTTP/1.1\r\nContent-Length: 2\r\nHost: h\r\nX-A: 1\r\n\r\nab")
    assert head.headers == [(b"Content-Length", b"2"), (b"Host", b"h"), (b"X-A", b"1")]
    assert (head.content_length, data.data) == (2, b"ab")
    # a remembered block with a length that is not one: llhttp's answer
    p.feed(post % (1, b"a"))
    with pytest.raises(ProtocolError):
        p.feed(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\nX-A: 1\r\n\r\n")
    r = hb.ResponseParser(8192)
    for body in (b"ok", b"okay"):
        r.start(b"GET")
        [head, data, _] = r.feed(b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
        assert (head.content_length, data.data, head.raw) == (len(body), body, b"Server: s\r\n")
