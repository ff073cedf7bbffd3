"""Keep-alive connection pools for http and unix upstreams.

One ``HTTPUpstream`` per ``-out`` address per worker (https: each new
connection does its TLS handshake right after the TCP connect, within the
dial timeout; a failed handshake counts as ``outDialError``).  An exchange takes an idle
pooled connection (or dials a new one), writes the whole request, and reads the
whole response through the sans-IO ``ResponseParser``.  A response over
``max_header_size`` or ``max_body_size`` (-outMaxHeaderSize, -outMaxBodySize;
checked on the announced Content-Length first, then on the bytes as they come)
raises ``ResponseTooLarge``, counted in ``outResponseTooLarge``; the connection
is closed, so at most the limit plus one read is ever held.  The caller (the
pipeline) bounds the exchange with ``-outTimeout``; any exception that escapes an
exchange, the timeout included, closes the connection instead of pooling it,
so a half-read response can never be read by the next request.

Counters go straight into this worker's shared-memory block.
"""

from __future__ import annotations

import select
import socket as _stdsocket
import ssl
import time

from gevent import get_hub, socket
from gevent.lock import BoundedSemaphore

from httptp import stats as S
from httptp.errors import GatewayTimeout, ProtocolError, ResponseTooLarge, UpstreamError
from httptp.http import writer
from httptp.http.events import Data, EndOfMessage, ResponseHead
from httptp.io.sockio import close_tls, is_plain, recv_after_wait, send_all
from httptp.tls import error_text as tls_error_text

_POLLIN_OR_HUP = select.POLLIN | select.POLLHUP | select.POLLERR
_RECV_SIZE = 65536
_DIAL_TIMEOUT = 3.0


class Response:
    """A complete upstream response: head and the whole body."""

    __slots__ = ("head", "body", "upstream", "upstream_time")

    def __init__(self, head: ResponseHead, body: bytes):
        self.head = head
        self.body = body
        self.upstream = ""           # set by the pipeline: who answered, and how fast
        self.upstream_time = 0.0


class _Conn:
    """One upstream connection.  While it is idle in the pool a read watcher
    (the hub's epoll) marks it ``stirred`` if the upstream writes or closes,
    as nginx's keepalive cache does: no syscall on the reuse path."""

    __slots__ = ("sock", "parser", "plain", "idle_since", "stirred", "_watch")

    def __init__(self, sock, parser):
        self.sock = sock
        self.parser = parser
        self.plain = is_plain(sock)
        self.idle_since = 0.0
        self.stirred = False
        self._watch = get_hub().loop.io(sock.fileno(), 1)

    def idle(self, now: float) -> None:
        self.idle_since = now
        self.stirred = False
        self._watch.start(self._stir)

    def busy(self) -> None:
        self._watch.stop()

    def _stir(self) -> None:
        self.stirred = True
        self._watch.stop()

    def close(self, orderly: bool = False) -> None:
        """``orderly`` (the pool lets it go: idle too long, shutting down): on
        TLS our close_notify goes first."""
        self._watch.close()
        if orderly and not self.plain:
            close_tls(self.sock)
        else:
            self.sock.close()


class HTTPUpstream:
    """A pool of keep-alive connections to one upstream address."""

    def __init__(self, address, *, parser_module, max_header_size: int, max_conns: int,
                 idle_timeout: float, stats, block: int, tls_context=None,
                 server_hostname: str | None = None, max_body_size: int = 64 << 20):
        self.address = address
        self._tls = tls_context            # a gevent (cooperative) SSLContext, or None
        self._server_hostname = server_hostname
        self.name = str(address)
        # the Host of a request that came without one (HTTP/1.0)
        self.host = (self.name if address.kind == "tcp" else "localhost").encode()
        self._parser_module = parser_module
        self._max_header_size = max_header_size
        self._max_body_size = max_body_size
        self._idle: list[_Conn] = []
        self._slots = BoundedSemaphore(max_conns)
        self._idle_timeout = idle_timeout
        self._q = stats.q
        self._base = stats.block_base(block)

    # -- pool -------------------------------------------------------------------

    def _dial(self, deadline: float) -> _Conn:
        """A new connection, dialled within _DIAL_TIMEOUT and the exchange's deadline."""
        timeout = min(_DIAL_TIMEOUT, max(0.001, deadline - time.monotonic()))
        q, b = self._q, self._base
        addr = self.address
        try:
            if addr.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(addr.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            q[b + S.OUT_DIAL_ERROR] += 1
            raise UpstreamError(f"cannot connect to {self.name}: {_oserror_text(e)}") from None
        if self._tls is not None:
            try:
                # the handshake runs within the socket's (dial) timeout
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_hostname)
            except (OSError, ValueError) as e:
                sock.close()
                q[b + S.OUT_DIAL_ERROR] += 1
                raise UpstreamError(f"TLS handshake with {self.name} failed: "
                                    f"{tls_error_text(e)}") from None
        sock.settimeout(None)
        q[b + S.OUT_DIAL_SUCCESS] += 1
        q[b + S.OUT_CONNS] += 1
        return _Conn(sock, self._parser_module.ResponseParser(self._max_header_size))

    def _take(self, deadline: float) -> tuple[_Conn, bool]:
        """An idle connection that is still open, or a new one.  Returns (conn, reused)."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            conn.busy()
            # An idle upstream connection should have nothing to read.  If it
            # became readable the server closed it (EOF) or sent junk: drop it
            # rather than lose the request on it.
            if now - conn.idle_since > self._idle_timeout:
                self._close(conn, orderly=True)
                continue
            if conn.stirred and _stale(conn.sock):
                self._close(conn)
                continue
            return conn, True
        return self._dial(deadline), False

    def _put(self, conn: _Conn) -> None:
        conn.idle(time.monotonic())
        self._idle.append(conn)

    def _close(self, conn: _Conn, orderly: bool = False) -> None:
        try:
            conn.close(orderly)
        finally:
            self._q[self._base + S.OUT_CONNS] -= 1

    def close(self) -> None:
        while self._idle:
            self._close(self._idle.pop(), orderly=True)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    # -- exchange -------------------------------------------------------------------

    def exchange(self, method: bytes, target: bytes, headers: list, body: bytes, deadline: float,
                 retry_stale: bool) -> Response:
        """Send one request (``headers`` already without hop-by-hop and framing
        headers) and return the complete response.

        ``retry_stale``: when a *reused* connection fails before any response
        byte arrives, try once more on a fresh connection (a keep-alive race
        with the upstream closing it).  Raises UpstreamError; the caller's
        -outTimeout (a Deadline) may interrupt at any point.
        """
        request = writer.request_head(method, target, headers, len(body))
        if body:
            request += body
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._slots.acquire(timeout=remaining):
            raise GatewayTimeout("no free upstream connection before the deadline")
        try:
            conn, reused = self._take(deadline)
            try:
                return self._exchange_on(conn, request, method)
            except UpstreamError as e:
                if not (reused and retry_stale and e.sent_nothing_back):
                    raise
            conn = self._dial(deadline)
            return self._exchange_on(conn, request, method)
        finally:
            self._slots.release()

    def _exchange_on(self, conn: _Conn, request: bytes, method: bytes) -> Response:
        q, b = self._q, self._base
        sock = conn.sock
        got = 0
        ok = False
        done = False            # a whole response came: a close now is an orderly one
        try:
            try:
                send_all(sock, request)
            except OSError as e:
                q[b + S.OUT_WRITE_ERROR] += 1
                raise UpstreamError(f"write to {self.name} failed: {_oserror_text(e)}") from None
            q[b + S.OUT_WRITE_CALLS] += 1
            q[b + S.OUT_BYTES_WRITTEN] += len(request)
            parser = conn.parser
            parser.start(method)
            head = None
            chunks = []
            size = 0
            max_body = self._max_body_size
            wait_first = conn.plain     # the upstream has not answered yet: wait, then read
            while True:
                try:
                    if wait_first:
                        wait_first = False
                        data = recv_after_wait(sock, _RECV_SIZE)
                    else:
                        data = sock.recv(_RECV_SIZE)
                except OSError as e:
                    q[b + S.OUT_READ_ERROR] += 1
                    raise UpstreamError(f"read from {self.name} failed: {_oserror_text(e)}",
                                        sent_nothing_back=got == 0) from None
                q[b + S.OUT_READ_CALLS] += 1
                n = len(data)
                got += n
                q[b + S.OUT_BYTES_READ] += n
                try:
                    events = parser.feed(data)
                except ProtocolError as e:
                    if e.status == 431:
                        q[b + S.OUT_RESPONSE_TOO_LARGE] += 1
                        raise ResponseTooLarge(
                            f"response header block over the limit of {self._max_header_size} "
                            "bytes (-outMaxHeaderSize)") from None
                    raise UpstreamError(f"bad response from {self.name}: {e.detail or e}",
                                        sent_nothing_back=got == 0) from None
                for ev in events:
                    cls = ev.__class__
                    if cls is Data:
                        size += len(ev.data)
                        if size > max_body:
                            self._too_large(None)
                        chunks.append(ev.data)
                    elif cls is ResponseHead:
                        head = ev
                        announced = ev.content_length
                        if announced is not None and announced > max_body and \
                                method != b"HEAD" and ev.status >= 200 and \
                                ev.status not in (204, 304):
                            self._too_large(announced)
                    elif cls is EndOfMessage:
                        ok = head is not None and head.keep_alive
                        done = True
                        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                        return Response(head, body)
                if not n:  # EOF without a complete response: the parser raises above
                    raise UpstreamError(f"{self.name} closed the connection",
                                        sent_nothing_back=got == 0)
        finally:
            if ok:
                self._put(conn)
            else:
                self._close(conn, orderly=done)   # Connection: close: close_notify first

    def _too_large(self, announced: int | None):
        """Count and raise: the body announced ``announced`` bytes (its
        Content-Length), or grew over the limit as it came (None)."""
        self._q[self._base + S.OUT_RESPONSE_TOO_LARGE] += 1
        size = "" if announced is None else f"of {announced} bytes "
        raise ResponseTooLarge(f"response body {size}is over the limit of "
                               f"{self._max_body_size} bytes (-outMaxBodySize)")


def readable(sock) -> bool:
    """True when ``sock`` has bytes or EOF waiting; never blocks."""
    p = select.poll()
    p.register(sock.fileno(), _POLLIN_OR_HUP)
    return bool(p.poll(0))


def _stale(sock) -> bool:
    """An idle pooled connection that the upstream closed or wrote junk on.

    On TLS a readable socket may hold only TLS records that carry no data
    (TLS 1.3 session tickets): read without waiting to tell them apart."""
    if not readable(sock):
        return False
    if not hasattr(sock, "pending"):       # plain socket
        return True
    sock.settimeout(0.0)
    try:
        sock.recv(1)                       # data or EOF: stale either way
        return True
    except ssl.SSLWantReadError:
        return False                       # only non-data records were read
    except OSError:
        return True
    finally:
        sock.settimeout(None)


def _oserror_text(e: OSError) -> str:
    if isinstance(e, (_stdsocket.timeout, TimeoutError)):
        return "timed out"
    return e.strerror or str(e)
