"""The teleport client's link (``httptp.io.teleport_client``) in this process.

The link is a protocol on gevent's loop: callbacks, not greenlets.  Its peers
are the library ``Server`` or hand-made gevent sockets that do exactly one
odd thing (answer slowly, send a bomb, never read, never answer the
handshake).  Every wait is bounded; the callbacks are checked to run in the
hub and never from inside ``request_async``.
"""

from __future__ import annotations

import os
import socket as _stdsocket
import time

import gevent
import gevent.event
import pytest
from gevent import socket

from httptp import stats as S
from httptp.errors import ResponseTooLarge, UpstreamError
from httptp.http.events import Response
from httptp.io import teleport_client as tcm
from httptp.io.teleport_client import TeleportClient
from httptp.netaddr import parse_address
from httptp.stats import Stats
from httptp.teleport import Server, handshake
from httptp.teleport.codecs import compressor
from httptp.teleport.framing import FrameReader, encode_response
from httptp.teleport.handshake import Compress
from tests.helpers import dead_address

pytestmark = pytest.mark.timeout(60)

H = [(b"Host", b"a")]


class _Sink(list):
    def __call__(self, msg):
        self.append(msg)


def echo(req):
    return 200, [], req.body if req.method == "POST" else req.path


@pytest.fixture
def server():
    srv = Server(echo, compress="flate", log=_Sink())
    addr = srv.start("127.0.0.1:0")
    yield srv, addr
    srv.stop(timeout=1)


class Peer:
    """A hand-made teleport server: per connection, the handshake (unless
    ``hello`` is False), then ``serve(sock, reader)``.  Codec none both ways
    unless ``codec`` says which one it announces."""

    def __init__(self, serve, hello=True, codec=Compress.NONE, rcvbuf=None):
        self.serve, self.hello, self.codec = serve, hello, codec
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.conns = 0
        self.ids: list[int] = []
        self.socks = []
        self.g = gevent.spawn(self._accept)

    def _accept(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.conns += 1
            self.socks.append(s)
            gevent.spawn(self._one, s)

    def _one(self, s):
        try:
            got = b""
            while len(got) < handshake.HEADER_SIZE:
                data = s.recv(handshake.HEADER_SIZE - len(got))
                if not data:
                    return
                got += data
            if not self.hello:
                gevent.sleep(30)
                return
            s.sendall(handshake.encode(self.codec, False))
            self.serve(self, s, FrameReader("request", 1 << 20, max_body_size=64 << 20))
        except OSError:
            pass
        finally:
            s.close()

    def close(self):
        self.lsock.close()
        for s in self.socks:
            s.close()
        self.g.kill()


def answer_all(peer, s, reader):
    """Answer every request at once with its target as the body."""
    while True:
        data = s.recv(65536)
        if not data:
            return
        for req_id, head, _ in reader.feed(data):
            peer.ids.append(req_id)
            s.sendall(encode_response(req_id, 200, b"OK", [], head.target))


def slow_first(peer, s, reader):
    """Answer ``/slow`` 0.2 s late, everything else at once."""
    while True:
        data = s.recv(65536)
        if not data:
            return
        for req_id, head, _ in reader.feed(data):
            peer.ids.append(req_id)
            if head.target == b"/slow":
                gevent.spawn_later(0.2, s.sendall,
                                   encode_response(req_id, 200, b"OK", [], b"late"))
            else:
                s.sendall(encode_response(req_id, 200, b"OK", [], head.target))


@pytest.fixture
def peers():
    made = []

    def make(serve=answer_all, **kw):
        p = Peer(serve, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


class Results:
    """Callbacks that record what they got and where they ran."""

    def __init__(self):
        self.got = {}
        self.in_hub = []
        self.event = gevent.event.Event()
        self.expected = 0

    def callback(self, key):
        def cb(result):
            self.in_hub.append(gevent.getcurrent() is gevent.get_hub())
            self.got[key] = result
            if len(self.got) >= self.expected:
                self.event.set()
        return cb

    def wait(self, n, timeout=5.0):
        self.expected = n
        if len(self.got) < n:
            self.event.clear()
            assert self.event.wait(timeout), f"{len(self.got)} of {n} callbacks"
        return self.got


def body(result):
    assert isinstance(result, Response), result
    return result.body


# --------------------------------------------------------------------------- batching

def test_one_loop_turn_is_one_write_and_callbacks_run_in_the_hub(server):
    _, addr = server
    stats = Stats.create(1)
    tc = TeleportClient(addr, compress=Compress.SNAPPY, stats=stats, block=0)
    q, b = stats.q, stats.block_base(0)
    try:
        assert tc.request(b"GET", b"/warm", H, b"", time.monotonic() + 5).body == b"/warm"
        before = q[b + S.OUT_WRITE_CALLS]
        res = Results()
        for i in range(20):           # no yield in between: one batch
            tc.request_async(b"POST", b"/", H, b"body %d" % i, res.callback(i))
        assert tc.pending == 20 and not res.got
        got = res.wait(20)
        assert [body(got[i]) for i in range(20)] == [b"body %d" % i for i in range(20)]
        assert all(res.in_hub)
        assert q[b + S.OUT_WRITE_CALLS] - before == 1
        assert q[b + S.TELEPORT_SENT_PLAIN] > q[b + S.TELEPORT_SENT_COMPRESSED] > 0
        assert q[b + S.TELEPORT_RECEIVED_PLAIN] > 0 and q[b + S.TELEPORT_RECEIVED_COMPRESSED] > 0
        assert tc.pending == 0
    finally:
        tc.close()
    assert q[b + S.OUT_CONNS] == 0


def test_cancelled_while_its_batch_waits_is_never_sent(peers):
    peer = peers()
    tc = TeleportClient(peer.addr, compress=Compress.NONE, delay=0.2)
    try:
        assert tc.request(b"GET", b"/warm", H, b"", time.monotonic() + 5).body == b"/warm"
        res = Results()
        tc.request_async(b"GET", b"/kept", H, b"", res.callback("kept"))
        dropped = tc.request_async(b"GET", b"/dropped", H, b"", res.callback("dropped"))
        tc.cancel(dropped)
        assert tc.pending == 1
        assert body(res.wait(1)["kept"]) == b"/kept"
        gevent.sleep(0.05)
        assert peer.ids == [1, 2] and "dropped" not in res.got
    finally:
        tc.close()


def test_cancelled_after_sending_its_late_answer_is_dropped(peers):
    peer = peers(slow_first)
    tc = TeleportClient(peer.addr, compress=Compress.NONE)
    try:
        res = Results()
        slow = tc.request_async(b"GET", b"/slow", H, b"", res.callback("slow"))
        deadline = time.monotonic() + 2
        while peer.ids != [1] and time.monotonic() < deadline:
            gevent.sleep(0.005)
        tc.cancel(slow)
        assert tc.pending == 0
        gevent.sleep(0.3)             # the late answer came and was read and dropped
        assert tc.request(b"GET", b"/next", H, b"", time.monotonic() + 2).body == b"/next"
        assert res.got == {} and peer.conns == 1
    finally:
        tc.close()


# --------------------------------------------------------------------------- refusals

def test_refusals_come_later_and_in_the_hub(server):
    srv, addr = server
    release = gevent.event.Event()

    def held(req):
        release.wait(5)
        return 200, [], b"ok"
    srv.handler = held
    tc = TeleportClient(addr, compress=Compress.NONE, max_pending=2)
    try:
        res = Results()
        tc.request_async(b"GET", b"/1", H, b"", res.callback(1))
        tc.request_async(b"GET", b"/2", H, b"", res.callback(2))
        tc.request_async(b"GET", b"/3", H, b"", res.callback(3))
        assert res.got == {}          # not from inside request_async
        got = res.wait(1)
        assert isinstance(got[3], UpstreamError) and "too many pending" in str(got[3])
        assert got[3].sent_nothing_back
        cancelled = tc.request_async(b"GET", b"/4", H, b"", res.callback(4))
        tc.cancel(cancelled)          # a refusal not delivered yet is cancelled too
        release.set()
        got = res.wait(3)
        assert body(got[1]) == body(got[2]) == b"ok" and all(res.in_hub)
        gevent.sleep(0.01)
        assert 4 not in res.got
        tc.close()
        tc.request_async(b"GET", b"/", H, b"", res.callback(5))
        assert "closed" in str(res.wait(4)[5])
    finally:
        release.set()
        tc.close()


def test_a_request_the_codec_refuses_raises_at_once(server):
    _, addr = server
    tc = TeleportClient(addr)
    try:
        with pytest.raises(ValueError):
            tc.request_async(b"GET", b"/", H, b"a body", lambda r: None)
        assert tc.pending == 0
    finally:
        tc.close()


def test_unix_path_that_is_not_there_fails_fast_and_sticks(tmp_path):
    logs = _Sink()
    tc = TeleportClient(parse_address(f"unix:{tmp_path}/none.sock", "unix"), log=logs)
    try:
        res = Results()
        tc.request_async(b"GET", b"/", H, b"", res.callback(1))
        assert res.got == {}
        err = res.wait(1)[1]
        assert isinstance(err, UpstreamError) and "cannot connect" in str(err)
        assert err.sent_nothing_back and tc._link is None and len(logs) == 1
        tc.request_async(b"GET", b"/", H, b"", res.callback(2))
        assert str(res.wait(2)[2]) == str(err)       # sticky: the same error, no new dial
        assert len(logs) == 1
    finally:
        tc.close()


def test_handshake_never_answered_ends_at_the_handshake_deadline(peers, monkeypatch):
    monkeypatch.setattr(tcm, "HANDSHAKE_TIMEOUT", 0.2)
    peer = peers(hello=False)
    stats = Stats.create(1)
    tc = TeleportClient(peer.addr, stats=stats, block=0, log=_Sink())
    try:
        res = Results()
        t0 = time.monotonic()
        tc.request_async(b"GET", b"/", H, b"", res.callback(1))
        err = res.wait(1)[1]
        assert 0.15 < time.monotonic() - t0 < 1.0
        assert "handshake timed out" in str(err) and err.sent_nothing_back
        q, b = stats.q, stats.block_base(0)
        assert q[b + S.OUT_DIAL_SUCCESS] == 1 and q[b + S.OUT_CONNS] == 0
    finally:
        tc.close()


# --------------------------------------------------------------------------- reading

def _bomb_peer(size, close_after=False):
    """Answer each request with ``size`` zero bytes, flate-compressed (tiny on the wire)."""
    def serve(peer, s, reader):
        comp = compressor(Compress.FLATE)
        while True:
            data = s.recv(65536)
            if not data:
                return
            for req_id, _, _ in reader.feed(data):
                frame = encode_response(req_id, 200, b"OK", [], bytes(size))
                s.sendall(comp.compress(frame) + comp.flush())
                if close_after:
                    s.shutdown(_stdsocket.SHUT_WR)
    return serve


@pytest.mark.parametrize("close_after", [False, True])
def test_decompression_yields_to_the_loop_between_slices(peers, monkeypatch, close_after):
    """16 MiB from ~16 KiB of flate: the link decompresses 2 slices per loop
    turn with reading paused, other work runs in between, and an EOF right
    after the response waits for it."""
    monkeypatch.setattr(tcm, "YIELD_SLICES", 2)
    peer = peers(_bomb_peer(16 << 20, close_after), codec=Compress.FLATE)
    logs = _Sink()
    tc = TeleportClient(peer.addr, compress=Compress.NONE, max_body_size=32 << 20, log=logs)
    turns = []
    seen_paused = []

    def ticker():
        while True:
            link = tc._link
            turns.append(1)
            if link is not None and link._draining:
                seen_paused.append(not link.transport.reading)
            gevent.sleep(0)
    g = gevent.spawn(ticker)
    try:
        res = Results()
        tc.request_async(b"GET", b"/", H, b"", res.callback(1))
        r = res.wait(1, timeout=20)[1]
        assert len(body(r)) == 16 << 20 and not any(body(r))
        assert len(seen_paused) >= 5 and all(seen_paused)
        if close_after:
            deadline = time.monotonic() + 2
            while tc._link is not None and time.monotonic() < deadline:
                gevent.sleep(0.01)
            assert tc._link is None and logs == []      # nothing pending: a quiet end
    finally:
        g.kill()
        tc.close()


def test_response_over_the_body_limit_fails_its_call_and_the_link(peers):
    peer = peers(_bomb_peer(2000), codec=Compress.FLATE)
    stats = Stats.create(1)
    logs = _Sink()
    tc = TeleportClient(peer.addr, compress=Compress.NONE, max_body_size=1000, stats=stats,
                        block=0, log=logs,
                        limit_names={"header": "-outMaxHeaderSize", "body": "-outMaxBodySize"})
    q, b = stats.q, stats.block_base(0)
    try:
        res = Results()
        tc.request_async(b"GET", b"/", H, b"", res.callback(1))
        err = res.wait(1)[1]
        assert isinstance(err, ResponseTooLarge) and "-outMaxBodySize" in str(err)
        assert q[b + S.OUT_RESPONSE_TOO_LARGE] == 1 and q[b + S.OUT_CONNS] == 0
        assert tc._link is None and logs == []        # the call reports it, not the link
        tc.request_async(b"GET", b"/", H, b"", res.callback(2))
        assert isinstance(res.wait(2)[2], ResponseTooLarge)
        assert q[b + S.OUT_DIAL_SUCCESS] == 2          # a new link, not a sticky error
    finally:
        tc.close()


def test_server_close_fails_pending_then_reconnects(peers):
    def answer_then_close(peer, s, reader):
        while True:
            data = s.recv(65536)
            if not data:
                return
            for req_id, head, _ in reader.feed(data):
                peer.ids.append(req_id)
                if head.target == b"/bye":
                    s.close()
                    return
                s.sendall(encode_response(req_id, 200, b"OK", [], head.target))
    peer = peers(answer_then_close)
    logs = _Sink()
    tc = TeleportClient(peer.addr, compress=Compress.NONE, log=logs)
    try:
        res = Results()
        tc.request_async(b"GET", b"/bye", H, b"", res.callback(1))
        err = res.wait(1)[1]
        assert isinstance(err, UpstreamError) and not err.sent_nothing_back
        assert "closed by the server" in str(err) and len(logs) == 1
        assert tc.request(b"GET", b"/again", H, b"", time.monotonic() + 2).body == b"/again"
        assert peer.conns == 2 and tc._next_id == 3      # ids carry on over links
    finally:
        tc.close()


def test_peer_that_stops_reading_ends_the_link_by_the_write_timeout(peers):
    def never_read(peer, s, reader):
        gevent.sleep(30)
    peer = peers(never_read, rcvbuf=4096)
    stats = Stats.create(1)
    tc = TeleportClient(peer.addr, compress=Compress.NONE, write_timeout=0.3, stats=stats,
                        block=0, log=_Sink())
    try:
        res = Results()
        chunk = os.urandom(1 << 20)
        for i in range(48):
            tc.request_async(b"POST", b"/", H, chunk, res.callback(i))
        got = res.wait(48, timeout=10)
        assert all(isinstance(e, UpstreamError) and "write timed out" in str(e)
                   for e in got.values())
        assert any(not e.sent_nothing_back for e in got.values())
        assert any(e.sent_nothing_back for e in got.values())   # held back while paused
        assert stats.q[stats.block_base(0) + S.OUT_WRITE_ERROR] == 1
    finally:
        tc.close()


def test_idle_link_ends_quietly_after_the_read_timeout(server):
    _, addr = server
    logs = _Sink()
    stats = Stats.create(1)
    tc = TeleportClient(addr, read_timeout=0.2, stats=stats, block=0, log=logs)
    try:
        assert tc.request(b"GET", b"/", H, b"", time.monotonic() + 2).body == b"/"
        gevent.sleep(0.4)
        assert tc._link is None and logs == []
        assert stats.q[stats.block_base(0) + S.OUT_READ_ERROR] == 0
        assert tc.request(b"GET", b"/x", H, b"", time.monotonic() + 2).body == b"/x"
    finally:
        tc.close()


# --------------------------------------------------------------------------- the pipeline's exchange

class Down:
    """A downstream (the client connection's side of an exchange) that records
    its answer and where it ran."""

    def __init__(self):
        self.event = gevent.event.Event()
        self.result = None
        self.in_hub = None
        self.gone = False

    def _got(self, result):
        self.in_hub = gevent.getcurrent() is gevent.get_hub()
        self.result = result
        self.event.set()

    def response_whole(self, head, body, exchange):
        self._got((head.status, body))

    def response_error(self, err, head_sent):
        assert not head_sent
        self._got(err)

    def pause_reading(self):
        pass

    resume_reading = pause_reading

    def wait(self, timeout=5.0):
        assert self.event.wait(timeout), "no answer"
        return self.result


def _proxy(outs, timeout="2s"):
    from httptp.config import load_config
    from httptp.io.pipeline import Proxy
    cfg = load_config(["-outType=teleport", "-out=" + ",".join(outs),
                       f"-outTimeout={timeout}", "-outCompress=none", "-workers=1"], {})
    stats = Stats.create(1, 4)
    return Proxy(cfg, stats, 0, list(range(len(outs))), None, _Sink()), stats


def _head(method=b"GET", target=b"/x", length=None):
    from httptp.http.events import RequestHead
    return RequestHead(method, target, b"1.1", [(b"Host", b"h")], True, length, False)


def _exchange(proxy, head, body=b"", timer=None):
    from httptp.io.timers import Timer
    down = Down()
    timer = timer or Timer(proxy.timeout)
    ex = proxy.begin(head, None, down, timer, body_done=True)
    ex.start([body] if body else [], True)
    return ex, down


def test_exchange_answers_from_the_callback_in_the_hub(peers):
    peer = peers()
    proxy, stats = _proxy([peer.addr])
    try:
        ex, down = _exchange(proxy, _head())
        assert down.wait() == (200, b"/x") and down.in_hub
        assert ex.finished and ex.upstream_name == peer.addr
        assert stats.q[stats.block_base(0) + S.IN_REQUEST_SUCCESS] == 1
        # teleport in -> teleport out: Proxy.answer_async, a TeleportAnswer downstream
        got = gevent.event.AsyncResult()
        proxy.answer_async(_head(b"POST", b"/p", 3), b"abc", None, b"peer",
                           lambda req_id, answer, head: got.set((req_id, answer)), 7)
        req_id, answer = got.get(timeout=5)
        assert (req_id, answer.status, answer.body) == (7, 200, b"/p")
    finally:
        proxy.close()


def test_exchange_timeout_is_504_and_the_late_answer_is_dropped(peers):
    peer = peers(slow_first)
    proxy, stats = _proxy([peer.addr], timeout="50ms")
    try:
        ex, down = _exchange(proxy, _head(target=b"/slow"))
        err = down.wait()
        assert err.status == 504 and down.in_hub
        assert proxy.upstreams[0].pending == 0
        assert stats.q[stats.block_base(0) + S.IN_REQUEST_TIMEOUT_ERROR] == 1
        gevent.sleep(0.3)             # the late answer arrives on the same link
        _, down = _exchange(proxy, _head(target=b"/next"))
        assert down.wait() == (200, b"/next") and peer.conns == 1
    finally:
        proxy.close()


def test_idempotent_request_goes_once_more_to_the_other_upstream(peers):
    dead = dead_address()             # nothing listens there
    peer = peers()
    proxy, stats = _proxy([dead, peer.addr])
    real = proxy.balancer.pick
    proxy.balancer.pick = lambda tried=(): real(tried or {1})    # the dead one first
    q, b = stats.q, stats.block_base(0)
    try:
        ex, down = _exchange(proxy, _head())
        assert down.wait() == (200, b"/x")
        assert ex.upstream_name == peer.addr and q[b + S.OUT_DIAL_ERROR] == 1
        _, down = _exchange(proxy, _head(b"POST", b"/p", 1), b"b")    # not idempotent
        err = down.wait()
        assert err.status == 502 and "cannot connect" in str(err) and err.upstream == dead
        assert q[b + S.OUT_DIAL_ERROR] == 1                   # the sticky error, no new dial
    finally:
        proxy.close()


def test_client_gone_cancels_the_request_on_its_link(peers):
    peer = peers(slow_first)
    proxy, _ = _proxy([peer.addr])
    try:
        ex, down = _exchange(proxy, _head(target=b"/slow"))
        deadline = time.monotonic() + 2
        while not peer.ids and time.monotonic() < deadline:
            gevent.sleep(0.005)
        assert proxy.upstreams[0].pending == 1
        ex.abort()
        assert proxy.upstreams[0].pending == 0 and ex.lease is None
        gevent.sleep(0.3)
        assert down.result is None
    finally:
        proxy.close()
