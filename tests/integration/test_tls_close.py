"""TLS connections end with our close_notify (RFC 8446 §6.1), on real sockets.

Every peer here reads with ``suppress_ragged_eofs=False``: a TCP close without
close_notify raises ``SSLEOFError`` ("unexpected eof while reading" with
OpenSSL 3) instead of reading as a clean end.  Certificates come from trustme
at test time.

    https in:       client ──https──▶ httptp ──http──▶ upstream
    https out:      client ──http──▶ httptp ──https──▶ TLS upstream (a thread here)
    teleports in:   raw TLS teleport peer ──▶ httptp, or TeleportServer in this process
    teleports out:  TeleportClient or httptp ──▶ raw TLS teleport peer (a thread here)
"""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import threading
import time

import pytest

trustme = pytest.importorskip("trustme")

from httptp.teleport import handshake  # noqa: E402
from httptp.teleport.framing import FrameReader, encode_request, encode_response  # noqa: E402
from httptp.teleport.handshake import Compress  # noqa: E402
from tests.helpers import HttpTp, Reply, Upstream, get, wait_until  # noqa: E402
# the fixtures certs, server_pair and upstream are test_tls's
from tests.integration.test_tls import (certs, no_traceback, server_pair,  # noqa: E402,F401
                                        tls_args, upstream)

pytestmark = pytest.mark.timeout(120)

CLEAN = "close_notify"
VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
            pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")]



def _in_greenlet(fn, timeout=20.0):
    import gevent
    g = gevent.spawn(fn)
    g.join(timeout)
    assert g.dead, f"{fn.__name__} did not finish in {timeout}s"
    return g.get()


def _poll(cond, timeout=10.0):
    import gevent
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        gevent.sleep(0.01)
    return cond()


# --------------------------------------------------------------------------- the helper

def test_close_tls_never_raises_nor_waits_past_its_bound(certs, server_pair):
    """A peer that never reads (our send buffer full), a call from the hub, a
    peer already gone: close_tls closes the socket every time, without an
    exception; its waits are bounded (this test would hang otherwise)."""
    import gevent
    import gevent.event
    import gevent.ssl
    from gevent import get_hub
    from gevent import socket as gsocket
    from httptp.io.sockio import close_tls

    sctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*server_pair)
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    peers = []

    def pair():
        """Our server-side TLS socket; its peer (``peers[-1]``) never reads."""
        ready = threading.Event()

        def peer():
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            t = certs.client_context().wrap_socket(s, server_hostname="localhost")
            peers.append(t)
            ready.set()
        threading.Thread(target=peer, daemon=True).start()
        sock, _ = listener.accept()
        ours = sctx.wrap_socket(sock, server_side=True)
        assert _poll(ready.is_set)
        return ours

    def stuck():
        """A connection whose peer never reads, our send buffer full."""
        ours = pair()
        ours.settimeout(0.0)
        while ours.send(b"x" * 65536):
            pass
        return ours

    def run():
        sock = stuck()                       # waits for room, up to its bound
        close_tls(sock, timeout=0.2)
        assert sock.fileno() == -1

        sock = stuck()                       # from a hub callback: does not wait at all
        done = gevent.event.Event()
        get_hub().loop.run_callback(lambda: (close_tls(sock, timeout=30), done.set()))
        assert done.wait(5) and sock.fileno() == -1

        gone = pair()                        # the peer reset the connection
        peer = peers[-1]
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()
        gevent.sleep(0.05)
        close_tls(gone)
        assert gone.fileno() == -1
        return True
    try:
        assert _in_greenlet(run)
    finally:
        listener.close()
        for t in peers:
            t.close()


# --------------------------------------------------------------------------- https in

def read_to_end(t) -> bytes:
    """Everything ``t`` (``suppress_ragged_eofs=False``) reads until the peer's
    close_notify; a TCP end without one raises SSLEOFError."""
    out = []
    while chunk := t.recv(65536):
        out.append(chunk)
    return b"".join(out)


def read_response(t) -> bytes:
    """One Content-Length response from ``t``, not reading past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = t.recv(1)
        assert chunk, data
        data += chunk
    length = int(data.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(data) - data.index(b"\r\n\r\n") - 4 < length:
        data += t.recv(length)
    return data


def client_context(certs, version=None) -> ssl.SSLContext:
    ctx = certs.client_context()
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def https_client(certs, port, version=None, session=None, ctx=None):
    ctx = ctx or client_context(certs, version)
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    return ctx.wrap_socket(s, server_hostname="localhost", session=session,
                           suppress_ragged_eofs=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_https_connection_close_ends_with_close_notify(certs, server_pair, upstream, version):
    """Connection: close: the whole response, then a clean EOF; whether the
    client then answers with its own close_notify or just closes, and on a
    resumed session too."""
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=1) as p:
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ctx = client_context(certs, version)
        t = https_client(certs, p.port, ctx=ctx)
        t.sendall(request)
        data = read_to_end(t)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nup"), data
        session = t.session
        t.unwrap()                    # our own close_notify back: the peer is already gone
        t.close()

        t = https_client(certs, p.port, session=session, ctx=ctx)
        assert t.session_reused
        t.sendall(request)
        assert read_to_end(t).endswith(b"\r\n\r\nup")
        t.close()                     # no close_notify of ours this time

        t = https_client(certs, p.port, ctx=ctx)     # and httptp still serves
        t.sendall(request)
        assert read_to_end(t).endswith(b"\r\n\r\nup")
        t.close()
    no_traceback(p)
    assert "stopped: 3 requests served" in p.output, p.output


def test_https_idle_timeout_ends_with_close_notify(certs, server_pair, upstream):
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", "-inIdleTimeout=500ms", workers=1) as p:
        t = https_client(certs, p.port)
        t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(t).endswith(b"\r\n\r\nup")
        assert read_to_end(t) == b""     # after the idle timeout: close_notify, then EOF
        t.close()
    no_traceback(p)


def test_https_drain_ends_idle_and_inflight_with_close_notify(certs, server_pair):
    slow = Upstream(handler=lambda m, path, h, b: Reply(body=b"slow", delay=1.0)
                    if path == b"/slow" else Reply(body=b"up"))
    try:
        with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                    f"-out={slow.addr}", workers=1) as p:
            idle = https_client(certs, p.port)
            idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(idle).endswith(b"\r\n\r\nup")
            busy = https_client(certs, p.port)
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(lambda: slow.requests == 2)
            p.signal(signal.SIGTERM)
            assert read_to_end(idle) == b""          # idle keep-alive: closed at once
            data = read_to_end(busy)                 # in flight: finished, Connection: close
            assert data.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in data
            assert data.endswith(b"\r\n\r\nslow")
            assert p.wait(15) == 0
        no_traceback(p)
    finally:
        slow.close()


def test_https_503_over_concurrency_ends_with_close_notify(certs, server_pair):
    slow = Upstream(handler=lambda m, p, h, b: Reply(delay=1.0))
    try:
        with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http", f"-out={slow.addr}",
                    "-concurrency=1", workers=1) as p:
            busy = https_client(certs, p.port)
            busy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(lambda: slow.requests == 1)
            t = https_client(certs, p.port)
            t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_to_end(t).startswith(b"HTTP/1.1 503 ")
            t.close()
            assert read_response(busy).startswith(b"HTTP/1.1 200 ")
            busy.close()
        no_traceback(p)
    finally:
        slow.close()


# --------------------------------------------------------------------------- https out

class TLSPeer:
    """A threaded TLS server that records how each connection ended
    (``endings``: CLEAN or the error).  ``serve(t)`` runs the protocol and
    returns when the peer (httptp) ended the connection."""

    def __init__(self, pair):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pair)
        self.endings: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[ssl.SSLSocket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c):
        try:
            c.settimeout(30)
            self.before_tls(c)
            t = self.ctx.wrap_socket(c, server_side=True, suppress_ragged_eofs=False)
        except (OSError, AssertionError):
            c.close()
            return
        self.conns.append(t)
        try:
            self.endings.append(self.serve(t))
        finally:
            t.close()

    def before_tls(self, c):
        """What the protocol says in plaintext first (nothing for https)."""

    def close(self):
        for s in (self.sock, *self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)     # wakes the threads blocked on it
            except OSError:
                pass
        self.sock.close()


class TLSHTTPUpstream(TLSPeer):
    """Answers every GET with 200 "up"; ends when httptp ends the connection.
    ``answer_close``: each answer says ``Connection: close`` and the upstream then
    waits for httptp to end the connection."""

    answer_close = False

    def serve(self, t):
        buf = b""
        answer = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                  + (b"Connection: close\r\n" if self.answer_close else b"") + b"\r\nup")
        try:
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    return CLEAN
                buf += chunk
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    t.sendall(answer)
        except (OSError, ValueError) as e:
            return repr(e)


@pytest.fixture
def tls_upstream(server_pair):
    up = TLSHTTPUpstream(server_pair)
    yield up
    up.close()


def test_https_out_pool_idle_timeout_sends_close_notify(certs, tls_upstream):
    with HttpTp("-outType=https", f"-out=localhost:{tls_upstream.port}",
                f"-outTLSCA={certs.ca_file}", "-outIdleTimeout=300ms", workers=1) as p:
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        assert get(c, "/")[0] == 200

        def expired_one_closed():
            # the pool drops an expired connection when the next request comes
            # (the poll's step is longer than -outIdleTimeout)
            assert get(c, "/")[0] == 200
            return tls_upstream.endings
        assert wait_until(expired_one_closed, step=0.5)
        assert tls_upstream.endings[0] == CLEAN
    no_traceback(p)


def test_https_out_connection_close_from_upstream_gets_close_notify(certs, tls_upstream):
    """The upstream answers ``Connection: close``: httptp's close of that
    connection is an orderly one."""
    tls_upstream.answer_close = True
    with HttpTp("-outType=https", f"-out=localhost:{tls_upstream.port}",
                f"-outTLSCA={certs.ca_file}", workers=1) as p:
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        assert get(c, "/")[0] == 200
        assert get(c, "/")[0] == 200
        assert wait_until(lambda: len(tls_upstream.endings) == 2)
        assert tls_upstream.endings == [CLEAN, CLEAN]
    no_traceback(p)


def test_https_out_shutdown_sends_close_notify(certs, tls_upstream):
    with HttpTp("-outType=https", f"-out=localhost:{tls_upstream.port}",
                f"-outTLSCA={certs.ca_file}", workers=1) as p:
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        assert get(c, "/")[0] == 200
        c.close()
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
    assert wait_until(lambda: tls_upstream.endings)
    assert tls_upstream.endings == [CLEAN]
    no_traceback(p)


# --------------------------------------------------------------------------- teleports

class TLSTeleportPeer(TLSPeer):
    """A teleports server: answers every request frame 200 "up" (codec none)."""

    def before_tls(self, c):
        codec, tls = handshake.decode(recv_exactly(c, handshake.HEADER_SIZE))
        assert tls
        c.sendall(handshake.encode(codec, True))

    def serve(self, t):
        reader = FrameReader("request", 65536)
        try:
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    return CLEAN
                for req_id, _, _ in reader.feed(chunk):
                    if req_id:
                        t.sendall(encode_response(req_id, 200, b"OK", [], b"up"))
        except (OSError, ValueError) as e:
            return repr(e)


def ending(t) -> str:
    """How the peer ended the connection: CLEAN, or the error instead."""
    try:
        read_to_end(t)
        return CLEAN
    except (OSError, ValueError) as e:
        return repr(e)


def recv_exactly(s, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "closed during the teleport handshake"
        data += chunk
    return data


def teleports_client(certs, port, version=None):
    """A raw teleport client over TLS (codec none): (TLS socket, frame reader)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(handshake.encode(Compress.NONE, True))
    codec, tls = handshake.decode(recv_exactly(s, handshake.HEADER_SIZE))
    assert tls and codec == Compress.NONE
    ctx = client_context(certs, version)
    t = ctx.wrap_socket(s, server_hostname="localhost", suppress_ragged_eofs=False)
    return t, FrameReader("response", 65536, lambda i: False)


def teleport_get(t, reader, req_id: int):
    t.sendall(encode_request(req_id, b"GET", b"/", [(b"Host", b"x")], b""))
    frames = []
    while not frames:
        chunk = t.recv(65536)
        assert chunk
        frames = reader.feed(chunk)
    (rid, head, body), = frames
    return rid, head.status, body


@pytest.mark.parametrize("version", VERSIONS)
def test_teleports_in_drain_sends_close_notify(certs, server_pair, upstream, version):
    with HttpTp("-inType=teleports", *tls_args(server_pair), "-inCompress=none",
                "-outType=http", f"-out={upstream.addr}", workers=1) as p:
        t, reader = teleports_client(certs, p.port, version)
        assert teleport_get(t, reader, 1) == (1, 200, b"up")
        p.signal(signal.SIGTERM)
        assert read_to_end(t) == b""
        t.close()
        assert p.wait(15) == 0
    no_traceback(p)


def test_teleports_in_client_close_notify_is_answered_in_kind(certs, server_pair, upstream):
    """The client ends the connection with its close_notify (``unwrap``, which
    waits for ours): httptp answers with its own, not a bare TCP close."""
    with HttpTp("-inType=teleports", *tls_args(server_pair), "-inCompress=none",
                "-outType=http", f"-out={upstream.addr}", workers=1) as p:
        t, reader = teleports_client(certs, p.port)
        assert teleport_get(t, reader, 1) == (1, 200, b"up")
        t.unwrap().close()                  # raises SSLEOFError without ours
        t, reader = teleports_client(certs, p.port)
        assert teleport_get(t, reader, 2) == (2, 200, b"up")   # still serving
        t.close()
    no_traceback(p)


@pytest.fixture
def tls_teleport_peer(server_pair):
    peer = TLSTeleportPeer(server_pair)
    yield peer
    peer.close()


def test_teleports_out_shutdown_sends_close_notify(certs, tls_teleport_peer):
    with HttpTp("-outType=teleports", f"-out=localhost:{tls_teleport_peer.port}",
                f"-outTLSCA={certs.ca_file}", "-outCompress=none", workers=1) as p:
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        assert get(c, "/")[:3:2] == (200, b"up")
        c.close()
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
    assert wait_until(lambda: tls_teleport_peer.endings)
    assert tls_teleport_peer.endings == [CLEAN]
    no_traceback(p)


# In this process: the read timeouts the httptp command does not expose.

@pytest.mark.parametrize("how", ["idle", "close"])
def test_teleports_client_link_end_sends_close_notify(certs, tls_teleport_peer, how):
    from httptp.io.teleport_client import TeleportClient
    client = TeleportClient(f"127.0.0.1:{tls_teleport_peer.port}", compress=Compress.NONE,
                            tls_context=certs.client_context(), server_hostname="localhost",
                            read_timeout=0.3 if how == "idle" else 30.0)

    def run():
        r = client.request(b"GET", b"/", [(b"Host", b"x")], b"", time.monotonic() + 10)
        assert (r.head.status, r.body) == (200, b"up")
        if how == "close":
            client.close()
        return _poll(lambda: tls_teleport_peer.endings)
    try:
        assert _in_greenlet(run)
    finally:
        client.close()
    assert tls_teleport_peer.endings == [CLEAN]


def test_teleports_server_idle_sends_close_notify(certs, server_pair):
    import gevent
    from gevent import socket as gsocket
    from httptp import tls
    from httptp.io.teleport_server import Answer, TeleportServer
    server_tls = tls.ServerTLS([server_pair])
    server_tls.for_worker()
    srv = TeleportServer(lambda head, body, peer: Answer(200, b"OK", [], b"up"),
                         compress=Compress.NONE, read_timeout=0.3, tls=server_tls)
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def accept():
        sock, addr = listener.accept()
        srv.handle(sock, f"{addr[0]}:{addr[1]}")

    def client():
        # a thread: blocking stdlib sockets while the hub serves in this one
        result = []

        def talk():
            t, reader = teleports_client(certs, port)
            result.append(teleport_get(t, reader, 7))
            result.append(ending(t))
            t.close()
        th = threading.Thread(target=talk, daemon=True)
        th.start()
        assert _poll(lambda: not th.is_alive(), timeout=15)
        return result
    acceptor = gevent.spawn(accept)
    try:
        assert _in_greenlet(client) == [(7, 200, b"up"), CLEAN]
        acceptor.join(5)
        assert acceptor.dead and acceptor.successful()
    finally:
        acceptor.kill()
        listener.close()
