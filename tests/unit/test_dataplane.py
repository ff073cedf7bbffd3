"""ClientConn + Proxy + HTTPUpstream in process, on the hub's loop.

A fake worker (``Rig``: the attributes ``Listener`` reads, ``draining``,
``conn_closed``, ``tls_failed``) with a real stats block and a real
``httptp.io.pipeline.Proxy`` points at a small gevent HTTP/1.1 server on
127.0.0.1 in this process (``Upstream``).  Each client connection is a
``ClientConn`` on a ``Transport`` over a socketpair (or an accepted loopback
TCP socket), wired as workers/worker.py wires it; the test greenlet speaks
HTTP on the other end.  Both parser back-ends run every test."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

import gevent
import gevent.event
import pytest
from gevent.server import StreamServer

from httptp import stats as S
from httptp.config import load_config
from httptp.http.parser import select_backend
from httptp.io import transport as T
from httptp.io.http_server import ClientConn, Listener
from httptp.io.pipeline import Proxy
from httptp.io.transport import IN, TLSTransport, Transport
from httptp.stats import Stats
from tests.helpers import dead_address
from tests.unit.loop_helpers import (WAIT, hub_errors, read_all, socketpair, tcp_pair,  # noqa: F401
                                     wait_until)

pytestmark = pytest.mark.usefixtures("hub_errors")

SMALL = 4096


# -- HTTP/1.1 on the test's side: just enough to read and write messages ---------------------------


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            raise EOFError
        self.buf += data

    def until(self, sep: bytes) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                break
            self._fill()
        out = bytes(self.buf[:i + len(sep)])
        del self.buf[:i + len(sep)]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        try:
            while True:
                self._fill()
        except EOFError:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def at_eof(self) -> bool:
        """True once the peer closed with nothing more sent."""
        if self.buf:
            return False
        try:
            self._fill()
        except EOFError:
            return True
        return False


class Msg:
    def __init__(self, line: bytes, headers: list):
        self.line = line
        self.headers = headers          # [(lowercased name, value)]
        self.body = b""
        self.reader = None

    def header(self, name: bytes):
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def status(self) -> int:
        return int(self.line.split()[1])

    @property
    def target(self) -> bytes:
        return self.line.split()[1]

    @property
    def closes(self) -> bool:
        return (self.header(b"connection") or b"").lower() == b"close"

    def read_body(self, until_close: bool = False) -> bytes:
        self.body = read_body(self.reader, self, until_close)
        return self.body


def read_head(r: Reader) -> Msg:
    raw = r.until(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    msg = Msg(lines[0], headers)
    msg.reader = r
    return msg


def read_body(r: Reader, msg: Msg, until_close: bool = False) -> bytes:
    te = msg.header(b"transfer-encoding")
    if te is not None and b"chunked" in te.lower():
        out = bytearray()
        while True:
            size = int(r.until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while r.until(b"\r\n") != b"\r\n":     # trailers
                    pass
                return bytes(out)
            out += r.exactly(size)
            assert r.exactly(2) == b"\r\n"
    length = msg.header(b"content-length")
    if length is not None:
        return r.exactly(int(length))
    return r.rest() if until_close else b""


def read_response(r: Reader, method: bytes = b"GET") -> Msg:
    msg = read_head(r)
    if method != b"HEAD" and msg.status >= 200 and msg.status not in (204, 304):
        msg.read_body(until_close=True)
    return msg


def response(body: bytes = b"ok", status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra)
            + body)


def get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: example.test\r\n%s\r\n" % (target, extra)


# -- the upstream: a gevent server in this process ---------------------------------------------------


def echo_app(req: Msg, sock):
    body = req.read_body()
    return response(b"%s %s %d" % (req.line.split()[0], req.target, len(body)))


class Upstream:
    """An HTTP/1.1 server on 127.0.0.1: ``app(request, sock)`` answers each
    request (it reads the body with ``request.read_body()``) with the bytes
    to send, or None to close the connection."""

    def __init__(self, rcvbuf: int | None = None, ssl_context=None):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(128)
        lsock.setblocking(False)
        self.ssl_context = ssl_context
        self.server = StreamServer(lsock, self._handle)
        self.server.start()
        self.addr = f"127.0.0.1:{self.server.server_port}"
        self.app = echo_app
        self.requests = []          # every request head, in order of arrival
        self.conns = 0

    def _handle(self, sock, addr) -> None:
        self.conns += 1
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError):        # a handshake the test meant to fail
                sock.close()
                return
        r = Reader(sock)
        try:
            while True:
                req = read_head(r)
                self.requests.append(req)
                out = self.app(req, sock)
                if out is None:
                    return
                sock.sendall(out)
        except (EOFError, OSError):
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=0.5)


class AccessLog:
    def __init__(self):
        self.statuses = []

    def log(self, ip, head, status, size, upstream, elapsed, **fields):
        self.statuses.append(status)
        self.fields = fields            # the last line's request_time, request_id...


class Rig:
    """A fake worker: what Listener and ClientConn read of workers/worker.py's
    Worker, with a real stats block and a real Proxy."""

    def __init__(self, out: str, parser: str, *args: str, tls=None):
        self.config = load_config(["-outType=http", f"-out={out}", f"-httpParser={parser}",
                                   "-logAllErrors=true", *args], {})
        self.stats = Stats.create(2, 8)
        self.block = self.stats.claim_block(os.getpid(), 0, 1)
        self.base = self.stats.block_base(self.block)
        ids = self.stats.assign_upstreams([str(a) for a in self.config.upstreams])
        self.parser_module = select_backend(parser)
        self.logs = []
        self.log = self.logs.append
        self.log_all_errors = True
        self.access_log = AccessLog()
        self.get_only = self.config.in_get_only
        self.proxy = Proxy(self.config, self.stats, self.block, ids, self.parser_module,
                           self.log, tls=tls, access_log=self.access_log)
        self.draining = False
        self.clients = set()
        self.closed = []
        self.tls_errors = []
        self.ctx = Listener(self)

    # the worker's side of a ClientConn
    def conn_closed(self, conn) -> None:
        assert conn not in self.closed, "conn_closed twice"
        self.closed.append(conn)
        self.clients.discard(conn)

    def tls_failed(self, client_ip, error) -> None:
        self.tls_errors.append(error)

    def count(self, field: int) -> int:
        return self.stats.q[self.base + field]

    def connect(self, tcp: bool = False, sndbuf: int | None = None,
                rcvbuf: int | None = None, tls_context=None):
        """A ClientConn on our end of a pair, started; the client's socket and reader."""
        ours, peer = (tcp_pair if tcp else socketpair)(sndbuf=sndbuf, rcvbuf=rcvbuf)
        conn = ClientConn(self.ctx, b"127.0.0.1")
        if tls_context is None:
            conn.transport = Transport(ours, conn, self.stats.q, self.base, IN)
        else:
            conn.transport = TLSTransport(ours, conn, self.stats.q, self.base, IN, tls_context,
                                          server_side=True)
        self.clients.add(conn)
        conn.start()
        return conn, Client(peer)

    def close(self) -> None:
        for conn in list(self.clients):
            conn.close(orderly=False)
        self.proxy.close()


class Client:
    def __init__(self, sock):
        self.sock = sock
        self.r = Reader(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: bytes = b"GET") -> Msg:
        return read_response(self.r, method)

    def closed(self) -> bool:
        return self.r.at_eof()


@pytest.fixture(params=["httptools", "h11"])
def parser(request):
    return request.param


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture
def make_rig(parser, upstream):
    rigs = []

    def make(*args: str, out: str | None = None) -> Rig:
        rig = Rig(out or upstream.addr, parser, *args)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


# -- requests and responses ---------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp"])
def test_get_and_keep_alive(make_rig, upstream, tcp):
    rig = make_rig()
    conn, client = rig.connect(tcp=tcp)
    client.send(get(b"/hello"))
    resp = client.response()
    assert resp.status == 200 and resp.body == b"GET /hello 0"
    assert not resp.closes
    client.send(get(b"/again"))
    assert client.response().body == b"GET /again 0"
    assert upstream.conns == 1                    # the pooled upstream connection again
    assert upstream.requests[0].header(b"host") == b"example.test"
    assert rig.count(S.IN_REQUEST_START) == 2
    assert rig.count(S.IN_REQUEST_SUCCESS) == 2
    assert rig.count(S.OUT_CONNS) == 1
    assert rig.count(S.IN_BYTES_READ) == 2 * len(get(b"/hello"))
    assert rig.count(S.OUT_BYTES_WRITTEN) > 0 and rig.count(S.OUT_BYTES_READ) > 0
    assert rig.access_log.statuses == [200, 200]
    client.sock.close()                           # the client leaves between requests
    wait_until(lambda: conn.gone)
    assert rig.closed == [conn]


def test_pipelined_requests_are_answered_in_order(make_rig, upstream):
    def app(req, sock):
        if req.target == b"/2":
            gevent.sleep(0.2)                     # the second is slow
        return response(req.target)

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/1") + get(b"/2") + get(b"/3"))
    assert [client.response().body for _ in range(3)] == [b"/1", b"/2", b"/3"]
    assert [r.target for r in upstream.requests] == [b"/1", b"/2", b"/3"]
    assert rig.access_log.statuses == [200, 200, 200]
    assert not conn.gone


def test_pipelined_request_behind_a_close_is_not_answered(make_rig, upstream):
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/1", b"Connection: close\r\n") + get(b"/2"))
    resp = client.response()
    assert resp.body == b"GET /1 0" and resp.closes
    assert client.closed()
    assert [r.target for r in upstream.requests] == [b"/1"]


def test_post_body_is_streamed(make_rig, upstream):
    def app(req, sock):
        body = req.read_body()
        return response(hashlib.sha256(body).hexdigest().encode())

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    parts = [os.urandom(65536) for _ in range(3)]
    client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % sum(map(len, parts)) + parts[0])
    # the head went upstream before the body was complete
    wait_until(lambda: upstream.requests, what="the request head upstream")
    assert upstream.requests[0].header(b"content-length") == b"%d" % (3 * 65536)
    for p in parts[1:]:
        gevent.sleep(0.01)
        client.send(p)
    resp = client.response()
    assert resp.status == 200
    assert resp.body == hashlib.sha256(b"".join(parts)).hexdigest().encode()


def test_chunked_request_body(make_rig, upstream):
    got = []

    def app(req, sock):
        got.append(req.read_body())
        return response(b"%d" % len(got[0]))

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n")
    wait_until(lambda: upstream.requests, what="the request head upstream")
    assert upstream.requests[0].header(b"transfer-encoding") == b"chunked"
    client.send(b"1;ext=1\r\n \r\n")
    gevent.sleep(0.01)
    client.send(b"5\r\nworld\r\n0\r\n\r\n")
    resp = client.response()
    assert resp.status == 200 and got == [b"hello world"]
    client.send(get(b"/after"))                   # the stream is still in sync
    assert client.response().status == 200


def test_expect_100_continue(make_rig, upstream):
    rig = make_rig()
    conn, client = rig.connect()
    client.send(b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert client.r.until(b"\r\n\r\n").startswith(b"HTTP/1.1 100")
    client.send(b"data")
    assert client.response().body == b"PUT /e 4"


def test_chunked_response_is_streamed(make_rig, upstream):
    release = gevent.event.Event()

    def app(req, sock):
        if req.target != b"/stream":
            return echo_app(req, sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        release.wait(WAIT)
        sock.sendall(b"3\r\ndef\r\n0\r\n\r\n")
        return b""

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/stream"))
    head = read_head(client.r)                    # before the upstream finished
    assert head.status == 200 and head.header(b"transfer-encoding") == b"chunked"
    release.set()
    assert head.read_body() == b"abcdef"
    client.send(get(b"/next"))
    assert client.response().body == b"GET /next 0"


def test_http10_client_gets_a_body_until_close(make_rig, upstream):
    def app(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n")
        return b""

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    resp = client.response()
    assert resp.status == 200 and resp.body == b"abc"
    assert resp.header(b"transfer-encoding") is None


# -- backpressure ---------------------------------------------------------------------------------------


def test_large_response_to_a_client_that_does_not_read(make_rig, upstream):
    body = os.urandom(16 * T.HIGH_WATER)
    upstream.app = lambda req, sock: (response(body) if req.target == b"/big"
                                      else echo_app(req, sock))
    rig = make_rig()
    conn, client = rig.connect(sndbuf=SMALL, rcvbuf=SMALL)
    client.send(get(b"/big"))

    def upstream_paused():
        ex = conn.cur
        return ex is not None and ex.conn is not None and not ex.conn.transport.reading

    wait_until(upstream_paused, what="the upstream's reading paused")
    gevent.sleep(0.05)
    up_conn = conn.cur.conn
    assert not up_conn.transport.reading
    # memory stays bounded: what we queue for the client stops near HIGH_WATER
    assert conn.transport.write_buffer_size <= T.HIGH_WATER + 2 * T.RECV_SIZE
    resp = client.response()                      # the client reads: it resumes
    assert resp.status == 200 and resp.body == body
    wait_until(lambda: conn.cur is None)
    assert up_conn.transport.reading              # pooled, and watched for close again
    client.send(get(b"/small"))
    assert client.response().body == b"GET /small 0"
    assert upstream.conns == 1


def test_response_ending_while_the_client_is_backed_up_keeps_the_pooled_conn_reading(
        make_rig, upstream, monkeypatch):
    """The last read of a response can both fill the client's queue (the
    upstream's reading pauses) and end the response (the connection goes back
    to the pool): the pooled connection must read again, or the next request
    on it is never answered (504) and a close while idle goes unseen."""
    def app(req, sock):
        if req.target != b"/two-reads":
            return echo_app(req, sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        gevent.sleep(0.05)
        return b"END"

    upstream.app = app
    orig = ClientConn.response_data

    def response_data(self, data):
        orig(self, data)
        if data.endswith(b"END"):
            self.pause_writing()          # as the transport does when its queue fills

    monkeypatch.setattr(ClientConn, "response_data", response_data)
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/two-reads"))
    assert client.response().body == b"abcEND"
    wait_until(lambda: conn.cur is None)
    pool = rig.proxy.upstreams[0]
    assert pool.idle_count == 1
    assert pool._idle[0].transport.reading
    client.send(get(b"/next"))
    assert client.response().body == b"GET /next 0"


def test_pipelined_response_behind_a_backed_up_client_waits_too(make_rig, upstream,
                                                                monkeypatch):
    """The client's queue passed HIGH_WATER during the first response, which
    then ended: the next pipelined response must not be read from its
    upstream faster than the client reads (pause_writing came only once)."""
    monkeypatch.setattr(T, "HIGH_WATER", 16 * 1024)
    monkeypatch.setattr(T, "LOW_WATER", 4 * 1024)
    first = os.urandom(40000)                     # one read, more than the client takes
    second = os.urandom(1 << 20)
    upstream.app = lambda req, sock: response(first if req.target == b"/1" else second)
    rig = make_rig("-outTimeout=200ms")
    conn, client = rig.connect(sndbuf=SMALL, rcvbuf=SMALL)
    client.send(get(b"/1") + get(b"/2"))

    def second_paused():
        ex = conn.cur
        return (ex is not None and ex.head.target == b"/2" and ex.conn is not None
                and not ex.conn.transport.reading)

    wait_until(second_paused, what="the second response's upstream paused")
    gevent.sleep(0.4)                             # longer than -outTimeout: the client is slow
    assert conn.transport.write_buffer_size <= T.HIGH_WATER + 2 * T.RECV_SIZE
    assert client.response().body == first
    assert client.response().body == second
    assert rig.access_log.statuses == [200, 200]


def test_large_upload_to_an_upstream_that_does_not_read(parser):
    up = Upstream(rcvbuf=SMALL)
    go = gevent.event.Event()

    def app(req, sock):
        go.wait(WAIT)
        body = req.read_body()
        return response(hashlib.sha256(body).hexdigest().encode())

    up.app = app
    rig = Rig(up.addr, parser, "-inMaxBodySize=67108864")
    try:
        conn, client = rig.connect()
        body = os.urandom(64 * T.HIGH_WATER)
        sender = gevent.spawn(client.send, b"POST /up HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: up.requests and not conn.transport.reading,
                   what="the client's reading paused")
        gevent.sleep(0.05)
        assert not conn.transport.reading
        go.set()
        resp = client.response()
        assert resp.status == 200 and resp.body == hashlib.sha256(body).hexdigest().encode()
        sender.get(timeout=WAIT)
        wait_until(lambda: conn.transport.reading)
    finally:
        rig.close()
        up.stop()


# -- failures -----------------------------------------------------------------------------------------


def test_502_when_the_upstream_refuses(make_rig):
    rig = make_rig(out=dead_address())
    conn, client = rig.connect()
    client.send(get(b"/"))
    resp = client.response()
    assert resp.status == 502
    assert any("cannot connect" in line and "refused" in line for line in rig.logs), rig.logs
    client.send(get(b"/"))                        # a 502 keeps the connection
    assert client.response().status == 502
    assert rig.access_log.statuses == [502, 502]
    assert rig.count(S.OUT_DIAL_ERROR) >= 2


def test_502_when_the_upstream_closes_without_answering(make_rig, upstream):
    upstream.app = lambda req, sock: None
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/"))
    assert client.response().status == 502
    upstream.app = echo_app
    client.send(get(b"/ok"))
    assert client.response().body == b"GET /ok 0"


def test_504_on_out_timeout_then_the_next_request_is_not_confused(make_rig, upstream):
    def app(req, sock):
        if req.target == b"/slow":
            gevent.sleep(0.5)
            return response(b"late")
        return response(b"fast")

    upstream.app = app
    rig = make_rig("-outTimeout=100ms")
    conn, client = rig.connect()
    client.send(get(b"/slow"))
    assert client.response().status == 504
    client.send(get(b"/fast"))
    assert client.response().body == b"fast"      # never the late answer
    assert rig.access_log.statuses == [504, 200]
    assert rig.count(S.IN_REQUEST_TIMEOUT_ERROR) == 1


def test_504_between_body_reads(make_rig, upstream):
    def app(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        gevent.sleep(1)
        return None

    upstream.app = app
    rig = make_rig("-outTimeout=100ms")
    conn, client = rig.connect()
    client.send(get(b"/"))
    head = read_head(client.r)
    assert head.status == 200
    with pytest.raises(EOFError):                 # the head went out: only a cut
        head.read_body()
    wait_until(lambda: conn.gone)


def test_cut_when_the_upstream_dies_after_the_head(make_rig, upstream):
    def app(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        return None

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/"))
    head = read_head(client.r)
    assert head.status == 200
    with pytest.raises(EOFError):
        head.read_body()
    wait_until(lambda: conn.gone)
    assert rig.closed == [conn]
    assert rig.count(S.OUT_CONNS) == 0
    assert rig.access_log.statuses == [502]


def test_client_leaves_mid_response(make_rig, upstream):
    body = os.urandom(16 * T.HIGH_WATER)
    upstream.app = lambda req, sock: response(body)
    rig = make_rig()
    conn, client = rig.connect(sndbuf=SMALL, rcvbuf=SMALL)
    client.send(get(b"/big"))
    read_head(client.r)
    client.sock.close()
    wait_until(lambda: conn.gone)
    wait_until(lambda: rig.count(S.OUT_CONNS) == 0, what="the upstream connection closed")
    assert rig.access_log.statuses == [499]


# -- timeouts -----------------------------------------------------------------------------------------


def test_408_on_in_header_timeout(make_rig, upstream):
    rig = make_rig("-inHeaderTimeout=100ms")
    conn, client = rig.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")        # and never the end of the head
    resp = client.response()
    assert resp.status == 408 and resp.closes
    assert client.closed()
    assert not upstream.requests
    assert rig.count(S.IN_REQUEST_BAD_REQUEST) == 1


def test_silent_connection_is_closed_at_in_header_timeout(make_rig):
    rig = make_rig("-inHeaderTimeout=100ms")
    conn, client = rig.connect()
    assert read_all(client.sock) == b""                 # closed with nothing said
    assert conn.gone


def test_idle_keep_alive_connection_is_closed(make_rig, upstream):
    rig = make_rig("-inIdleTimeout=100ms")
    conn, client = rig.connect()
    client.send(get(b"/"))
    assert client.response().status == 200
    assert client.closed()                              # nothing more: no 408
    assert rig.closed == [conn]


def test_408_when_the_request_body_stalls(make_rig, upstream):
    upstream.app = lambda req, sock: (req.read_body(), response(b"never"))[1]
    rig = make_rig("-inIdleTimeout=100ms")
    conn, client = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    resp = client.response()
    assert resp.status == 408 and resp.closes
    assert client.closed()


# -- draining ------------------------------------------------------------------------------------------


def test_draining_answers_with_connection_close(make_rig, upstream):
    rig = make_rig()
    conn, client = rig.connect()
    rig.draining = True
    client.send(get(b"/"))
    resp = client.response()
    assert resp.status == 200 and resp.closes
    assert client.closed()


def test_drain_during_a_request_closes_after_its_answer(make_rig, upstream):
    go = gevent.event.Event()

    def app(req, sock):
        go.wait(WAIT)
        return response(b"done")

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/"))
    wait_until(lambda: upstream.requests)
    assert not conn.idle
    rig.draining = True
    go.set()
    resp = client.response()
    assert resp.body == b"done" and resp.closes
    assert client.closed()


def test_draining_error_answer_carries_connection_close(make_rig):
    rig = make_rig(out=dead_address())
    conn, client = rig.connect()
    rig.draining = True
    client.send(get(b"/"))
    resp = client.response()
    assert resp.status == 502 and resp.closes
    assert client.closed()


# -- https in ------------------------------------------------------------------------------------------


def test_https_client(make_rig, upstream):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    rig = make_rig()
    conn, client = rig.connect(tcp=True, tls_context=server_ctx)
    from gevent import ssl as gssl
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    tls = ctx.wrap_socket(client.sock, server_hostname="localhost")
    c = Client(tls)
    c.send(get(b"/secure"))
    assert c.response().body == b"GET /secure 0"
    c.send(get(b"/bye", b"Connection: close\r\n"))
    resp = c.response()
    assert resp.closes
    assert c.closed()                                   # close_notify, then EOF
    assert not rig.tls_errors


def test_https_handshake_failure_is_reported_to_the_worker(make_rig):
    trustme = pytest.importorskip("trustme")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("localhost").configure_cert(server_ctx)
    rig = make_rig()
    conn, client = rig.connect(tls_context=server_ctx)
    client.send(b"\x16\x03\x01\x00\x05hello")           # a broken ClientHello
    wait_until(lambda: rig.tls_errors)
    wait_until(lambda: conn.gone)
    assert rig.closed == [conn]


# -- the pool: stale connections, retries --------------------------------------------------------------


def test_an_idle_pooled_connection_the_upstream_closes_is_dropped(make_rig, upstream):
    def app(req, sock):
        sock.sendall(echo_app(req, sock))
        return None                               # keep-alive said, then closed

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/1"))
    assert client.response().status == 200
    pool = rig.proxy.upstreams[0]
    wait_until(lambda: pool.idle_count == 0, what="the stale connection dropped")
    assert rig.count(S.OUT_CONNS) == 0
    client.send(get(b"/2"))
    assert client.response().body == b"GET /2 0"
    assert upstream.conns == 2


def test_a_keep_alive_race_is_retried_on_a_fresh_connection(make_rig, upstream):
    served = []

    def app(req, sock):
        served.append(req.target)
        if len(served) == 2:
            return None                           # the reused connection dies unanswered
        return echo_app(req, sock)

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/1"))
    assert client.response().status == 200
    client.send(get(b"/2"))
    assert client.response().body == b"GET /2 0"
    assert served == [b"/1", b"/2", b"/2"] and upstream.conns == 2


def test_a_post_is_not_sent_twice(make_rig, upstream):
    served = []

    def app(req, sock):
        served.append(req.target)
        req.read_body()
        if len(served) == 2:
            return None
        return response(b"ok")

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/1"))
    assert client.response().status == 200
    client.send(b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert client.response().status == 502
    assert served == [b"/1", b"/2"]


# -- answers of our own ---------------------------------------------------------------------------------


def test_head_request(make_rig, upstream):
    upstream.app = lambda req, sock: b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    rig = make_rig()
    conn, client = rig.connect()
    client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = client.response(b"HEAD")
    assert resp.status == 200 and resp.header(b"content-length") == b"1234"
    client.send(get(b"/"))                        # no body was sent: still in sync
    assert client.response(b"HEAD").header(b"content-length") == b"1234"


def test_get_only_answers_405(make_rig, upstream):
    rig = make_rig("-inGetOnly=true")
    conn, client = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert client.response().status == 405
    assert client.closed()
    assert not upstream.requests


def test_bad_request_answers_400_and_closes(make_rig, upstream):
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/ok"))
    assert client.response().body == b"GET /ok 0"
    client.send(b"NOT HTTP AT ALL\r\n\r\n" + get(b"/never"))
    assert client.response().status == 400
    assert client.closed()
    assert [r.target for r in upstream.requests] == [b"/ok"]


def test_good_request_in_the_same_read_as_a_bad_one_is_answered_first(make_rig, upstream):
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/ok") + b"NOT HTTP AT ALL\r\n\r\n")
    assert client.response().body == b"GET /ok 0"
    assert client.response().status == 400


def test_body_over_in_max_body_size_answers_413(make_rig, upstream):
    rig = make_rig("-inMaxBodySize=1000")
    conn, client = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert client.response().status == 413
    assert client.closed()
    assert not upstream.requests


# -- upgrade: a tunnel ----------------------------------------------------------------------------------


def test_websocket_upgrade_becomes_a_tunnel(make_rig, upstream):
    def app(req, sock):
        assert req.header(b"upgrade") == b"websocket"
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\nhello from upstream")
        while True:                               # an echo of raw bytes
            data = sock.recv(65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return None
            sock.sendall(data.upper())

    upstream.app = app
    rig = make_rig()
    conn, client = rig.connect()
    client.send(get(b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    head = read_head(client.r)
    assert head.status == 101 and head.header(b"upgrade") == b"websocket"
    assert client.r.exactly(len(b"hello from upstream")) == b"hello from upstream"
    client.send(b"ping")
    assert client.r.exactly(4) == b"PING"
    big = b"x" * (4 * T.HIGH_WATER)
    sender = gevent.spawn(client.send, big)
    assert client.r.exactly(len(big)) == big.upper()
    sender.get(timeout=WAIT)
    client.sock.shutdown(socket.SHUT_WR)          # half-close crosses the tunnel both ways
    assert client.closed()
    wait_until(lambda: conn.gone)
    wait_until(lambda: rig.count(S.OUT_CONNS) == 0)


# -- https out -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def https_upstream(ca):
    from gevent import ssl as gssl
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    return Upstream(ssl_context=ctx)


def client_tls(ca, trusted: bool = True):
    from types import SimpleNamespace
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trusted:
        ca.configure_trust(ctx)
    return SimpleNamespace(client=ctx, server_name="localhost")


def test_https_upstream(parser, ca):
    up = https_upstream(ca)
    rig = Rig(up.addr, parser, tls=client_tls(ca))
    try:
        conn, client = rig.connect()
        client.send(get(b"/1"))
        assert client.response().body == b"GET /1 0"
        client.send(get(b"/2"))
        assert client.response().body == b"GET /2 0"
        assert up.conns == 1                      # the TLS connection was pooled
        body = os.urandom(4 * T.HIGH_WATER)
        up.app = lambda req, sock: response(body)
        client.send(get(b"/big"))
        assert client.response().body == body
    finally:
        rig.close()
        up.stop()


def test_https_upstream_handshake_failure_is_a_502(parser, ca):
    up = https_upstream(ca)
    rig = Rig(up.addr, parser, tls=client_tls(ca, trusted=False))
    try:
        conn, client = rig.connect()
        client.send(get(b"/"))
        assert client.response().status == 502
        assert any("TLS handshake" in line for line in rig.logs), rig.logs
    finally:
        rig.close()
        up.stop()


def test_request_ids_taken_moved_deduplicated_or_replaced():
    """The list path's request id (Proxy._request_id): a valid one is kept
    as the last field, once; a bad one is replaced by a new one."""
    rig = Rig("127.0.0.1:9", "httptools")
    try:
        proxy = rig.proxy
        rid, host, acc = (b"X-Request-Id", b"ab-1"), (b"Host", b"h"), (b"Accept", b"*/*")
        cases = [
            ([host, rid], [host, rid], b"ab-1"),                       # last already: as is
            ([rid, host], [host, rid], b"ab-1"),                       # moved last
            ([host, rid, acc, (b"x-request-id", b"ab-2")], [host, acc, rid], b"ab-1"),
            ([host, (b"X-Request-Id", b"bad id")], [host, None], None),  # replaced
        ]
        for incoming, want, want_id in cases:
            headers = list(incoming)
            got = proxy._request_id(incoming, headers)
            if want_id is None:
                assert got.startswith(proxy._request_id_prefix)
                want = want[:-1] + [(b"X-Request-Id", got)]
            else:
                assert got == want_id
            assert headers == want, incoming
    finally:
        rig.close()
