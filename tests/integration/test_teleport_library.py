"""The teleport library (``httptp.teleport.Client`` / ``Server`` and the gevent
drivers under them) on real loopback sockets, in this process.

Modeled on the original's tests (PROTOCOL.md §5): get / post / sleep, serial
and concurrent, every codec pair, batch delays, big bodies, the concurrency
limit, fire-and-forget id 0, failures, timeouts and id wrap-around.  Peers that
misbehave are hand-made gevent sockets.  No monkey-patching: every gevent
object is created inside the test, every wait is bounded.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import gevent
import gevent.event
import pytest
from gevent import socket

from httptp import stats as S
from httptp.errors import GatewayTimeout, UpstreamError
from httptp.io.teleport_client import TeleportClient
from httptp.io.teleport_server import Answer, TeleportServer
from httptp.stats import Stats
from httptp.teleport import Client, Server
from httptp.teleport import handshake
from httptp.teleport.codecs import compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request, encode_response
from httptp.teleport.handshake import Compress
from tests.helpers import dead_address, decompress_all

pytestmark = pytest.mark.timeout(60)

CODECS = ["none", "flate", "snappy", "zstd", "brotli"]


# --------------------------------------------------------------------------- helpers

def run(fn, *args, timeout=20.0):
    """Run ``fn`` in a greenlet; fail if it takes longer than ``timeout``."""
    def guarded():
        try:
            return True, fn(*args)
        except Exception as e:          # re-raised here, not printed by the hub
            return False, e
    g = gevent.spawn(guarded)
    g.join(timeout)
    if not g.dead:
        g.kill(block=True, timeout=1)
        raise AssertionError(f"{fn.__name__} did not finish in {timeout}s")
    ok, value = g.get()
    if not ok:
        raise value
    return value


def concurrently(fn, n, timeout=20.0):
    """``fn(i)`` for i in range(n) in n greenlets; return their results."""
    gs = [gevent.spawn(fn, i) for i in range(n)]
    gevent.joinall(gs, timeout=timeout)
    if not all(g.dead for g in gs):
        gevent.killall(gs, block=True, timeout=1)
        raise AssertionError(f"{n} calls did not finish in {timeout}s")
    return [g.get() for g in gs]


def attempt(fn, *args):
    """``fn(*args)``, returning an exception instead of raising it (a greenlet
    that dies of an expected error would print a traceback)."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        gevent.sleep(0.005)


def go_handler(req):
    """The original's test handler: echo the Host for GET, the body for POST,
    sleep 0–29 ms on /sleep."""
    if req.path == "/sleep":
        d = random.randint(0, 29)
        gevent.sleep(d / 1000)
        return 200, [("Content-Type", "text/plain")], f"slept for {d} ms"
    if req.method == "POST":
        return 200, [], req.body
    return 200, [("Content-Type", "text/plain")], req.header("host")


@pytest.fixture
def servers():
    started = []

    def make(handler=go_handler, **kw):
        kw.setdefault("log", LOG_SINK)
        srv = Server(handler, **kw)
        started.append(srv)
        return srv, srv.start("127.0.0.1:0")

    yield make
    for srv in started:
        srv.stop(timeout=1)


@pytest.fixture
def clients():
    made = []

    def make(addr, **kw):
        c = Client(addr, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class _Sink(list):
    def __call__(self, msg):
        self.append(msg)


LOG_SINK = _Sink()


def _drive(one, n, concurrent):
    """``one(i)`` for i in range(n): all at once, or one after the other."""
    if concurrent:
        concurrently(one, n)
    else:
        run(lambda: [one(i) for i in range(n)])


def do_get(c, n, concurrent):
    def one(i):
        r = c.do("GET", "/aaa", host=f"foobar{i}.com")
        assert r.status == 200, r
        assert r.body == f"foobar{i}.com".encode()
    _drive(one, n, concurrent)


def do_post(c, n, concurrent):
    def one(i):
        body = f"body number {i}".encode()
        r = c.do("POST", "/", body=body, host="foobar.com")
        assert r.status == 200 and r.body == body
    _drive(one, n, concurrent)


def do_sleep(c, n, concurrent):
    def one(i):
        r = c.do("GET", "/sleep", host="foobar.com")
        assert r.status == 200 and r.body.startswith(b"slept for "), r.body
    _drive(one, n, concurrent)


def raw_connect(addr: str, codec=Compress.NONE, tls=False, timeout=5.0):
    """A hand-made teleport client socket after the handshake: (sock, server header)."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.sendall(handshake.encode(codec, tls))
    got = b""
    while len(got) < 15:
        data = s.recv(15 - len(got))
        if not data:
            break
        got += data
    return s, got


def read_until_closed(s, timeout=3.0) -> bytes:
    s.settimeout(timeout)
    out = []
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            out.append(data)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(out)


class FakeServer:
    """A hand-made teleport server: ``respond(req_id, head, body) -> bytes | None``
    returns a raw frame to write (None: stay silent).  ``answer_handshake``
    False: never write our 15 bytes.  Records every request id it reads."""

    def __init__(self, respond=None, answer_handshake=True, codec=Compress.NONE):
        self.respond = respond or (lambda i, h, b: encode_response(i, 200, b"OK", [], h.target))
        self.answer_handshake = answer_handshake
        self.codec = codec
        self.ids: list[int] = []
        self.raw = bytearray()
        self.accepted = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.socks = []
        self.greenlets = [gevent.spawn(self._accept)]

    def _accept(self):
        while True:
            try:
                s, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.socks.append(s)
            self.greenlets.append(gevent.spawn(self._serve, s))

    def _serve(self, s):
        try:
            hdr = b""
            while len(hdr) < 15:
                data = s.recv(15 - len(hdr))
                if not data:
                    return
                hdr += data
            self.raw += hdr
            theirs, _ = handshake.decode(hdr)
            if not self.answer_handshake:
                gevent.sleep(30)
                return
            s.sendall(handshake.encode(self.codec, False))
            dec = decompressor(theirs)
            comp = compressor(self.codec)
            reader = FrameReader("request", 65536)
            while True:
                data = s.recv(65536)
                if not data:
                    return
                plain = decompress_all(dec, data)
                self.raw += plain
                for req_id, head, body in reader.feed(plain):
                    self.ids.append(req_id)
                    out = self.respond(req_id, head, body)
                    if out:
                        s.sendall(comp.compress(out) + comp.flush())
        except OSError:
            pass
        finally:
            s.close()

    def close(self):
        self.listener.close()
        for s in self.socks:
            s.close()
        gevent.killall(self.greenlets, block=True, timeout=1)


@pytest.fixture
def fakes():
    made = []

    def make(**kw):
        f = FakeServer(**kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


# --------------------------------------------------------------------------- the original's tests

@pytest.mark.parametrize("concurrent", [False, True], ids=["serial", "concurrent"])
def test_get_post_sleep(servers, clients, concurrent):
    _, addr = servers()
    c = clients(addr)
    do_get(c, 100, concurrent)
    do_post(c, 100, concurrent)
    do_sleep(c, 10, concurrent)
    assert c.pending == 0


def test_sleep_answers_out_of_order(servers, clients):
    """Handlers finishing in a different order than the requests arrived:
    each caller still gets its own answer (ids match, not order)."""
    def handler(req):
        d = int(req.path[1:])
        gevent.sleep(d / 1000)
        return 200, [], str(d)
    _, addr = servers(handler)
    c = clients(addr)
    delays = [29, 3, 17, 0, 25, 9, 1, 21, 13, 5] * 3
    got = concurrently(lambda i: c.do("GET", f"/{delays[i]}").body, len(delays))
    assert got == [str(d).encode() for d in delays]


def test_fifty_concurrent_callers_one_connection(servers, clients):
    srv, addr = servers()
    c = clients(addr)

    def caller(i):
        for j in range(40):
            r = c.do("GET", "/", host=f"h{i}-{j}.com")
            assert r.body == f"h{i}-{j}.com".encode()
    concurrently(caller, 50, timeout=30)
    assert srv._ts.connections == 1


def test_multi_clients_and_conns(servers, clients):
    srv, addr = servers()
    many = [clients(addr) for _ in range(5)]
    spread = clients(addr, conns=4)
    for c in many + [spread]:
        do_get(c, 20, True)
    assert srv._ts.connections == 5 + 4


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["nodelay", "delay10ms"])
@pytest.mark.parametrize("req_codec,resp_codec", list(itertools.product(CODECS, CODECS)))
def test_codec_pairs(servers, clients, req_codec, resp_codec, delay):
    _, addr = servers(compress=resp_codec, delay=delay)
    c = clients(addr, compress=req_codec, delay=delay)
    do_get(c, 10, True)
    do_post(c, 10, False)
    do_sleep(c, 10, True)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("size", [1, 4 << 20], ids=["1B", "4MiB"])
def test_bodies_both_ways(servers, clients, codec, size):
    _, addr = servers(compress=codec)
    c = clients(addr, compress=codec, timeout=20)
    rnd = random.Random(size)
    if size == 1:
        body = b"x"
    else:     # half incompressible, half text
        body = rnd.randbytes(size // 2) + b"teleport " * (size // 2 // 9)
        body += b"." * (size - len(body))
    r = run(lambda: c.do("POST", "/", body=body, host="big.com"), timeout=30)
    assert r.status == 200 and len(r.body) == size and r.body == body
    r = run(lambda: c.do("GET", "/", host="after.com"))
    assert r.body == b"after.com"


def test_head_204_304(servers, clients):
    def handler(req):
        if req.path == "/204":
            return 204, {"X-A": "1"}, b"dropped"
        if req.path == "/304":
            return 304, {"ETag": '"x"'}, b"dropped"
        return 200, {"X-A": "1", "Content-Length": "999"}, b"a body HEAD must not carry"
    _, addr = servers(handler)
    c = clients(addr)
    for codec_check in range(2):
        r = c.do("HEAD", "/")
        assert (r.status, r.body, r.header("x-a"), r.header("content-length")) == (200, b"", "1", "0")
        r = c.do("GET", "/204")
        assert (r.status, r.body, r.header("content-length")) == (204, b"", None)
        r = c.do("GET", "/304")
        assert (r.status, r.body, r.header("etag")) == (304, b"", '"x"')
        r = c.do("GET", "/")
        assert r.body == b"a body HEAD must not carry" and r.header("content-length") == "26"


@pytest.mark.parametrize("codec", list(Compress))
def test_in_compress_auto_answers_in_the_clients_codec(servers, clients, codec):
    _, addr = servers(compress="auto")
    s, hdr = run(lambda: raw_connect(addr, codec))
    s.close()
    assert hdr == b"httpteleport\x00" + bytes((codec, 0))
    c = clients(addr, compress=codec.name.lower())
    do_get(c, 10, True)


def test_concurrency_limit_429_then_200(servers, clients):
    release = gevent.event.Event()

    def handler(req):
        if req.path == "/block":
            release.wait(10)
            return 200, [], b"done"
        return 200, [], b"fast"
    srv, addr = servers(handler, concurrency=10)
    c = clients(addr, timeout=10)
    blocked = [gevent.spawn(c.do, "GET", "/block") for _ in range(10)]
    wait_for(lambda: srv.busy == 10, what="10 blocked handlers")
    over = concurrently(lambda i: c.do("GET", "/x"), 100)
    assert {r.status for r in over} == {429}
    assert over[0].body == b"concurrency limit of 10 exceeded; raise -concurrency or reduce the load\n"
    assert over[0].header("content-type").startswith("text/plain")
    release.set()
    gevent.joinall(blocked, timeout=5)
    assert [(g.value.status, g.value.body) for g in blocked] == [(200, b"done")] * 10
    assert c.do("GET", "/x").status == 200


def test_request_id_zero_runs_the_handler_and_gets_no_answer(servers):
    seen = []

    def handler(req):
        seen.append(req.path)
        return 200, [], req.path
    _, addr = servers(handler, compress="none")

    def exchange():
        s, hdr = raw_connect(addr)
        assert hdr[13] == Compress.NONE
        s.sendall(encode_request(0, b"GET", b"/zero", [(b"Host", b"a")], b"")
                  + encode_request(7, b"GET", b"/seven", [(b"Host", b"a")], b""))
        frames = []
        reader = FrameReader("response", 4096)
        s.settimeout(2)
        while not frames:
            frames += reader.feed(s.recv(65536))
        s.settimeout(0.3)          # nothing else may come: no answer for id 0
        try:
            extra = s.recv(65536)
        except socket.timeout:
            extra = b""
        s.close()
        return frames, extra
    frames, extra = run(exchange)
    assert [(i, b) for i, _, b in frames] == [(7, b"/seven")]
    assert extra == b""
    assert sorted(seen) == ["/seven", "/zero"]


def test_wire_bytes_match_the_worked_example(servers, fakes):
    """PROTOCOL.md §1.8: the client's bytes with codec none, and a Go-written
    request read by our server."""
    fake = fakes()
    tc = TeleportClient(fake.addr, compress=Compress.NONE)
    r = run(lambda: tc.request(b"GET", b"/aaa", [(b"User-Agent", b"fasthttp"),
                                                 (b"Host", b"foobar0.com")], b"",
                               time.monotonic() + 5))
    tc.close()
    assert r.body == b"/aaa"
    assert bytes(fake.raw) == (b"httpteleport\x00\x01\x00" + b"\x01\x00\x00\x00"
                               b"GET /aaa HTTP/1.1\r\nUser-Agent: fasthttp\r\nHost: foobar0.com\r\n\r\n")

    _, addr = servers(compress="none")

    def exchange():
        s, hdr = raw_connect(addr)
        s.sendall(b"\x01\x00\x00\x00GET /aaa HTTP/1.1\r\nUser-Agent: fasthttp\r\n"
                  b"Host: foobar0.com\r\n\r\n")
        s.settimeout(2)
        data = b""
        while not data.endswith(b"foobar0.com"):
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        s.close()
        return hdr, data
    hdr, data = run(exchange)
    assert hdr == b"httpteleport\x00\x01\x00"
    assert data.startswith(b"\x01\x00\x00\x00HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 11\r\n\r\nfoobar0.com" in data


def test_unix_socket(tmp_path, clients):
    path = str(tmp_path / "tp.sock")
    srv = Server(go_handler, log=LOG_SINK)
    try:
        addr = srv.start("unix:" + path)
        assert addr == "unix:" + path
        c = clients(addr)
        do_get(c, 20, True)
    finally:
        srv.stop(timeout=1)


# --------------------------------------------------------------------------- batching

def test_batch_delay_groups_writes():
    """Five requests 2 ms apart leave in one write with a 50 ms delay.  Without
    delay each leaves at once: five requests one after the other, five writes
    (spaced ones could share a write when a loaded machine stalls the process
    for 2 ms, which made this test flaky)."""
    stats = Stats.create(3)
    ts = TeleportServer(lambda head, body, peer: Answer(200, b"OK", [], b"ok"),
                        compress=Compress.NONE)
    srv_sock, accept_g = _serve_ts(ts)
    addr = "127.0.0.1:%d" % srv_sock.getsockname()[1]
    try:
        for block, delay, want in ((0, 0.05, 1), (1, 0.0, 5)):
            tc = TeleportClient(addr, compress=Compress.NONE, delay=delay, stats=stats, block=block)
            run(lambda: tc.request(b"GET", b"/", [(b"Host", b"a")], b"", time.monotonic() + 5))
            base = stats.block_base(block)
            before = stats.q[base + S.OUT_WRITE_CALLS]

            def spaced(i):
                gevent.sleep(0.002 * i)
                return tc.request(b"GET", b"/", [(b"Host", b"a")], b"", time.monotonic() + 5)
            if delay:
                concurrently(spaced, 5)
            else:
                for _ in range(5):
                    run(lambda: tc.request(b"GET", b"/", [(b"Host", b"a")], b"",
                                           time.monotonic() + 5))
            tc.close()
            assert stats.q[base + S.OUT_WRITE_CALLS] - before == want, (delay, want)
    finally:
        srv_sock.close()
        accept_g.kill()


def test_full_batch_flushes_before_the_delay(servers, clients):
    """A 1 s batch delay, but 100 KiB of request: the 64 KiB buffer flushes early."""
    _, addr = servers()
    c = clients(addr, delay=1.0)
    body = os.urandom(100 << 10)
    t0 = time.monotonic()
    r = run(lambda: c.do("POST", "/", body=body))
    assert r.body == body
    # The tail (< 64 KiB) still waits for the timer; the head went at once.
    assert time.monotonic() - t0 < 1.5


def _serve_ts(ts, listener=None):
    lsock = listener or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if listener is None:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)

    def loop():
        while True:
            try:
                s, a = lsock.accept()
            except OSError:
                return
            gevent.spawn(ts.handle, s, f"{a[0]}:{a[1]}")
    return lsock, gevent.spawn(loop)


def test_counters_match_on_both_ends():
    stats = Stats.create(2)
    ts = TeleportServer(lambda head, body, peer: Answer(200, b"OK", [], body or b"x" * 100),
                        compress=Compress.FLATE, stats=stats, block=1)
    lsock, g = _serve_ts(ts)
    addr = "127.0.0.1:%d" % lsock.getsockname()[1]
    tc = TeleportClient(addr, compress=Compress.SNAPPY, stats=stats, block=0)
    try:
        concurrently(lambda i: tc.request(b"POST", b"/", [(b"Host", b"a")], b"y" * i,
                                          time.monotonic() + 5), 50)
        q, c, s = stats.q, stats.block_base(0), stats.block_base(1)
        assert q[c + S.OUT_DIAL_SUCCESS] == 1 and q[c + S.OUT_CONNS] == 1
        wait_for(lambda: q[s + S.IN_BYTES_READ] == q[c + S.OUT_BYTES_WRITTEN], what="bytes in")
        assert q[c + S.OUT_BYTES_READ] == q[s + S.IN_BYTES_WRITTEN] > 15
        assert q[c + S.OUT_WRITE_CALLS] >= 2 and q[c + S.OUT_READ_CALLS] >= 2
        tc.close()
        assert q[c + S.OUT_CONNS] == 0
        assert q[c + S.OUT_READ_ERROR] == q[c + S.OUT_WRITE_ERROR] == 0
    finally:
        tc.close()
        lsock.close()
        g.kill()


# --------------------------------------------------------------------------- failures

def test_server_killed_mid_stream_then_reconnect(servers, clients):
    release = gevent.event.Event()

    def handler(req):
        if req.path == "/block":
            release.wait(10)
        return 200, [], b"ok"
    srv, addr = servers(handler)
    logs = _Sink()
    c = Client(addr, timeout=10, log=logs)
    try:
        calls = [gevent.spawn(attempt, c.do, "GET", "/block") for _ in range(10)]
        wait_for(lambda: srv.busy == 10, what="10 handlers running")
        t0 = time.monotonic()
        srv.stop(timeout=0)            # kill: connections closed under the requests
        gevent.joinall(calls, timeout=3)
        assert time.monotonic() - t0 < 1.5
        assert all(isinstance(g.value, UpstreamError) for g in calls), [g.value for g in calls]
        assert not any(g.value.sent_nothing_back for g in calls)
        assert len(logs) == 1 and "failed" in logs[0], logs
        srv2, _ = None, None
        srv2 = Server(handler, log=LOG_SINK)
        srv2.start(addr)               # same port
        try:
            r = run(lambda: c.do("GET", "/again"))
            assert r.status == 200 and r.body == b"ok"
        finally:
            srv2.stop(timeout=1)
    finally:
        release.set()
        c.close()


def test_handshake_never_answered_fails_by_the_deadline(fakes):
    fake = fakes(answer_handshake=False)
    c = Client(fake.addr, timeout=0.3, log=_Sink())
    try:
        t0 = time.monotonic()
        with pytest.raises(GatewayTimeout):
            run(lambda: c.do("GET", "/"))
        assert 0.25 <= time.monotonic() - t0 < 1.0
    finally:
        c.close()


def test_tls_request_to_plain_server_gets_flag_0_and_close(servers):
    logs = _Sink()
    _, addr = servers(log=logs)

    def exchange():
        s, hdr = raw_connect(addr, Compress.FLATE, tls=True)
        rest = read_until_closed(s)
        s.close()
        return hdr, rest
    hdr, rest = run(exchange)
    assert hdr == b"httpteleport\x00\x00\x00" and rest == b""
    assert len(logs) == 1 and "TLS" in logs[0]


def test_protocol_errors_are_counted_on_both_ends():
    """A bad handshake and a corrupt stream each count once as a teleport error,
    on the server (inTeleportErrors) and on the client (outTeleportErrors)."""
    stats = Stats.create(2)
    ts = TeleportServer(lambda head, body, peer: Answer(200, b"OK", [], b"x"),
                        compress=Compress.FLATE, stats=stats, block=1, log=_Sink())
    lsock, g = _serve_ts(ts)
    addr = "127.0.0.1:%d" % lsock.getsockname()[1]
    q, s = stats.q, stats.block_base(1)
    try:
        def bad_hello():
            c = socket.create_connection(("127.0.0.1", lsock.getsockname()[1]), timeout=3)
            c.sendall(b"httpteleporX\x00\x01\x00")
            read_until_closed(c)
            c.close()
        run(bad_hello)
        wait_for(lambda: q[s + S.IN_TELEPORT_ERRORS] == 1, what="a counted handshake error")

        def garbage():
            c, _ = raw_connect(addr, Compress.NONE)
            c.sendall(b"\x01\x00\x00\x00NOT HTTP AT ALL\r\n\r\n")
            read_until_closed(c)
            c.close()
        run(garbage)
        wait_for(lambda: q[s + S.IN_TELEPORT_ERRORS] == 2, what="a counted framing error")
    finally:
        lsock.close()
        g.kill()


def test_client_counts_a_server_that_speaks_garbage(fakes):
    stats = Stats.create(1)
    fake = fakes(respond=lambda req_id, head, body: b"\x01\x00\x00\x00HTTP/9.9 what\r\n\r\n")
    tc = TeleportClient(fake.addr, compress=Compress.NONE, stats=stats, block=0, log=_Sink())
    try:
        with pytest.raises(UpstreamError):
            run(lambda: tc.request(b"GET", b"/", [(b"Host", b"a")], b"", time.monotonic() + 3))
        assert stats.q[stats.block_base(0) + S.OUT_TELEPORT_ERRORS] == 1
    finally:
        tc.close()


@pytest.mark.parametrize("codec", [Compress.NONE, Compress.FLATE, Compress.SNAPPY])
def test_garbage_after_handshake_closes_server_connection_logged_once(servers, codec):
    logs = _Sink()
    _, addr = servers(log=logs)

    def exchange():
        s, hdr = raw_connect(addr, codec)
        s.sendall(b"\x01\x00\x00\x00NOT HTTP AT ALL\r\n\r\n" + b"\xff" * 200)
        rest = read_until_closed(s)
        s.close()
        return rest
    assert run(exchange) == b""
    wait_for(lambda: logs, what="a log line")
    gevent.sleep(0.05)
    assert len(logs) == 1, logs


def test_bad_handshake_closes_logged_once(servers):
    logs = _Sink()
    _, addr = servers(log=logs)

    def exchange():
        host, port = addr.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=3)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        rest = read_until_closed(s)
        s.close()
        return rest
    assert run(exchange) == b""
    assert len(logs) == 1 and "magic" in logs[0], logs


def test_silent_peer_is_closed_after_the_handshake_timeout():
    ts = TeleportServer(lambda h, b, p: Answer(200, b"OK", [], b""), handshake_timeout=0.2,
                        log=_Sink())
    lsock, g = _serve_ts(ts)
    try:
        def exchange():
            s = socket.create_connection(lsock.getsockname(), timeout=3)
            t0 = time.monotonic()
            rest = read_until_closed(s)
            s.close()
            return rest, time.monotonic() - t0
        rest, took = run(exchange)
        assert rest == b"" and 0.15 < took < 1.5
        assert ts.log == []
    finally:
        lsock.close()
        g.kill()


def test_garbage_from_server_fails_all_pending_logged_once(fakes):
    def respond(req_id, head, body):
        if head.target == b"/bad":
            return b"\x05\x00\x00\x00HTTP/9.9 what\r\n\r\n"
        return None                     # the others wait for ever
    fake = fakes(respond=respond)
    logs = _Sink()
    c = Client(fake.addr, timeout=5, log=logs)
    try:
        waiting = [gevent.spawn(attempt, c.do, "GET", f"/wait{i}") for i in range(4)]
        wait_for(lambda: len(fake.ids) == 4, what="4 requests at the server")
        with pytest.raises(UpstreamError):
            run(lambda: c.do("GET", "/bad"))
        gevent.joinall(waiting, timeout=2)
        assert all(isinstance(g.value, UpstreamError) for g in waiting)
        assert len(logs) == 1, logs
    finally:
        c.close()


def test_sticky_dial_error_fails_fast_then_recovers(clients):
    addr = dead_address()               # nothing listens there
    logs = _Sink()
    c = clients(addr, timeout=2, log=logs)
    with pytest.raises(UpstreamError) as first:
        run(lambda: c.do("GET", "/"))
    assert first.value.sent_nothing_back
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as second:
        run(lambda: c.do("GET", "/"))
    assert time.monotonic() - t0 < 0.05
    assert str(second.value) == str(first.value)
    assert len(logs) == 1
    srv = Server(go_handler, log=LOG_SINK)
    srv.start(addr)
    try:
        gevent.sleep(1.05)
        assert run(lambda: c.do("GET", "/", host="back.com")).body == b"back.com"
    finally:
        srv.stop(timeout=1)


def test_request_id_wraps_and_skips_zero(fakes):
    fake = fakes()
    tc = TeleportClient(fake.addr)
    try:
        tc._next_id = 0xFFFFFFFD
        for i in range(4):
            r = run(lambda: tc.request(b"GET", b"/s%d" % i, [(b"Host", b"a")], b"",
                                       time.monotonic() + 5))
            assert r.body == b"/s%d" % i
        got = concurrently(lambda i: tc.request(b"GET", b"/c%d" % i, [(b"Host", b"a")], b"",
                                                time.monotonic() + 5).body, 6)
        assert got == [b"/c%d" % i for i in range(6)]
        assert fake.ids == [0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF, 1, 2, 3, 4, 5, 6, 7]
        assert tc._next_id == 8
    finally:
        tc.close()


def test_wrapped_id_still_pending_drops_the_connection(fakes):
    fake = fakes(respond=lambda i, h, b: None)     # answers nothing
    tc = TeleportClient(fake.addr, log=_Sink())
    try:
        stuck = gevent.spawn(attempt, tc.request, b"GET", b"/", [(b"Host", b"a")], b"",
                             time.monotonic() + 5)   # id 1
        wait_for(lambda: fake.ids == [1], what="id 1 sent")
        tc._next_id = 1
        with pytest.raises(UpstreamError, match="overflow"):
            run(lambda: tc.request(b"GET", b"/", [(b"Host", b"a")], b"", time.monotonic() + 5))
        stuck.join(2)
        assert isinstance(stuck.value, UpstreamError)
        assert tc.pending == 0
    finally:
        tc.close()


def test_pending_cap_fails_at_once(servers, clients):
    release = gevent.event.Event()

    def handler(req):
        release.wait(10)
        return 200, [], b"ok"
    srv, addr = servers(handler)
    c = clients(addr, max_pending=5, timeout=10)
    held = [gevent.spawn(c.do, "GET", "/") for _ in range(5)]
    wait_for(lambda: srv.busy == 5, what="5 pending")
    assert c.pending == 5
    t0 = time.monotonic()
    with pytest.raises(UpstreamError, match="too many pending") as e:
        run(lambda: c.do("GET", "/"))
    assert e.value.sent_nothing_back and time.monotonic() - t0 < 0.05
    release.set()
    gevent.joinall(held, timeout=5)
    assert all(g.value.status == 200 for g in held)
    assert c.pending == 0


def test_client_timeout_then_late_response_discarded(servers, clients):
    def handler(req):
        if req.path == "/slow":
            gevent.sleep(0.3)
            return 200, [], b"late"
        return 200, [], req.path
    _, addr = servers(handler)
    c = clients(addr, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(GatewayTimeout):
        run(lambda: c.do("GET", "/slow", timeout=0.05))
    assert time.monotonic() - t0 < 0.25
    assert c.pending == 0
    assert run(lambda: c.do("GET", "/now")).body == b"/now"
    gevent.sleep(0.4)                   # the late answer has arrived and been dropped
    got = concurrently(lambda i: c.do("GET", f"/n{i}").body, 20)
    assert got == [f"/n{i}".encode() for i in range(20)]


def test_go_style_head_answers_with_length_even_late(fakes):
    """A Go server answers HEAD with Content-Length N and no body: the client
    must not read N bytes, also when the HEAD already timed out."""
    def respond(req_id, head, body):
        if head.method == b"HEAD":
            if head.target == b"/slow":
                gevent.sleep(0.2)
            return (req_id.to_bytes(4, "little")
                    + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
        return encode_response(req_id, 200, b"OK", [], head.target)
    fake = fakes(respond=respond)
    tc = TeleportClient(fake.addr)
    try:
        def req(method, target, timeout=2.0):
            return tc.request(method, target, [(b"Host", b"a")], b"", time.monotonic() + timeout)
        r = run(lambda: req(b"HEAD", b"/"))
        assert r.body == b"" and r.head.content_length == 9
        with pytest.raises(GatewayTimeout):
            run(lambda: req(b"HEAD", b"/slow", 0.05))
        gevent.sleep(0.3)
        assert run(lambda: req(b"GET", b"/next")).body == b"/next"
    finally:
        tc.close()


def test_expired_in_queue_is_never_sent(fakes):
    fake = fakes()
    tc = TeleportClient(fake.addr)
    try:
        with pytest.raises(GatewayTimeout):
            run(lambda: tc.request(b"GET", b"/late", [(b"Host", b"a")], b"", time.monotonic() - 1))
        assert run(lambda: tc.request(b"GET", b"/ok", [(b"Host", b"a")], b"",
                                      time.monotonic() + 2)).body == b"/ok"
        assert fake.ids == [2]
    finally:
        tc.close()


def test_handler_exception_is_500_and_logged(servers, clients):
    logs = _Sink()

    def handler(req):
        raise RuntimeError("boom")
    _, addr = servers(handler, log=logs)
    c = clients(addr)
    r = c.do("GET", "/x")
    assert r.status == 500 and r.body == b"internal error\n"
    assert len(logs) == 1 and "boom" in logs[0]


def test_stop_drains_in_flight(clients):
    def handler(req):
        gevent.sleep(0.2)
        return 200, [], b"finished"
    srv = Server(handler, log=LOG_SINK)
    addr = srv.start()
    c = clients(addr, timeout=5)
    g = gevent.spawn(c.do, "GET", "/")
    wait_for(lambda: srv.busy == 1, what="handler running")
    t0 = time.monotonic()
    srv.stop(timeout=3)
    assert time.monotonic() - t0 < 1.0
    g.join(1)
    assert g.value is not None and g.value.body == b"finished"
    with pytest.raises(UpstreamError):
        run(lambda: c.do("GET", "/"))


def test_client_close_fails_waiters(servers):
    release = gevent.event.Event()

    def handler(req):
        release.wait(5)
        return 200, [], b"ok"
    srv, addr = servers(handler)
    c = Client(addr, timeout=5)
    g = gevent.spawn(attempt, c.do, "GET", "/")
    wait_for(lambda: srv.busy == 1, what="handler running")
    c.close()
    g.join(1)
    assert isinstance(g.value, UpstreamError)
    with pytest.raises(UpstreamError, match="closed"):
        c.do("GET", "/")
    release.set()


def test_get_with_body_is_refused(servers, clients):
    _, addr = servers()
    c = clients(addr)
    with pytest.raises(ValueError):
        c.do("GET", "/", body=b"no")
    assert c.do("GET", "/", host="still.ok").body == b"still.ok"


# --------------------------------------------------------------------------- hot-path machinery

def test_caller_timer_ends_the_wait_and_the_late_answer_is_dropped(fakes):
    """``interrupted_at_deadline``: the client starts no timer; the caller's
    (the pipeline's -outTimeout Deadline) ends the wait, the request is
    forgotten, and its late answer is read and dropped."""
    from httptp.io.timers import Deadline

    class Interrupted(Exception):
        pass

    def respond(req_id, head, body):
        if head.target == b"/slow":
            gevent.sleep(0.2)
        return encode_response(req_id, 200, b"OK", [], head.target)
    fake = fakes(respond=respond)
    tc = TeleportClient(fake.addr)

    def req(target, seconds):
        timer = Deadline(seconds, Interrupted)
        timer.arm()
        try:
            return tc.request(b"GET", target, [(b"Host", b"a")], b"",
                              time.monotonic() + seconds, interrupted_at_deadline=True)
        finally:
            timer.close()
    try:
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            run(lambda: req(b"/slow", 0.05))
        assert time.monotonic() - t0 < 0.15 and tc.pending == 0
        gevent.sleep(0.3)                     # the late answer arrives and is dropped
        got = concurrently(lambda i: run(lambda: req(b"/n%d" % i, 2.0)).body, 10)
        assert got == [b"/n%d" % i for i in range(10)]
    finally:
        tc.close()


def test_handler_greenlets_are_reused_and_capped(monkeypatch):
    """Handlers run in parked greenlets when there are some; no more than
    MAX_IDLE_HANDLERS stay parked after a burst."""
    from httptp.io import teleport_server as tsm
    monkeypatch.setattr(tsm, "MAX_IDLE_HANDLERS", 4)
    release = gevent.event.Event()
    seen = []

    def handler(head, body, peer):
        seen.append(gevent.getcurrent())
        if head.target == b"/hold":
            release.wait(5)
        return Answer(200, b"OK", [], head.target)
    ts = TeleportServer(handler, compress=Compress.NONE)
    lsock, accept_g = _serve_ts(ts)
    tc = TeleportClient("127.0.0.1:%d" % lsock.getsockname()[1], compress=Compress.NONE)

    def get(target):
        return tc.request(b"GET", target, [(b"Host", b"a")], b"", time.monotonic() + 5).body
    try:
        held = [gevent.spawn(get, b"/hold") for _ in range(10)]
        wait_for(lambda: ts.busy == 10, what="10 running handlers")
        release.set()
        gevent.joinall(held, timeout=5)
        assert [g.value for g in held] == [b"/hold"] * 10
        wait_for(lambda: len(ts._idle) == 4, what="4 parked handlers")
        assert len(set(seen)) == 10
        del seen[:]
        assert [run(get, b"/n%d" % i) for i in range(20)] == [b"/n%d" % i for i in range(20)]
        assert len(set(seen)) <= 4 and len(ts._idle) == 4     # served by the parked ones
    finally:
        tc.close()
        lsock.close()
        accept_g.kill()


def test_batch_delay_backlog_fills_a_batch_early():
    """With a 1 s delay, requests queued while a batch waits are framed when
    it flushes; when they add up to 64 KiB the batch leaves at once."""
    stats = Stats.create(2)
    ts = TeleportServer(lambda head, body, peer: Answer(200, b"OK", [], b"%d" % len(body)),
                        compress=Compress.NONE)
    lsock, accept_g = _serve_ts(ts)
    tc = TeleportClient("127.0.0.1:%d" % lsock.getsockname()[1], compress=Compress.NONE,
                        delay=1.0, stats=stats, block=0)
    base = stats.block_base(0)

    def post(i):
        return tc.request(b"POST", b"/", [(b"Host", b"a")], b"x" * 8000,
                          time.monotonic() + 5).body
    try:
        run(lambda: tc.request(b"GET", b"/", [(b"Host", b"a")], b"", time.monotonic() + 5))
        before = stats.q[base + S.OUT_WRITE_CALLS]
        t0 = time.monotonic()
        posts = [gevent.spawn(post, 0)]             # starts a batch that waits 1 s
        gevent.sleep(0.05)
        posts += [gevent.spawn(post, i) for i in range(1, 12)]    # 96 KB in all
        wait_for(lambda: sum(g.dead for g in posts) >= 8, timeout=0.8, what="a full batch")
        assert time.monotonic() - t0 < 0.8
        gevent.joinall(posts, timeout=3)
        assert [g.value for g in posts] == [b"8000"] * 12
        assert stats.q[base + S.OUT_WRITE_CALLS] - before == 2     # the full one, the rest
    finally:
        tc.close()
        lsock.close()
        accept_g.kill()


def test_request_that_times_out_while_its_batch_waits_is_never_sent(fakes):
    fake = fakes()
    tc = TeleportClient(fake.addr, delay=0.2)
    try:
        def req(target, seconds):
            return tc.request(b"GET", target, [(b"Host", b"a")], b"", time.monotonic() + seconds)
        assert run(lambda: req(b"/warm", 2.0)).body == b"/warm"        # id 1: connected
        first = gevent.spawn(req, b"/first", 2.0)       # id 2 starts a batch that waits 0.2 s
        gevent.sleep(0.01)
        with pytest.raises(GatewayTimeout):
            run(lambda: req(b"/late", 0.05))             # id 3, queued behind it, expires first
        assert first.get(timeout=2).body == b"/first"
        assert fake.ids == [1, 2]
    finally:
        tc.close()
