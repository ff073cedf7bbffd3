"""Exact bytes from the writer and the header policy."""

import pytest

from httptp.errors import BadGateway, GatewayTimeout, ProtocolError, ServiceUnavailable
from httptp.http import policy, writer

H = [(b"Host", b"a"), (b"X-Y", b"z")]


@pytest.mark.parametrize("method,body_len,expected", [
    (b"GET", 0, b"GET /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\n\r\n"),
    (b"HEAD", 0, b"HEAD /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\n\r\n"),
    (b"POST", 0, b"POST /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\nContent-Length: 0\r\n\r\n"),
    (b"PUT", 3, b"PUT /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\nContent-Length: 3\r\n\r\n"),
    (b"PATCH", 0, b"PATCH /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\nContent-Length: 0\r\n\r\n"),
    (b"DELETE", 2, b"DELETE /p?q HTTP/1.1\r\nHost: a\r\nX-Y: z\r\nContent-Length: 2\r\n\r\n"),
])
def test_request_head(method, body_len, expected):
    assert writer.request_head(method, b"/p?q", H, body_len) == expected


def test_request_head_no_headers():
    assert writer.request_head(b"GET", b"/", [], 0) == b"GET / HTTP/1.1\r\n\r\n"


def test_response_keep_alive():
    assert writer.response(200, b"OK", H, b"hello", True) == (
        b"HTTP/1.1 200 OK\r\nHost: a\r\nX-Y: z\r\nContent-Length: 5\r\n\r\nhello")


def test_response_close_and_empty_body():
    assert writer.response(404, b"Not Found", [], b"", False) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_response_head_keeps_declared_length():
    assert writer.response(200, b"OK", [], b"", True, content_length=1234) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")


@pytest.mark.parametrize("status,reason", [(204, b"No Content"), (304, b"Not Modified"),
                                           (103, b"Early Hints")])
def test_response_without_length(status, reason):
    assert writer.response(status, reason, [(b"ETag", b'"x"')], b"", True) == (
        b"HTTP/1.1 %d %s\r\nETag: \"x\"\r\n\r\n" % (status, reason))
    assert writer.response(status, reason, [], b"", False, content_length=5) == (
        b"HTTP/1.1 %d %s\r\nConnection: close\r\n\r\n" % (status, reason))


def test_continue_100():
    assert writer.CONTINUE_100 == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_error_response_bytes_and_cache():
    data = writer.error_response(BadGateway("boom"), True)
    assert data == (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: 16\r\n\r\nupstream failed\n")
    assert writer.error_response(BadGateway("other"), True) is data
    assert writer.error_response(GatewayTimeout(), False) == (
        b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 19\r\nConnection: close\r\n\r\nupstream timed out\n")
    assert writer.error_response(ServiceUnavailable(), False).startswith(b"HTTP/1.1 503 ")


def test_error_response_protocol_error_statuses():
    # ProtocolError carries 400, 413 or 431 on one class: the cache must tell them apart
    assert writer.error_response(ProtocolError("x"), False).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert writer.error_response(ProtocolError("x", 413), False).startswith(
        b"HTTP/1.1 413 Payload Too Large\r\n")
    big = writer.error_response(ProtocolError("x", 431), False)
    assert big.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert big.endswith(b"\r\n\r\nrequest header too large\n")


# -- policy -----------------------------------------------------------------------

REQ = [(b"Host", b"a"), (b"Connection", b"keep-alive, X-Drop"), (b"Keep-Alive", b"timeout=5"),
       (b"X-Drop", b"1"), (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"),
       (b"Content-Length", b"5"), (b"Expect", b"100-continue"), (b"Upgrade", b"h2c"),
       (b"Proxy-Connection", b"keep-alive"), (b"Proxy-Authorization", b"Basic x"),
       (b"Trailer", b"X"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Accept", b"*/*")]


def test_forward_request_headers():
    assert policy.forward_request_headers(REQ, None, None) == [
        (b"Host", b"a"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Accept", b"*/*")]


def test_forward_request_headers_replaces_client_ip():
    out = policy.forward_request_headers(REQ, b"X-Real-IP", b"10.0.0.1")
    assert out == [(b"Host", b"a"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Accept", b"*/*"),
                   (b"X-Real-IP", b"10.0.0.1")]
    out = policy.forward_request_headers([(b"x-real-ip", b"1"), (b"X-REAL-IP", b"2")],
                                         b"X-Real-IP", b"9")
    assert out == [(b"X-Real-IP", b"9")]
    # a header name but no address: nothing replaced
    assert policy.forward_request_headers([(b"X-Real-IP", b"1")], b"X-Real-IP", None) == [
        (b"X-Real-IP", b"1")]


@pytest.mark.parametrize("spelling", [b"X-Forwarded-For", b"x-forwarded-for", b"X-FORWARDED-FOR"])
def test_x_forwarded_for_is_appended_to(spelling):
    """nginx's $proxy_add_x_forwarded_for: every field the request came with,
    in order, in one field at the end, then the client's address."""
    out = policy.forward_request_headers(REQ, spelling, b"10.0.0.1")
    assert out == [(b"Host", b"a"), (b"Accept", b"*/*"), (spelling, b"6.6.6.6, 10.0.0.1")]
    hs = [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"Host", b"h"), (b"X-Forwarded-For", b""),
          (b"X-FORWARDED-FOR", b"3.3.3.3"), (b"Connection", b"keep-alive")]
    for _ in range(2):                  # the second time from the per-spelling cache
        assert policy.forward_request_headers(hs, spelling, b"::1") == [
            (b"Host", b"h"), (spelling, b"1.1.1.1, 2.2.2.2, 3.3.3.3, ::1")]
    # none came: the address alone
    assert policy.forward_request_headers([(b"Host", b"h")], spelling, b"10.0.0.1") == [
        (b"Host", b"h"), (spelling, b"10.0.0.1")]
    # no address (a teleport listener): the client's fields pass as they are
    assert policy.forward_request_headers(hs[:2], spelling, None) == hs[:2]


def test_x_forwarded_for_named_by_connection_is_not_kept():
    """A client that makes X-Forwarded-For hop-by-hop (Connection names it)
    gets its list dropped, not appended to (the slow path)."""
    hs = [(b"X-Forwarded-For", b"6.6.6.6"), (b"Connection", b"X-Forwarded-For, x-other"),
          (b"X-Other", b"1"), (b"Host", b"h")]
    assert policy.forward_request_headers(hs, b"X-Forwarded-For", b"10.0.0.1") == [
        (b"Host", b"h"), (b"X-Forwarded-For", b"10.0.0.1")]
    hs[1] = (b"Connection", b"x-other")
    assert policy.forward_request_headers(hs, b"X-Forwarded-For", b"10.0.0.1") == [
        (b"Host", b"h"), (b"X-Forwarded-For", b"6.6.6.6, 10.0.0.1")]


def test_x_forwarded_proto_is_set():
    hs = [(b"Host", b"h"), (b"x-forwarded-proto", b"https"), (b"X-Forwarded-Proto", b"ftp"),
          (b"Accept", b"*/*")]
    assert policy.forward_request_headers(hs, None, None, b"http") == [
        (b"Host", b"h"), (b"Accept", b"*/*"), (b"X-Forwarded-Proto", b"http")]
    assert policy.forward_request_headers(hs, b"X-Forwarded-For", b"10.0.0.1", b"https") == [
        (b"Host", b"h"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Proto", b"https")]
    # without a proto (unix and teleport listeners) the client's value passes
    assert policy.forward_request_headers(hs, b"X-Real-IP", b"10.0.0.1") == hs + [
        (b"X-Real-IP", b"10.0.0.1")]
    # the slow path (Connection names a field) does the same
    slow = hs + [(b"Connection", b"x-gone"), (b"X-Gone", b"1")]
    assert policy.forward_request_headers(slow, None, None, b"https") == [
        (b"Host", b"h"), (b"Accept", b"*/*"), (b"X-Forwarded-Proto", b"https")]


def test_forward_request_headers_fast_path_keeps_order_and_case():
    hs = [(b"host", b"a"), (b"X-A", b"1"), (b"x-a", b"2"), (b"content-length", b"0")]
    assert policy.forward_request_headers(hs, None, None) == hs[:3]


def test_forward_response_headers():
    hs = [(b"Content-Type", b"text/html"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"),
          (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"10"),
          (b"Proxy-Authenticate", b"Basic"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
          (b"Expect", b"kept-in-responses")]
    assert policy.forward_response_headers(hs) == [
        (b"Content-Type", b"text/html"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
        (b"Expect", b"kept-in-responses")]


def test_connection_tokens():
    hs = [(b"connection", b" Foo ,,bar"), (b"CONNECTION", b"baz")]
    assert policy.connection_tokens(hs) == {b"foo", b"bar", b"baz"}
    assert policy.HOP_BY_HOP == {b"connection", b"keep-alive", b"te", b"trailer",
                                 b"transfer-encoding", b"upgrade", b"proxy-connection",
                                 b"proxy-authenticate", b"proxy-authorization"}


def test_set_host_replaces_in_place_or_appends():
    hs = [(b"X-A", b"1"), (b"host", b"client"), (b"X-B", b"2")]
    assert policy.set_host(hs, b"example:80") == [(b"X-A", b"1"), (b"host", b"example:80"),
                                                 (b"X-B", b"2")]
    assert policy.set_host([(b"X-A", b"1")], b"example") == [(b"X-A", b"1"), (b"Host", b"example")]


@pytest.mark.parametrize("method, target, upstream", [
    (b"GET", b"/p?q", (b"/p?q", None)),
    (b"GET", b"http://example/p?q", (b"/p?q", b"example")),
    (b"GET", b"HTTPS://example:8443", (b"/", b"example:8443")),
    (b"GET", b"http://example?q", (b"/?q", b"example")),
    (b"GET", b"http://[::1]:8080/x", (b"/x", b"[::1]:8080")),
    (b"OPTIONS", b"http://example", (b"*", b"example")),     # RFC 9112 §3.2.4
    (b"OPTIONS", b"http://example/", (b"/", b"example")),
    (b"OPTIONS", b"*", (b"*", None)),
    (b"GET", b"*", None),
    (b"GET", b"http://u@example/", None),
    (b"GET", b"http:///x", None),
    (b"GET", b"http://a b/", None),
    (b"GET", b"http://example#f", None),
    (b"GET", b"ftp://example/", None),
    (b"GET", b"example:80", None),
    (b"GET", b"example", None),
])
def test_upstream_target(method, target, upstream):
    from httptp.http.host import upstream_target
    assert upstream_target(method, target) == upstream


@pytest.mark.parametrize("args, proto", [
    (["-inType=http"], b"http"),
    (["-inType=https", "-inTLSCert=c.pem", "-inTLSKey=k.pem"], b"https"),
    (["-inType=https", "-inTLSCert=c.pem", "-inTLSKey=k.pem", "-forwardedProto=false"], None),
    (["-inType=unix", "-in=/tmp/x.sock"], None),
    (["-inType=teleport"], None),
    (["-inType=teleports", "-inTLSCert=c.pem", "-inTLSKey=k.pem"], None),
])
def test_forwarded_proto_per_listener(args, proto):
    """http and https listeners set their scheme; unix (behind a local proxy)
    and teleport (the first hop set it) pass on what came."""
    from httptp.config import load_config
    from httptp.io.pipeline import _forwarded_proto
    assert _forwarded_proto(load_config([*args, "-outType=http"], {})) == proto
