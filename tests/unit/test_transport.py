"""httptp.io.transport in process: a Transport (and TLSTransport) on the hub's
loop over a socketpair or a loopback TCP pair, the test greenlet as its peer."""

from __future__ import annotations

import os
import socket
import ssl

import gevent
import pytest

from httptp import stats as S
from httptp.io import transport as T
from httptp.io.transport import IN, OUT, TLSTransport, Transport
from tests.unit.loop_helpers import (counters, hub_errors, read_all, reset, socketpair,  # noqa: F401
                                     tcp_pair, wait_until)

pytestmark = pytest.mark.usefixtures("hub_errors")

SMALL = 4096          # SO_SNDBUF/SO_RCVBUF asked for (the kernel doubles it)
BIG = 1 << 20


class Rec:
    """A protocol that records what its transport tells it."""

    def __init__(self):
        self.transport = None
        self.data = bytearray()
        self.eof = False
        self.lost = []
        self.paused = []      # the queue size at each pause_writing
        self.resumed = []     # ... and at each resume_writing
        self.handshakes = []
        self.in_callback = False

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.eof = True

    def connection_lost(self, text):
        self.lost.append(text)

    def pause_writing(self):
        self.paused.append(self.transport.write_buffer_size)

    def resume_writing(self):
        self.resumed.append(self.transport.write_buffer_size)

    def handshake_done(self, error):
        self.handshakes.append(error)


def transport(sock, st, side=IN, cls=Transport, **kw):
    rec = Rec()
    rec.transport = t = cls(sock, rec, st.q, st.block_base(0), side, **kw)
    return t, rec


def count(st, field):
    return st.q[st.block_base(0) + field]


# -- plain transports -----------------------------------------------------------------------------


def test_data_both_ways_and_counters(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    t.start()
    peer.sendall(b"ping")
    wait_until(lambda: rec.data == b"ping")
    t.write(b"pong")
    assert read_all(peer, 4) == b"pong"
    assert count(counters, S.IN_READ_CALLS) >= 1
    assert count(counters, S.IN_BYTES_READ) == 4
    assert count(counters, S.IN_WRITE_CALLS) == 1
    assert count(counters, S.IN_BYTES_WRITTEN) == 4
    assert count(counters, S.OUT_BYTES_WRITTEN) == 0      # the other side's counters
    t.close()
    assert t.closed and not rec.lost
    assert read_all(peer) == b""


def test_out_side_counts_on_the_out_counters(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters, side=OUT)
    t.write(b"abc")
    assert read_all(peer, 3) == b"abc"
    assert count(counters, S.OUT_BYTES_WRITTEN) == 3
    assert count(counters, S.IN_BYTES_WRITTEN) == 0
    t.abort()


def test_a_write_the_kernel_does_not_take_is_queued_and_sent_later(counters):
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    data = os.urandom(BIG)
    t.write(data)
    assert 0 < t.write_buffer_size < BIG          # part went now, the rest waits
    t.write(b"tail")                              # behind the queue, in order
    assert read_all(peer, BIG + 4) == data + b"tail"
    wait_until(lambda: t.write_buffer_size == 0)
    assert count(counters, S.IN_BYTES_WRITTEN) == BIG + 4
    assert count(counters, S.IN_WRITE_CALLS) > 2  # the write watcher sent the rest
    assert not rec.lost
    t.close()


def test_pause_writing_over_high_water_and_resume_under_low_water(counters, monkeypatch):
    monkeypatch.setattr(T, "HIGH_WATER", 32 * 1024)
    monkeypatch.setattr(T, "LOW_WATER", 8 * 1024)
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    chunk = b"x" * 8192
    sent = 0
    while not rec.paused:
        t.write(chunk)
        sent += len(chunk)
        assert sent < BIG, "never paused"
    assert rec.paused[0] > T.HIGH_WATER
    assert len(rec.paused) == 1 and not rec.resumed
    t.write(chunk)                                # still accepted, no second pause
    sent += len(chunk)
    assert len(rec.paused) == 1
    # the peer reads a little: not under LOW_WATER yet, so no resume
    got = len(peer.recv(4096))
    gevent.sleep(0.01)
    if t.write_buffer_size > T.LOW_WATER:
        assert not rec.resumed
    got += len(read_all(peer, sent - got))
    assert got == sent
    wait_until(lambda: rec.resumed)
    assert rec.resumed == [rec.resumed[0]] and rec.resumed[0] <= T.LOW_WATER
    t.close()


def test_write_eof_half_closes_and_the_other_way_stays_open(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    t.start()
    t.write(b"last words")
    t.write_eof()
    assert read_all(peer) == b"last words"        # then EOF
    peer.sendall(b"still listening")
    wait_until(lambda: rec.data == b"still listening")
    assert not t.closed and not rec.eof and not rec.lost
    peer.shutdown(socket.SHUT_WR)
    wait_until(lambda: rec.eof)
    assert not t.reading                          # reading stops at EOF
    t.close()


def test_write_eof_waits_for_the_queue(counters):
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    data = os.urandom(BIG)
    t.write(data)
    assert t.write_buffer_size
    t.write_eof()
    assert read_all(peer) == data                 # all of it, then EOF
    assert not t.closed
    t.close()


def test_peer_eof_is_eof_received(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    t.start()
    peer.sendall(b"bye")
    peer.shutdown(socket.SHUT_WR)
    wait_until(lambda: rec.eof)
    assert rec.data == b"bye" and not rec.lost and not t.closed
    t.write(b"answer after the client's EOF")      # the other way is still open
    t.close()
    assert read_all(peer) == b"answer after the client's EOF"


def test_close_flushes_then_closes(counters):
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    t.start()
    data = os.urandom(BIG)
    t.write(data)
    t.close()
    assert not t.closed and not t.reading         # closing: the queue goes first
    t.write(b"ignored after close")
    assert read_all(peer) == data                 # everything, then EOF
    wait_until(lambda: t.closed)
    assert not rec.lost                           # we closed it: no connection_lost


def test_close_gives_up_on_a_peer_that_does_not_read(counters, monkeypatch):
    monkeypatch.setattr(T, "CLOSE_TIMEOUT", 0.05)
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    t.write(os.urandom(BIG))
    t.close()
    wait_until(lambda: t.closed)
    assert len(read_all(peer)) < BIG              # dropped after CLOSE_TIMEOUT
    assert not rec.lost


def test_abort_drops_what_is_queued(counters):
    ours, peer = socketpair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    t.start()
    t.write(os.urandom(BIG))
    assert t.write_buffer_size
    t.abort()
    assert t.closed and not t.reading and t.write_buffer_size == 0
    assert len(read_all(peer)) < BIG
    gevent.sleep(0.01)
    assert not rec.lost


def test_connection_lost_when_the_peer_resets(counters):
    ours, peer = tcp_pair()
    t, rec = transport(ours, counters)
    t.start()
    peer.sendall(b"some")
    wait_until(lambda: rec.data == b"some")
    reset(peer)
    wait_until(lambda: rec.lost)
    assert t.closed
    assert rec.lost == ["Connection reset by peer"]
    assert count(counters, S.IN_READ_ERROR) == 1
    t.close()                                     # harmless once closed
    assert len(rec.lost) == 1


def test_connection_lost_inside_write_is_deferred(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    peer.close()
    t.write(b"into the void")                     # EPIPE inside write ...
    assert t.closed
    assert not rec.lost                           # ... is not reported from inside it
    t.write(b"more")                              # and later writes are dropped
    wait_until(lambda: rec.lost)
    assert len(rec.lost) == 1
    assert count(counters, S.IN_WRITE_ERROR) == 1


def test_connection_lost_from_a_queued_write_on_a_reset(counters):
    ours, peer = tcp_pair(sndbuf=SMALL, rcvbuf=SMALL)
    t, rec = transport(ours, counters)
    t.write(os.urandom(BIG))
    assert t.write_buffer_size
    peer.recv(1000)
    reset(peer)
    wait_until(lambda: rec.lost)
    assert t.closed
    assert count(counters, S.IN_WRITE_ERROR) + count(counters, S.IN_READ_ERROR) >= 1


def test_a_protocol_may_write_from_data_received_after_the_peer_left(counters):
    """A write failing inside data_received must not call connection_lost
    re-entrantly; the protocol still sees it once, after."""
    ours, peer = socketpair()
    order = []

    class Echo(Rec):
        def data_received(self, data):
            order.append("data")
            peer.close()
            self.transport.write(data)
            order.append("wrote")

        def connection_lost(self, text):
            order.append("lost")

    rec = Echo()
    t = rec.transport = Transport(ours, rec, counters.q, counters.block_base(0), IN)
    t.start()
    peer.sendall(b"x")
    wait_until(lambda: "lost" in order)
    assert order == ["data", "wrote", "lost"]


def test_pause_and_resume_reading(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    t.start()
    t.pause_reading()
    assert not t.reading
    peer.sendall(b"held")
    gevent.sleep(0.02)
    assert rec.data == b""
    t.resume_reading()
    wait_until(lambda: rec.data == b"held")
    t.close()


def test_detach_hands_the_socket_over(counters):
    ours, peer = socketpair()
    t, rec = transport(ours, counters)
    t.start()
    sock = t.detach()
    assert t.closed and sock is ours
    peer.sendall(b"for the new owner")
    gevent.sleep(0.01)
    assert rec.data == b""
    sock.setblocking(True)
    assert sock.recv(100) == b"for the new owner"
    sock.close()


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    untrusting.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
    return server, client, untrusting


def tls_pair(counters, server_ctx, client_ctx, pair=socketpair, **kw):
    a, peer = pair(**kw)
    b = socket.socket(peer.family, peer.type, fileno=peer.detach())
    s, srec = transport(a, counters, IN, TLSTransport, context=server_ctx, server_side=True)
    c, crec = transport(b, counters, OUT, TLSTransport, context=client_ctx, server_side=False,
                        server_hostname="localhost")
    return (s, srec), (c, crec)


def test_tls_data_both_ways(counters, tls):
    (s, srec), (c, crec) = tls_pair(counters, tls[0], tls[1])
    c.write(b"sent before the handshake")          # queued until it ends
    s.start()
    c.start()
    assert c.shaking
    wait_until(lambda: srec.handshakes and crec.handshakes)
    assert srec.handshakes == [None] and crec.handshakes == [None]
    assert not c.shaking and not s.shaking
    wait_until(lambda: srec.data == b"sent before the handshake")
    s.write(b"hello client")
    wait_until(lambda: crec.data == b"hello client")
    big = os.urandom(BIG)
    c.write(big)
    wait_until(lambda: len(srec.data) == len(b"sent before the handshake") + BIG)
    assert bytes(srec.data[-BIG:]) == big
    # ciphertext is counted, on each side's own counters
    assert count(counters, S.IN_BYTES_READ) > BIG
    assert count(counters, S.OUT_BYTES_WRITTEN) > BIG
    c.close()
    s.close()


def test_tls_close_sends_close_notify(counters, tls):
    (s, srec), (c, crec) = tls_pair(counters, tls[0], tls[1])
    s.start()
    c.start()
    wait_until(lambda: srec.handshakes and crec.handshakes)
    c.write(b"goodbye")
    c.close()
    wait_until(lambda: srec.eof)                  # close_notify, not a bare EOF
    assert srec.data == b"goodbye"
    assert not srec.lost
    assert not s.reading
    s.close()
    wait_until(lambda: c.closed and s.closed)
    assert not crec.lost


def test_tls_close_with_much_queued_still_ends_with_close_notify(counters, tls):
    (s, srec), (c, crec) = tls_pair(counters, tls[0], tls[1], sndbuf=SMALL)
    s.start()
    c.start()
    wait_until(lambda: srec.handshakes and crec.handshakes)
    big = os.urandom(BIG)
    c.write(big)
    c.close()
    wait_until(lambda: srec.eof)
    assert bytes(srec.data) == big
    s.close()


def test_tls_handshake_failure_reports_handshake_done_error(counters, tls):
    (s, srec), (c, crec) = tls_pair(counters, tls[0], tls[2])    # the client trusts another CA
    c.write(b"never sent")
    s.start()
    c.start()
    wait_until(lambda: crec.handshakes and srec.handshakes)
    assert isinstance(crec.handshakes[0], ssl.SSLCertVerificationError)
    assert isinstance(srec.handshakes[0], ssl.SSLError)       # the client's alert
    wait_until(lambda: c.closed and s.closed)
    assert not srec.data and not crec.data
    assert not srec.lost and not crec.lost


def test_tls_peer_closes_during_the_handshake(counters, tls):
    ours, peer = socketpair()
    s, srec = transport(ours, counters, IN, TLSTransport, context=tls[0], server_side=True)
    s.start()
    peer.sendall(b"\x16\x03\x01")                 # the start of a ClientHello, then gone
    peer.close()
    wait_until(lambda: srec.handshakes)
    assert isinstance(srec.handshakes[0], ConnectionResetError)
    assert s.closed


def test_tls_garbage_fails_the_handshake(counters, tls):
    ours, peer = socketpair()
    s, srec = transport(ours, counters, IN, TLSTransport, context=tls[0], server_side=True)
    s.start()
    peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: srec.handshakes)
    assert isinstance(srec.handshakes[0], ssl.SSLError)
    wait_until(lambda: s.closed)


def test_tls_over_tcp_with_a_reset(counters, tls):
    (s, srec), (c, crec) = tls_pair(counters, tls[0], tls[1], pair=tcp_pair)
    s.start()
    c.start()
    wait_until(lambda: srec.handshakes and crec.handshakes)
    c.write(b"abc")
    wait_until(lambda: srec.data == b"abc")
    reset(c.detach())
    wait_until(lambda: srec.lost)
    assert s.closed
