"""httptp.io.teleport_serverconn: one teleport server connection as callbacks on
gevent's loop, driven in this process over socketpairs.

The server side is a ``TeleportServer`` started on one end (``start``: it
returns at once, no greenlet serves it); the test is the client on the other
end, a gevent socket in the test's own greenlet.  ``dispatch`` is the
worker's kind (answers from the hub, no greenlet) unless a test says so.
"""

from __future__ import annotations

import socket as _stdsocket
import time

import gevent
import pytest
from gevent import socket as gsocket

from httptp import stats as S
from httptp.io import teleport_serverconn as tsc
from httptp.io.teleport_server import Answer, TeleportServer
from httptp.io.transport import HIGH_WATER
from httptp.stats import Stats
from httptp.teleport import handshake
from httptp.teleport.codecs import compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request
from httptp.teleport.handshake import Compress

pytestmark = pytest.mark.timeout(30)


class Sink(list):
    def __call__(self, msg):
        self.append(msg)


class Peer:
    """The client end: handshake, request frames through a codec, answers."""

    def __init__(self, sock, codec=Compress.NONE, hello=True):
        self.sock = sock
        self.codec = codec
        self.comp = compressor(codec)
        self.frames = FrameReader("response", 1 << 24, lambda i: False)
        self.got = []
        self.dec = None
        if hello:
            self.hello()

    def hello(self, tls=False):
        self.sock.sendall(handshake.encode(self.codec, tls))
        head = self.recv_exactly(handshake.HEADER_SIZE)
        theirs, flag = handshake.decode(head)
        self.dec = decompressor(theirs)
        return theirs, flag

    def recv_exactly(self, n):
        data = b""
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            assert part, "closed during the handshake"
            data += part
        return data

    def send(self, *frames):
        plain = b"".join(frames)
        self.sock.sendall(self.comp.compress(plain) + self.comp.flush())

    @staticmethod
    def req(req_id, method=b"GET", target=b"/", body=b""):
        return encode_request(req_id, method, target, [(b"Host", b"x")], body)

    def _read(self, timeout):
        with gevent.Timeout(timeout):
            data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.dec.feed(data)
        while plain := self.dec.read():
            self.got += self.frames.feed(plain)
        return True

    def answers(self, n, timeout=5.0):
        """The first ``n`` answers: [(id, status, body)] in arrival order."""
        while len(self.got) < n:
            assert self._read(timeout), f"closed after {len(self.got)} answers"
        out, self.got = self.got[:n], self.got[n:]
        return [(rid, head.status, body) for rid, head, body in out]

    def closed(self, timeout=5.0) -> bool:
        """Read until EOF (answers on the way are kept)."""
        try:
            while self._read(timeout):
                pass
            return True
        except ConnectionResetError:
            return True
        except gevent.Timeout:
            return False


class Later:
    """A dispatch that answers from the hub when the test says so."""

    def __init__(self):
        self.waiting = []          # (conn, req_id, head, body)

    def __call__(self, conn, req_id, head, body):
        self.waiting.append((conn, req_id, head, body))

    def answer(self, i=0, status=200, body=None):
        conn, req_id, head, b = self.waiting.pop(i)
        conn.respond(req_id, Answer(status, b"", [], head.target if body is None else body),
                     head)


def echo_dispatch(conn, req_id, head, body):
    """Answers at once, from the hub: the target, or the body's length."""
    conn.respond(req_id, Answer(200, b"OK", [], b"%d" % len(body) if body else head.target))


@pytest.fixture
def stats():
    s = Stats.create(1)
    yield s
    s.close()


@pytest.fixture
def make(stats):
    """``make(**server_kw) -> (server, conn, peer)`` over a fresh socketpair."""
    made = []

    def make(codec=Compress.NONE, hello=True, **kw):
        kw.setdefault("dispatch", echo_dispatch)
        kw.setdefault("log", Sink())
        kw.setdefault("compress", Compress.NONE)
        srv = TeleportServer(None, stats=stats, block=0, **kw)
        a, b = _stdsocket.socketpair()
        client = gsocket.socket(a.family, a.type, fileno=a.detach())
        closed = []
        conn = srv.start(b, "peer:1", closed.append)
        srv.test_closed = closed
        made.append((client, conn))
        return srv, conn, Peer(client, codec, hello)

    yield make
    for client, conn in made:
        conn.abort()
        client.close()


def q(stats, field):
    return stats.q[stats.block_base(0) + field]


# --------------------------------------------------------------------------- basics

def test_requests_are_answered_from_the_hub_without_a_greenlet(make):
    srv, conn, peer = make()
    peer.send(peer.req(1, target=b"/a"), peer.req(2, b"POST", b"/b", b"xyz"))
    assert peer.answers(2) == [(1, 200, b"/a"), (2, 200, b"3")]
    assert srv.busy == 0 and conn.inflight == 0
    assert srv.connections == 1


def test_answers_go_out_in_completion_order_and_id_0_gets_none(make):
    later = Later()
    srv, conn, peer = make(dispatch=later)
    peer.send(peer.req(1, target=b"/1"), peer.req(0, target=b"/zero"), peer.req(2, target=b"/2"))
    with gevent.Timeout(5):
        while len(later.waiting) < 3:
            gevent.sleep(0.01)
    assert srv.busy == 3
    later.answer(2)             # id 2 first
    later.answer(1)             # id 0: runs, nothing is written
    later.answer(0)
    assert peer.answers(2) == [(2, 200, b"/2"), (1, 200, b"/1")]
    assert srv.busy == 0


@pytest.mark.parametrize("codec", [Compress.FLATE, Compress.SNAPPY, Compress.ZSTD])
def test_codecs_and_auto(make, codec):
    srv, conn, peer = make(codec=codec, compress="auto")
    assert conn.conn.compress == codec            # auto: answered in the client's codec
    body = b"abc" * 5000
    peer.send(peer.req(7, b"POST", b"/", body))
    assert peer.answers(1) == [(7, 200, b"15000")]


def test_head_answer_has_no_body(make):
    def big(conn, req_id, head, body):
        conn.respond(req_id, Answer(200, b"OK", [], b"x" * 100))
    srv, conn, peer = make(dispatch=big)
    peer.send(peer.req(1, b"HEAD", b"/"), peer.req(2))
    assert peer.answers(2) == [(1, 200, b""), (2, 200, b"x" * 100)]


def test_library_handlers_run_in_greenlets_and_may_block(make):
    def handler(head, body, peer):
        gevent.sleep(0.05 if head.target == b"/slow" else 0)
        return Answer(200, b"OK", [], head.target + b" " + peer.encode())
    srv = TeleportServer(handler, compress=Compress.NONE)
    a, b = _stdsocket.socketpair()
    client = gsocket.socket(a.family, a.type, fileno=a.detach())
    g = gevent.spawn(srv.handle, b, "peer:2")     # handle: returns when the connection ends
    try:
        peer = Peer(client)
        peer.send(peer.req(1, target=b"/slow"), peer.req(2, target=b"/fast"))
        assert peer.answers(2) == [(2, 200, b"/fast peer:2"), (1, 200, b"/slow peer:2")]
        client.close()
        g.join(5)
        assert g.dead and srv.connections == 0
    finally:
        g.kill()
        client.close()


def test_handler_exception_is_500_and_one_log_line():
    def handler(head, body, peer):
        raise RuntimeError("boom")
    log = Sink()
    srv = TeleportServer(handler, compress=Compress.NONE, log=log)
    a, b = _stdsocket.socketpair()
    client = gsocket.socket(a.family, a.type, fileno=a.detach())
    srv.start(b, "p")
    peer = Peer(client)
    peer.send(peer.req(1))
    assert peer.answers(1) == [(1, 500, b"internal error\n")]
    assert len(log) == 1 and "boom" in log[0]
    assert srv.busy == 0
    client.close()


# --------------------------------------------------------------------------- batching

def test_answers_of_one_loop_turn_leave_in_one_write(make, stats):
    srv, conn, peer = make()
    before = q(stats, S.IN_WRITE_CALLS)
    peer.send(*[peer.req(i, target=b"/%d" % i) for i in range(1, 21)])
    assert [a[0] for a in peer.answers(20)] == list(range(1, 21))
    assert q(stats, S.IN_WRITE_CALLS) - before == 1          # one batch, one write
    assert q(stats, S.TELEPORT_SENT_PLAIN) > 0


def test_in_delay_batches_answers_by_a_timer(make, stats):
    later = Later()
    srv, conn, peer = make(dispatch=later, delay=0.15)
    peer.send(peer.req(1), peer.req(2))
    with gevent.Timeout(5):
        while len(later.waiting) < 2:
            gevent.sleep(0.005)
    before = q(stats, S.IN_WRITE_CALLS)
    t0 = time.monotonic()
    later.answer(0)                      # arms the batch's timer
    gevent.sleep(0.05)
    later.answer(0)                      # joins the batch: no push back
    assert len(peer.answers(2)) == 2
    took = time.monotonic() - t0
    assert 0.12 < took < 0.5, took
    assert q(stats, S.IN_WRITE_CALLS) - before == 1


def test_a_full_batch_leaves_before_the_delay(make):
    def big(conn, req_id, head, body):
        conn.respond(req_id, Answer(200, b"OK", [], b"b" * 70000))
    srv, conn, peer = make(dispatch=big, delay=5.0)
    t0 = time.monotonic()
    assert peer.answers(0) == []
    peer.send(peer.req(1))
    assert peer.answers(1, timeout=2) == [(1, 200, b"b" * 70000)]
    assert time.monotonic() - t0 < 1.0


# --------------------------------------------------------------------------- limits

def test_over_concurrency_is_429_without_dispatch(make, stats):
    later = Later()
    srv, conn, peer = make(dispatch=later, concurrency=2)
    peer.send(peer.req(1), peer.req(2), peer.req(3))
    (rid, status, body), = peer.answers(1)
    assert (rid, status) == (3, 429) and b"concurrency limit of 2" in body
    assert len(later.waiting) == 2 and q(stats, S.IN_REQUEST_OVERLOAD) == 1
    later.answer(0)
    later.answer(0)
    assert sorted(a[0] for a in peer.answers(2)) == [1, 2]
    peer.send(peer.req(4))
    gevent.sleep(0.05)
    assert len(later.waiting) == 1                       # room again


def test_body_over_the_limit_is_413_and_the_stream_stays_in_sync(make, stats):
    refused = []
    srv, conn, peer = make(max_body_size=1000, refused=lambda *a: refused.append(a))
    peer.send(peer.req(1, b"POST", b"/over", b"o" * 1001), peer.req(2, b"POST", b"/n", b"n" * 5))
    assert peer.answers(2) == [(1, 413, b"request body too large\n"), (2, 200, b"5")]
    assert q(stats, S.IN_REQUEST_TOO_LARGE) == 1
    assert refused and refused[0][1:] == ("peer:1", 413, len(b"request body too large\n"))
    assert len(srv.log) == 1 and "max_body_size" in srv.log[0]


def test_header_over_the_limit_closes(make, stats):
    srv, conn, peer = make(max_header_size=100)
    peer.send(encode_request(1, b"GET", b"/" + b"p" * 200, [(b"Host", b"x")], b""))
    assert peer.closed()
    assert conn.closed and srv.test_closed == [conn]
    assert q(stats, S.IN_REQUEST_TOO_LARGE) == 1


def test_garbage_closes_counted_and_logged_once(make, stats):
    srv, conn, peer = make()
    peer.send(b"\x01\x00\x00\x00NOT HTTP AT ALL\r\n\r\n")
    assert peer.closed()
    assert q(stats, S.IN_TELEPORT_ERRORS) == 1 and len(srv.log) == 1


def test_a_bomb_is_decompressed_a_few_slices_per_loop_turn(make, stats):
    """256 MiB of zeros in a 413'd body: reading pauses while the slices are
    worked through, a few per callback, and other greenlets keep running."""
    from httptp.teleport import codecs
    srv, conn, peer = make(codec=Compress.FLATE, max_body_size=1000)
    gaps = []
    stop = []

    def ticker():
        last = time.monotonic()
        while not stop:
            gevent.sleep(0)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    tg = gevent.spawn(ticker)
    size = 256 << 20
    head = (1).to_bytes(4, "little") + (b"POST /bomb HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: %d\r\n\r\n" % size)
    comp = peer.comp
    wire = [comp.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        wire.append(comp.compress(zeros))
    wire.append(comp.flush())
    data = b"".join(wire)                 # ~256 KiB on the wire
    t0 = time.monotonic()
    peer.sock.sendall(data)
    assert peer.answers(1, timeout=20) == [(1, 413, b"request body too large\n")]
    slices = size // codecs.MAX_SLICE
    with gevent.Timeout(20):
        while conn.conn.plain_received < size:
            gevent.sleep(0.01)
    took = time.monotonic() - t0
    stop.append(1)
    tg.join(1)
    # the ticker ran between the callbacks: the hub was never held for long
    assert slices >= 16 * tsc.YIELD_SLICES
    print(f"{slices} slices in {took:.3f}s, longest gap {max(gaps):.4f}s")
    assert max(gaps) < max(0.05, took / 8), (max(gaps), took)
    peer.send(peer.req(2, target=b"/after"))
    assert peer.answers(1) == [(2, 200, b"/after")]
    assert conn.transport.reading


# --------------------------------------------------------------------------- flow control

def test_a_peer_that_does_not_read_pauses_reading_then_resumes(make):
    seen = []

    def big(conn, req_id, head, body):
        seen.append(req_id)
        conn.respond(req_id, Answer(200, b"OK", [], bytes(200_000)))
    srv, conn, peer = make(dispatch=big, write_timeout=10)
    n = 0
    with gevent.Timeout(10):
        while conn.transport.write_buffer_size <= HIGH_WATER:
            n += 1
            peer.send(peer.req(n))
            gevent.sleep(0.01)
    assert not conn.transport.reading            # no new request is read
    peer.send(peer.req(n + 1))
    gevent.sleep(0.05)
    assert seen == list(range(1, n + 1))
    got = peer.answers(n + 1, timeout=10)        # reading the answers resumes it
    assert [a[0] for a in got] == list(range(1, n + 2))
    assert conn.transport.reading


def test_slices_already_read_wait_while_the_answers_back_up(make):
    """One compressed burst of 200 requests (several slices): once the answers
    pass the high-water mark, the slices left are not decompressed until the
    peer reads."""
    from httptp.teleport import codecs
    seen = []

    def big(conn, req_id, head, body):
        seen.append(req_id)
        conn.respond(req_id, Answer(200, b"OK", [], bytes(100_000)))
    srv, conn, peer = make(codec=Compress.FLATE, dispatch=big, write_timeout=10)
    frames = [peer.req(i, b"POST", b"/", bytes(4096)) for i in range(1, 201)]
    assert sum(map(len, frames)) > 2 * codecs.MAX_SLICE
    peer.send(*frames)
    with gevent.Timeout(5):
        while not seen:
            gevent.sleep(0.01)
    gevent.sleep(0.1)
    assert 0 < len(seen) < 200 and not conn.transport.reading
    got = peer.answers(200, timeout=10)
    assert [a[0] for a in got] == list(range(1, 201)) == seen
    assert conn.transport.reading


def test_a_peer_that_never_reads_is_cut_after_the_write_timeout(make, stats):
    def big(conn, req_id, head, body):
        conn.respond(req_id, Answer(200, b"OK", [], bytes(300_000)))
    srv, conn, peer = make(dispatch=big, write_timeout=0.2)
    n = 0
    with gevent.Timeout(10):
        while not conn.closed:
            n += 1
            peer.send(peer.req(n))
            gevent.sleep(0.02)
    assert q(stats, S.IN_WRITE_ERROR) == 1 and srv.connections == 0


# --------------------------------------------------------------------------- ends

def test_silent_peer_is_closed_after_the_handshake_timeout(make):
    srv, conn, peer = make(hello=False, handshake_timeout=0.1)
    t0 = time.monotonic()
    assert peer.closed()
    assert 0.08 < time.monotonic() - t0 < 1.0
    assert srv.log == []


def test_idle_connection_ends_after_the_read_timeout(make):
    srv, conn, peer = make(read_timeout=0.1)
    peer.send(peer.req(1))
    assert peer.answers(1) == [(1, 200, b"/")]
    t0 = time.monotonic()
    assert peer.closed()
    assert time.monotonic() - t0 < 1.0 and srv.connections == 0


def test_bad_handshake_is_logged_and_closed(make, stats):
    srv, conn, peer = make(hello=False)
    peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert peer.closed()
    assert len(srv.log) == 1 and "magic" in srv.log[0]
    assert q(stats, S.IN_TELEPORT_ERRORS) == 1


def test_tls_flag_on_a_plain_listener_is_answered_0_and_closed(make):
    srv, conn, peer = make(hello=False)
    theirs, flag = peer.hello(tls=True)
    assert flag is False
    assert peer.closed()
    assert len(srv.log) == 1 and "TLS" in srv.log[0]


def test_drain_stops_reading_answers_in_flight_then_closes(make):
    later = Later()
    srv, conn, peer = make(dispatch=later)
    peer.send(peer.req(1))
    with gevent.Timeout(5):
        while not later.waiting:
            gevent.sleep(0.01)
    srv.drain()
    peer.send(peer.req(2))                      # not read any more
    gevent.sleep(0.05)
    assert len(later.waiting) == 1 and not conn.closed
    later.answer(0)
    assert peer.answers(1) == [(1, 200, b"/")]
    assert peer.closed() and conn.closed
    assert srv.connections == 0 and srv.test_closed == [conn]


def test_drain_with_nothing_in_flight_closes_at_once(make):
    srv, conn, peer = make()
    srv.drain()
    assert peer.closed(timeout=2)
    a, b = _stdsocket.socketpair()
    assert srv.start(b, "late") is None                  # draining: refused
    a.close()


def test_answers_after_the_client_left_are_dropped(make):
    later = Later()
    srv, conn, peer = make(dispatch=later)
    peer.send(peer.req(1))
    with gevent.Timeout(5):
        while not later.waiting:
            gevent.sleep(0.01)
    peer.sock.close()
    with gevent.Timeout(5):
        while not conn.closed:
            gevent.sleep(0.01)
    later.answer(0)                       # no error, nothing written
    assert srv.busy == 0


# --------------------------------------------------------------------------- TLS

def test_teleports_over_tls_with_sni(make, tmp_path):
    trustme = pytest.importorskip("trustme")
    import ssl

    from httptp import tls as tlsmod
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server_tls = tlsmod.ServerTLS([(str(cert_file), str(key_file))])
    srv, conn, peer = make(hello=False, tls=server_tls)
    theirs, flag = peer.hello(tls=True)
    assert flag is True
    from gevent import ssl as gssl
    gctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(gctx)
    peer.sock = gctx.wrap_socket(peer.sock, server_hostname="localhost")
    peer.send(peer.req(3, target=b"/secure"))
    assert peer.answers(1) == [(3, 200, b"/secure")]
    with gevent.Timeout(5):
        peer.sock.unwrap()                # our close_notify is answered with the server's
        while not conn.closed:
            gevent.sleep(0.01)


def test_teleports_refuses_plaintext_unless_allowed(make, tmp_path):
    trustme = pytest.importorskip("trustme")
    from httptp import tls as tlsmod
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server_tls = tlsmod.ServerTLS([(str(cert_file), str(key_file))])
    srv, conn, peer = make(hello=False, tls=server_tls)
    theirs, flag = peer.hello(tls=False)
    assert flag is True and peer.closed()           # "this listener needs TLS"
    assert "-inTLSAllowPlaintext" in srv.log[0]
    srv, conn, peer = make(tls=server_tls, allow_plaintext=True)
    peer.send(peer.req(1))
    assert peer.answers(1) == [(1, 200, b"/")]


# --------------------------------------------------------------------------- the worker's downstream

class _Timers:
    def __init__(self):
        self.released = []

    def release_timer(self, timer):
        self.released.append(timer)


def _head(method=b"GET"):
    from httptp.http.events import RequestHead
    return RequestHead(method=method, target=b"/", version=b"1.1", headers=[(b"Host", b"x")],
                       keep_alive=True, content_length=None, chunked=False,
                       expect_continue=False)


def _resp(status=200, headers=()):
    from httptp.http.events import ResponseHead
    return ResponseHead(status=status, reason=b"OK", version=b"1.1",
                        headers=[(b"Connection", b"keep-alive"), *headers], keep_alive=True,
                        content_length=None, chunked=True)


def test_teleport_answer_collects_a_streamed_response_once():
    from httptp.io.pipeline import TeleportAnswer
    proxy, got = _Timers(), []
    down = TeleportAnswer(proxy, _head(), "timer", lambda *a: got.append(a), 5)
    down.response_head(_resp(headers=[(b"X-A", b"1")]), None)
    down.response_data(b"ab")
    down.response_data(b"cd")
    down.response_end()
    from httptp.errors import BadGateway
    down.response_error(BadGateway("late"), True)    # after the end: ignored
    (req_id, ans, head), = got
    assert req_id == 5 and (ans.status, ans.body) == (200, b"abcd")
    assert ans.headers == [(b"X-A", b"1")]           # hop-by-hop headers dropped
    assert proxy.released == ["timer"]


def test_teleport_answer_head_and_errors():
    from httptp.errors import BadGateway
    from httptp.io.pipeline import TeleportAnswer
    proxy, got = _Timers(), []
    TeleportAnswer(proxy, _head(b"HEAD"), "t1", lambda *a: got.append(a), 1).response_whole(
        _resp(), b"body", None)
    TeleportAnswer(proxy, _head(), "t2", lambda *a: got.append(a), 2).response_error(
        BadGateway("refused"), False)
    assert [(r, a.status, a.body) for r, a, _ in got] == [(1, 200, b""),
                                                          (2, 502, BadGateway().payload)]
    assert proxy.released == ["t1", "t2"]
