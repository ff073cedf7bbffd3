"""Helpers for the in-process data-plane tests: the hub's loop runs the
transports and protocols, and the test greenlet plays the peers with gevent
sockets (h11's ConnectionPair style, with real sockets and a real loop)."""

from __future__ import annotations

import socket
import struct

import gevent
import gevent.socket as gsocket
import pytest

from httptp.stats import Stats

WAIT = 5.0          # the longest any test waits for something that should happen


def wait_until(predicate, timeout: float = WAIT, what: str = "") -> None:
    """Let the loop run until ``predicate()`` is true (fail after ``timeout``)."""
    with gevent.Timeout(timeout, AssertionError(f"timed out waiting for {what or predicate}")):
        while not predicate():
            gevent.sleep(0.002)


def green(sock: socket.socket) -> gsocket.socket:
    """A gevent socket on ``sock``'s descriptor (the test greenlet's end)."""
    g = gsocket.socket(sock.family, sock.type, fileno=sock.detach())
    g.settimeout(WAIT)
    return g


def socketpair(sndbuf: int | None = None, rcvbuf: int | None = None):
    """(ours, peer): ``ours`` a plain socket for a transport, ``peer`` a gevent one.
    ``sndbuf`` shrinks our send buffer, ``rcvbuf`` the peer's receive buffer."""
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return a, green(b)


def tcp_pair(sndbuf: int | None = None, rcvbuf: int | None = None):
    """The same over a real loopback listener: (ours accepted, peer connected)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    peer = socket.socket()
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.connect(lsock.getsockname())
    ours, _ = lsock.accept()
    lsock.close()
    if sndbuf:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return ours, green(peer)


def reset(sock) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_all(sock, n: int | None = None) -> bytes:
    """Read ``n`` bytes, or until EOF (None); a reset counts as EOF."""
    out = bytearray()
    while n is None or len(out) < n:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


@pytest.fixture
def hub_errors():
    """Fail the test if any loop callback raised (the hub would only print it)."""
    hub = gevent.get_hub()
    errors = []
    orig = hub.handle_error

    def handle_error(context, type_, value, tb):
        if type_ is not None and not issubclass(type_, gevent.GreenletExit):
            errors.append((context, type_, value))
        return orig(context, type_, value, tb)

    hub.handle_error = handle_error
    yield errors
    del hub.handle_error
    assert not errors, f"a callback on the loop raised: {errors}"


@pytest.fixture
def counters():
    """A real stats block: (q, base) for the transports' counters."""
    st = Stats.create(2, 8)
    yield st
    # not unmapped: a callback that runs after the test may still count
