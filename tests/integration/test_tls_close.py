"""TLS connections end with our close_notify (RFC 8446 §6.1), on real sockets.

Every peer here reads with ``suppress_ragged_eofs=False``: a TCP close without
close_notify raises ``SSLEOFError`` ("unexpected eof while reading" with
OpenSSL 3) instead of reading as a clean end.  Certificates come from trustme
at test time.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

trustme = pytest.importorskip("trustme")

from tests.integration.test_tls import Certs  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls-close"))


@pytest.fixture(scope="module")
def server_pair(certs):
    return certs.issue("server", "localhost", "127.0.0.1")


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
