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

``close_tls``: how every orderly end of a TLS connection closes it, both
ways (https and teleports, listener and upstream side): our close_notify,
then the close (RFC 8446 §6.1; without it OpenSSL 3 peers report "unexpected
eof while reading").  One ``SSL_shutdown`` that sends the alert and does not
wait for the peer's, as nginx does for HTTP (``no_wait_shutdown``): waiting
would hold every idle keep-alive connection of a client that never answers
(most HTTP clients just close) for the whole bound, and keep a draining
worker alive that long.  The only wait is for room in the send buffer when
the peer does not read, bounded by ``TLS_CLOSE_TIMEOUT``.  Error paths (a
failed handshake, a reset, a read or write error) close without it: the TLS
state may be broken, and a write may be half done ("bad write retry").
"""

from __future__ import annotations

import ssl
import time

from gevent import get_hub
from gevent import socket as _gsocket

_GSOCKET = _gsocket.socket
TLS_CLOSE_TIMEOUT = 1.0      # seconds a peer that does not read can hold our close_notify


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


def close_tls(sock, timeout: float = TLS_CLOSE_TIMEOUT) -> None:
    """Send our close_notify on the gevent SSLSocket ``sock``, then close it.

    A plain socket (a TLS handshake that never happened) is just closed.
    Waits (this greenlet only) at most ``timeout`` seconds for the kernel to
    take the alert; called in the hub it does not wait at all.  Never raises
    an Exception: a peer gone, EOF, an SSLError, a timeout only mean the alert
    did not go out, and the socket is closed anyway."""
    try:
        if sock.__class__ is not _GSOCKET:
            _send_close_notify(sock, timeout)
    except Exception:
        # OSError (SSLError, resets, timeouts), ValueError (no TLS left on it),
        # gevent's BlockingSwitchOutError (in the hub) or ConcurrentObjectUseError
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _send_close_notify(sock, timeout: float) -> None:
    # Non-blocking, unwrap() is one SSL_shutdown that sends our alert, then one
    # read attempt for the peer's (OpenSSL's second call), which is not waited for.
    deadline = time.monotonic() + timeout
    sock.settimeout(0.0)
    while True:
        try:
            sock.unwrap()                  # the peer's close_notify was already there
            return
        except ssl.SSLWantReadError:
            return                         # ours is sent; theirs is not waited for
        except ssl.SSLWantWriteError:      # no room: the peer does not read
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _gsocket.wait_write(sock.fileno(), left)   # raises socket.timeout


def readable(sock) -> bool:
    """True when ``sock`` has bytes or EOF waiting; never blocks."""
    import select
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))
