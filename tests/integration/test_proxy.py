"""The HTTP in → out pipeline through the real `httptp` command on real sockets.

Every test runs against both parser back-ends (``-httpParser``).
"""

from __future__ import annotations

import http.client
import os
import socket
import time

import pytest

from tests.helpers import (HttpTp, Reply, Upstream, UnixHTTPConnection, dead_address, get,
                           raw_exchange, split_responses)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["httptools", "h11"])
def parser(request):
    return request.param


@pytest.fixture
def upstream():
    u = Upstream(name="u1")
    yield u
    u.close()


def proxy(upstream, parser, *extra, workers=1, **kw):
    return HttpTp(f"-out={upstream.addr}", "-outType=http", f"-httpParser={parser}", *extra,
                  workers=workers, **kw)


def test_keepalive_reused_on_both_legs(upstream, parser):
    with proxy(upstream, parser) as p:
        c = http.client.HTTPConnection(p.host, p.port, timeout=5)
        for i in range(20):
            status, headers, body = get(c, f"/x{i}")
            assert status == 200 and body == b"u1"
        c.close()
    # 20 requests, one client connection, one upstream connection
    assert upstream.requests == 20
    assert upstream.connections == 1


def test_pooled_connection_closed_by_upstream_is_not_used(upstream, parser):
    # An upstream's keep-alive timeout closes the pooled connection silently.
    # The hub's watcher on idle connections must notice, so a POST (never
    # retried: not idempotent) goes out on a fresh connection instead of 502.
    with proxy(upstream, parser) as p:
        c = http.client.HTTPConnection(p.host, p.port, timeout=5)
        for i in range(3):
            status, _, body = get(c, f"/p{i}", method="POST", body=b"x" * 100)
            assert status == 200 and body == b"u1"
            upstream.close_idle()
            time.sleep(0.2)
        c.close()
    assert upstream.requests == 3
    assert upstream.connections == 3


def test_forwarded_bytes_hop_by_hop_removed_and_client_ip(upstream, parser):
    with proxy(upstream, parser, "-clientIPHeader=X-Real-IP") as p:
        req = (b"GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Drop\r\n"
               b"X-Drop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: foo\r\n"
               b"Proxy-Connection: keep-alive\r\nX-Real-IP: 6.6.6.6\r\nX-Keep: yes\r\n\r\n")
        c = socket.create_connection((p.host, p.port), timeout=5)
        c.sendall(req)
        data = c.recv(65536)
        c.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    fwd = upstream.received[0]
    assert fwd.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
    lower = fwd.lower()
    for h in (b"x-drop", b"keep-alive:", b"\r\nte:", b"upgrade", b"proxy-connection", b"connection:"):
        assert h not in lower, (h, fwd)
    assert b"Host: example.com\r\n" in fwd
    assert b"X-Keep: yes\r\n" in fwd
    assert lower.count(b"x-real-ip") == 1 and b"x-real-ip: 127.0.0.1\r\n" in lower


def test_pipelined_requests_answered_in_order(parser):
    up = Upstream(handler=lambda m, p, h, b: Reply(body=p, delay=0.02 if p == b"/1" else 0))
    try:
        with proxy(up, parser) as p:
            reqs = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
            reqs += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            data = raw_exchange((p.host, p.port), reqs)
        bodies = [b for _, _, b in split_responses(data)]
        assert bodies == [b"/0", b"/1", b"/2", b"/3", b"/4", b"/last"]
    finally:
        up.close()


def test_chunked_request_and_response(parser):
    big = bytes(range(256)) * 40
    up = Upstream(handler=lambda m, p, h, b: Reply(body=b[::-1], chunked=True))
    try:
        with proxy(up, parser) as p:
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000])
                              for i in range(0, len(big), 1000))
            req = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
            data = raw_exchange((p.host, p.port), req)
        (status, headers, body), = split_responses(data)
        assert status == 200 and body == big[::-1]
        # the upstream got the whole body, framed by Content-Length
        assert up.received[0].endswith(big)
        assert b"Content-Length: %d\r\n" % len(big) in up.received[0]
    finally:
        up.close()


def test_head_204_304_have_no_body(parser):
    def handler(m, p, h, b):
        return {b"/204": Reply(status=204), b"/304": Reply(status=304)}.get(p, Reply(body=b"x" * 9))
    up = Upstream(handler=handler)
    try:
        with proxy(up, parser) as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            s, h, b = get(c, "/", method="HEAD")
            assert s == 200 and b == b"" and h["content-length"] == "9"
            s, h, b = get(c, "/204")
            assert s == 204 and b == b""
            s, h, b = get(c, "/304")
            assert s == 304 and b == b""
            s, h, b = get(c, "/")  # the connection is still in sync
            assert s == 200 and b == b"x" * 9
    finally:
        up.close()


@pytest.mark.parametrize("req", [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"garbage\r\n\r\n",
], ids=["cl+te", "two-cl", "plus-cl", "bad-chunk", "obs-fold", "bare-cr", "nul", "space-colon",
        "two-host", "http12", "ctl-target", "garbage"])
def test_smuggling_shapes_get_400_and_nothing_is_forwarded(upstream, parser, req):
    with proxy(upstream, parser) as p:
        # a valid pipelined request after the bad one must never be answered
        data = raw_exchange((p.host, p.port), req + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert data.count(b"HTTP/1.1 ") == 1
    assert upstream.requests == 0


HARDENING_400 = {
    # RFC 9112 §2.2: empty lines may precede a request line, lone CRs may not
    "bare-crs": b"\r\r\r\r\rGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "crlf-then-cr": b"\r\n\rGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # Host must be host[:port], whatever the form of the target
    "host-space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host-ctl": b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
    "host-empty": b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    "absolute-host-space": b"GET http://example/ HTTP/1.1\r\nHost: a b\r\n\r\n",
    "absolute-host-ctl": b"GET http://example/ HTTP/1.1\r\nHost: a\x01\r\n\r\n",
    "absolute-userinfo": b"GET http://u@example/ HTTP/1.1\r\nHost: example\r\n\r\n",
}


def test_bare_cr_and_invalid_host_get_400_and_nothing_is_forwarded(upstream, parser):
    after = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"    # never answered nor forwarded
    with proxy(upstream, parser) as p:
        for name, req in HARDENING_400.items():
            data = raw_exchange((p.host, p.port), req + after)
            assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1, name
            # the same on a connection that has served a request
            with socket.create_connection((p.host, p.port), timeout=5) as c:
                c.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
                c.sendall(req + after)
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1, name
    assert [r.split(b" ", 2)[1] for r in upstream.received] == [b"/ok"] * len(HARDENING_400)


def test_trailer_fields_and_what_follows_a_closing_request_reach_no_upstream(upstream, parser):
    """Found by the fuzz tests: httptools added chunked trailer fields to the
    head (a Host in a trailer went upstream as a second Host), and read on
    after a request that closes the connection."""
    with proxy(upstream, parser) as p:
        data = raw_exchange((p.host, p.port), b"POST /t HTTP/1.1\r\nHost: good\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                            b"Host: evil\r\n\r\n" + b"GET /after HTTP/1.0\r\n\r\n", half_close=True)
        assert data.count(b"HTTP/1.1 200 ") == 2
        data = raw_exchange((p.host, p.port), b"GET /close HTTP/1.0\r\nConnection: close, "
                            b"keep-alive\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.count(b"HTTP/1.1 200 ") == 1
    forwarded = b"".join(upstream.received)
    assert b"evil" not in forwarded and b"/smuggled" not in forwarded
    assert b"/t" in forwarded and b"/after" in forwarded and b"/close" in forwarded


def test_absolute_form_goes_upstream_in_origin_form_with_its_authority_as_host(upstream,
                                                                                  parser):
    with proxy(upstream, parser) as p:
        reqs = [b"GET http://example.com:8080/p?q=1 HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
                b"GET HTTPS://[::1]:8443 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                b"OPTIONS http://example.com HTTP/1.1\r\nHost: example.com\r\n"
                b"Connection: close\r\n\r\n"]
        data = raw_exchange((p.host, p.port), b"".join(reqs))
    assert [s for s, _, _ in split_responses(data)] == [200, 200, 200]
    first, second, third = upstream.received
    assert first.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nX-A: 1\r\n")
    assert b"other" not in first and first.lower().count(b"host:") == 1
    assert second.startswith(b"GET / HTTP/1.1\r\n") and b"\r\nHost: [::1]:8443\r\n" in second
    assert third.startswith(b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n")


def test_limits_431_413_and_get_only(upstream, parser):
    with proxy(upstream, parser, "-inMaxHeaderSize=1024", "-inMaxBodySize=100", "-inGetOnly") as p:
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
        assert raw_exchange((p.host, p.port), big).startswith(b"HTTP/1.1 431 ")
        body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"b" * 101
        assert raw_exchange((p.host, p.port), body).startswith(b"HTTP/1.1 413 ")
        post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nb"
        assert raw_exchange((p.host, p.port), post).startswith(b"HTTP/1.1 405 ")
    assert upstream.requests == 0


def test_dead_upstream_502(parser):
    with HttpTp(f"-out={dead_address()}", "-outType=http", f"-httpParser={parser}", workers=1) as p:
        c = http.client.HTTPConnection(p.host, p.port, timeout=5)
        status, headers, body = get(c)
        assert status == 502 and b"upstream" in body
        assert headers["content-type"].startswith("text/plain")
        status, _, _ = get(c)  # the client connection survives a 502
        assert status == 502


def test_slow_upstream_504_within_out_timeout(parser):
    up = Upstream(handler=lambda m, p, h, b: Reply(delay=3.0))
    try:
        with proxy(up, parser, "-outTimeout=300ms") as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            t0 = time.monotonic()
            status, _, body = get(c)
            assert status == 504 and b"timed out" in body
            assert time.monotonic() - t0 < 2.5
    finally:
        up.close()


def test_garbage_from_upstream_502(parser):
    up = Upstream(handler=lambda m, p, h, b: Reply(raw=b"NOT HTTP AT ALL\r\n\r\n", close=True))
    try:
        with proxy(up, parser) as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 502
    finally:
        up.close()


def test_over_concurrency_503(parser):
    up = Upstream(handler=lambda m, p, h, b: Reply(delay=1.0))
    try:
        with proxy(up, parser, "-concurrency=1") as p:
            busy = socket.create_connection((p.host, p.port), timeout=5)
            busy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            data = raw_exchange((p.host, p.port), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 503 ")
            assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
            busy.close()
    finally:
        up.close()


def test_header_timeout_408(upstream, parser):
    with proxy(upstream, parser, "-inHeaderTimeout=300ms") as p:
        s = socket.create_connection((p.host, p.port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        # drip a header byte at a time: still cut at the deadline
        data = b""
        for ch in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                s.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.05)
        s.settimeout(3)
        try:
            data = s.recv(65536)
        except OSError:
            pass
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert time.monotonic() - t0 < 3.5
        s.close()


def test_idle_keepalive_closed(upstream, parser):
    with proxy(upstream, parser, "-inIdleTimeout=300ms") as p:
        c = socket.create_connection((p.host, p.port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        c.settimeout(3)
        t0 = time.monotonic()
        assert c.recv(1) == b""  # closed by the proxy, no bytes
        assert time.monotonic() - t0 < 2.0


def test_ipv6_in_and_out(parser):
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    up6 = socket.socket(socket.AF_INET6)
    up6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    up6.bind(("::1", 0))
    up6.listen(16)
    port6 = up6.getsockname()[1]

    import threading

    def serve():
        c, _ = up6.accept()
        f = c.makefile("rb")
        from tests.helpers import read_http_message
        read_http_message(f)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv6")
        c.close()
    threading.Thread(target=serve, daemon=True).start()
    with HttpTp(f"-out=[::1]:{port6}", "-outType=http", "-in=[::1]:0", "-clientIPHeader=X-IP",
                f"-httpParser={parser}", workers=1) as p:
        assert p.addr.startswith("[::1]:")
        data = raw_exchange(("::1", p.port), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            family=socket.AF_INET6)
    up6.close()
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"v6")


def test_unix_in_and_out(tmp_path, parser):
    up = Upstream(unix_path=str(tmp_path / "up.sock"), name="unixup")
    try:
        in_path = str(tmp_path / "in.sock")
        with HttpTp(f"-out={up.addr}", "-outType=unix", "-inType=unix", f"-in={in_path}",
                    "-clientIPHeader=X-IP", f"-httpParser={parser}", workers=2) as p:
            assert p.addr == in_path
            c = UnixHTTPConnection(in_path)
            for _ in range(3):
                status, _, body = get(c)
                assert status == 200 and body == b"unixup"
        assert up.connections >= 1
        assert b"X-IP: 0.0.0.0\r\n" in up.received[0]
        assert not os.path.exists(in_path)  # unlinked at exit
    finally:
        up.close()


def test_allow_list_cidr(upstream, parser):
    # 127.0.0.1 is outside 10.0.0.0/8: refused at accept, before any byte
    with proxy(upstream, parser, "-inAllowIP=10.0.0.0/8,::1") as p:
        data = raw_exchange((p.host, p.port), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data == b""
    with proxy(upstream, parser, "-inAllowIP=10.0.0.0/8, 127.0.0.0/24") as p:
        data = raw_exchange((p.host, p.port), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests == 1


def test_expect_100_continue(upstream, parser):
    with proxy(upstream, parser) as p:
        s = socket.create_connection((p.host, p.port), timeout=5)
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        s.close()
    assert b"expect" not in upstream.received[0].lower()
    assert upstream.received[0].endswith(b"hello")


def test_idempotent_request_retried_on_other_upstream(parser):
    bad = Upstream(handler=lambda m, p, h, b: Reply(raw=b"", close=True), name="bad")
    good = Upstream(name="good")
    try:
        with HttpTp(f"-out={bad.addr},{good.addr}", "-outType=http", f"-httpParser={parser}",
                    "-outMaxFails=100", workers=1) as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            results = [get(c)[0] for _ in range(10)]
            assert results == [200] * 10
    finally:
        bad.close()
        good.close()


def test_http10_keepalive_only_when_asked(upstream, parser):
    with proxy(upstream, parser) as p:
        s = socket.create_connection((p.host, p.port), timeout=5)
        for _ in range(3):   # ab -k style: HTTP/1.0 with Connection: keep-alive
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            data = s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: keep-alive\r\n" in data
        s.close()
        # plain HTTP/1.0: answered, then closed
        data = raw_exchange((p.host, p.port), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    assert upstream.connections == 1


def test_http10_without_host_gets_the_upstreams_host(upstream, parser):
    """We speak HTTP/1.1 upstream, where Host is required: an HTTP/1.0 request
    without one is sent with the upstream's address (nginx's $proxy_host)."""
    with proxy(upstream, parser) as p:
        data = raw_exchange((p.host, p.port), b"GET /old HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
        data = raw_exchange((p.host, p.port), b"GET /kept HTTP/1.0\r\nHost: mine\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
    old, kept = upstream.received
    assert old.startswith(b"GET /old HTTP/1.1\r\n") and f"\r\nHost: {upstream.addr}\r\n".encode() in old
    assert b"\r\nHost: mine\r\n" in kept and kept.count(b"Host:") == 1
