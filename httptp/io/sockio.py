"""Socket helpers for the hot path (gevent sockets, plain or TLS).

``send_all``: gevent's ``sendall`` asks the kernel for ``SO_SNDBUF`` on every
call (a ``getsockopt`` syscall per write, to size its chunks for PyPy).  Our
writes are one joined buffer that the kernel almost always takes whole, so we
try one ``send`` first (on a plain socket the non-blocking socket's own, which
skips ~0.3 us of gevent wrapper) and only hand what is left to gevent's
``sendall`` (which waits for the socket to drain, under the socket's timeout).

``recv_after_wait``: gevent's ``recv`` first tries the syscall and, when
nothing is there (EAGAIN, raised and caught as an exception), parks the
greenlet on the socket's read watcher.  Where we know the peer has not
answered yet — the upstream right after we sent it a request, a keep-alive
client right after we sent it a response — that first try is a wasted syscall
and exception on nearly every request.  This waits first, then reads once.
It needs a plain gevent socket: a TLS socket may hold decrypted bytes that
the kernel no longer reports as readable (``is_plain`` tells).
"""

from __future__ import annotations

from gevent import get_hub
from gevent import socket as _gsocket

_GSOCKET = _gsocket.socket


def send_all(sock, data) -> None:
    """Write all of ``data`` (bytes-like) to the gevent socket ``sock``."""
    if not data:
        return
    if sock.__class__ is _GSOCKET:      # plain: the non-blocking socket itself
        try:
            n = sock._sock.send(data)
        except BlockingIOError:
            n = 0
    else:
        n = sock.send(data)
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def is_plain(sock) -> bool:
    """True for a plain (not TLS) gevent socket, which ``recv_after_wait`` accepts."""
    return sock.__class__ is _GSOCKET


def recv_after_wait(sock, size: int, hub=None) -> bytes:
    """Wait until the plain gevent socket ``sock`` is readable, then ``recv``.

    No timeout of its own (the caller's Deadline or gevent.Timeout bounds it); closing
    the socket from another greenlet ends the wait with an OSError, as for
    gevent's ``recv``."""
    (hub or get_hub()).wait(sock._read_event)
    try:
        return sock._sock.recv(size)
    except BlockingIOError:          # woken but nothing to read after all
        return sock.recv(size)
