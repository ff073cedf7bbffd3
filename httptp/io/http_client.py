"""Keep-alive connection pools for http, https and unix upstreams (hot path).

Theory of operation
-------------------
One ``HTTPUpstream`` per ``-out`` address per worker holds idle connections
and a count of busy ones (``-concurrency``'s share: ``max_conns``).  An
exchange (``httptp.io.pipeline.Exchange``) asks for a connection with
``acquire``; the pool calls back ``got_conn(conn, reused)`` once it has one,
taking an idle connection or dialling a new one (non-blocking connect, then
the TLS handshake for https, within ``DIAL_TIMEOUT``), or ``conn_failed``.
Over the limit the exchange waits in a queue; its ``-outTimeout`` timer takes
it out (``cancel``).

``UpstreamConn`` is the protocol on one connection (``httptp.io.transport``):
it writes the request the exchange gives it, feeds what comes back to the
sans-IO ``ResponseParser`` and hands the events to the exchange as they come:
``response_whole(head, body)`` when a whole response came in one read (nearly
always: one write to the client, with a Content-Length), else
``response_head``, ``response_data``... ``response_end``.  A failure is
``upstream_failed(UpstreamError)``; ``sent_nothing_back`` tells the exchange
whether an idempotent request may go again.

An idle pooled connection keeps reading: any byte or EOF from the upstream
then closes it at once (it is stale), so the reuse path costs no syscall, as
nginx's keepalive cache.  Any failure, and any response that ended early or
was not keep-alive, closes the connection instead of pooling it, so a
half-read response can never be read by the next request.

An upgrade request (WebSocket) whose answer is ``101`` turns the connection
into a tunnel: ``upgraded(head, rest)``, then raw bytes both ways
(``tunnel_data``/``tunnel_eof``) until either side closes.
"""

from __future__ import annotations

import ipaddress
import os
import socket as _socket
import time
from collections import deque

import gevent
from gevent import get_hub

from httptp import stats as S
from httptp.errors import ProtocolError, ResponseTooLarge, UpstreamError
from httptp.http.events import Data, EndOfMessage, ResponseHead
from httptp.io.transport import (IN_PROGRESS, OUT, TLSTransport, Transport, connect,
                                 os_error_text)

DIAL_TIMEOUT = 3.0


class UpstreamConn:
    """The protocol of one upstream connection (see the module doc)."""

    __slots__ = ("pool", "transport", "parser", "exchange", "idle_since", "got", "_upgrade",
                 "_buf", "tunnel", "live", "_head", "__weakref__")

    def __init__(self, pool: HTTPUpstream, parser):
        self.pool = pool
        self.transport = None
        self.parser = parser
        self.exchange = None
        self.idle_since = 0.0
        self.got = 0
        self._upgrade = False
        self._buf = b""
        self.tunnel = False
        self.live = False             # counted in outConns
        self._head = None

    # -- the exchange's side ---------------------------------------------------------

    def send(self, exchange, method: bytes, data: bytes, upgrade: bool = False) -> None:
        """Start a request: ``data`` is its head and whatever body is ready."""
        self.exchange = exchange
        self.got = 0
        self._upgrade = upgrade
        self.parser.start(method)
        self.transport.write(data)

    def write(self, data) -> None:
        self.transport.write(data)

    # -- transport callbacks ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.pool.discard(self)           # an idle connection stirred: stale
            return
        self.got += len(data)
        if self.tunnel:
            ex.tunnel_data(data)
            return
        if self._upgrade:
            data = self._maybe_101(data)
            if data is None:
                return
        try:
            events = self.parser.feed(data)
        except ProtocolError as e:
            self._parse_failed(e)
            return
        if events:
            self._events(events)

    def eof_received(self) -> None:
        ex = self.exchange
        if ex is None:
            self.pool.discard(self)
            return
        if self.tunnel:
            ex.tunnel_eof()
            return
        try:
            events = self.parser.feed(b"")      # ends a read-until-close body
        except ProtocolError:
            self._fail(UpstreamError(f"{self.pool.name} closed the connection",
                                     sent_nothing_back=self.got == 0))
            return
        self._events(events)
        if self.exchange is not None:           # cannot happen with a sane parser
            self._fail(UpstreamError(f"{self.pool.name} closed the connection",
                                     sent_nothing_back=self.got == 0))

    def connection_lost(self, text: str) -> None:
        ex = self.exchange
        if ex is None:
            self.pool.discard(self)
            return
        if self.tunnel:
            ex.tunnel_lost()
            return
        self._fail(UpstreamError(f"connection to {self.pool.name} failed: {text}",
                                 sent_nothing_back=self.got == 0))

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(False)

    # -- parsing ------------------------------------------------------------------------

    def _events(self, events: list) -> None:
        ex = self.exchange
        first = events[0]
        if first.__class__ is ResponseHead and events[-1].__class__ is EndOfMessage:
            # the whole response in one read: one write to the client
            if len(events) == 2:
                body = b""
            elif len(events) == 3:
                body = events[1].data
            else:
                body = b"".join(ev.data for ev in events[1:-1])
            self.exchange = None            # _finish, inline: this is every small response
            self.pool.done(self, first.keep_alive, orderly=True)
            ex.response_whole(first, body)
            return
        for ev in events:
            cls = ev.__class__
            if cls is Data:
                ex.response_data(ev.data)
            elif cls is ResponseHead:
                self._head = ev
                ex.response_head(ev)
            else:
                self._finish(self._head)
                ex.response_end()
                return
            if self.exchange is not ex:      # the exchange gave up (a limit, the client left)
                return

    def _finish(self, head: ResponseHead) -> None:
        """The response is complete: back to the pool, or closed."""
        self.exchange = None
        self._head = None
        self.pool.done(self, head is not None and head.keep_alive, orderly=True)

    def _parse_failed(self, e: ProtocolError) -> None:
        if e.status == 431:
            self.pool.count(S.OUT_RESPONSE_TOO_LARGE)
            self._fail(ResponseTooLarge(
                f"response header block over the limit of {self.pool.max_header_size} "
                "bytes (-outMaxHeaderSize)"))
            return
        self._fail(UpstreamError(f"bad response from {self.pool.name}: {e.detail or e}",
                                 sent_nothing_back=self.got == 0))

    def _fail(self, err: UpstreamError) -> None:
        ex = self.exchange
        self.exchange = None
        self.pool.done(self, False)
        if ex is not None:
            ex.upstream_failed(err)

    def _maybe_101(self, data: bytes):
        """An upgrade request's answer: a 101 head makes a tunnel; anything else
        is parsed as usual.  Returns the bytes to parse, or None."""
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.pool.max_header_size:
                self._upgrade = False
                self._buf = b""
                return buf                     # the parser refuses it (431)
            self._buf = buf
            return None
        self._upgrade = False
        self._buf = b""
        head = parse_101(buf[:end + 2])
        if head is None:
            return buf
        self.tunnel = True
        self.exchange.upgraded(head, buf[end + 4:])
        return None

    # -- the pool's side ----------------------------------------------------------------

    def close(self, orderly: bool = False) -> None:
        t = self.transport
        if t is not None and not t.closed:
            if orderly:
                t.close()
            else:
                t.abort()


def parse_101(raw: bytes) -> ResponseHead | None:
    """A ``101 Switching Protocols`` head (``raw`` ends with its last CRLF), or None."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or parts[1] != b"101":
        return None
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip(b" \t"):
            return None
        headers.append((name, value.strip(b" \t")))
    return ResponseHead(101, parts[2] if len(parts) > 2 else b"", parts[0][5:], headers,
                        False, None, False)


class _Dial:
    """A non-blocking connect (and TLS handshake) for one exchange."""

    __slots__ = ("pool", "exchange", "sock", "watcher", "timer", "conn", "done")

    def __init__(self, pool: HTTPUpstream, exchange):
        self.pool = pool
        self.exchange = exchange
        self.sock = None
        self.watcher = None
        self.conn = None
        self.done = False
        self.timer = get_hub().loop.timer(DIAL_TIMEOUT)
        self.timer.start(self._timed_out)

    def connect(self, family, sockaddr) -> None:
        try:
            sock, err = connect(family, sockaddr)
        except OSError as e:
            self.failed(os_error_text(e))
            return
        self.sock = sock
        if err == 0:
            self._connected()
        elif err in IN_PROGRESS:
            self.watcher = get_hub().loop.io(sock.fileno(), 2)
            self.watcher.start(self._writable)
        else:
            self.failed(os.strerror(err))

    def _writable(self) -> None:
        self.watcher.stop()
        self.watcher.close()
        self.watcher = None
        if self.done:
            return
        err = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            self.failed(os.strerror(err))
        else:
            self._connected()

    def _connected(self) -> None:
        pool = self.pool
        conn = self.conn = UpstreamConn(pool, pool.new_parser())
        if pool.tls is None:
            conn.transport = Transport(self.sock, conn, pool.q, pool.base, OUT)
            conn.transport.write_timeout = pool.write_timeout
            self.succeeded()
            return
        conn.transport = TLSTransport(self.sock, self, pool.q, pool.base, OUT, pool.tls,
                                      server_side=False, server_hostname=pool.server_hostname)
        conn.transport.write_timeout = pool.write_timeout
        conn.transport.start()

    # the protocol of the TLS transport while it shakes hands
    def handshake_done(self, error) -> None:
        if error is not None:
            from httptp.tls import error_text
            self.failed(f"TLS handshake with {self.pool.name} failed: {error_text(error)}",
                        prefix=False)
            return
        self.conn.transport.protocol = self.conn
        self.succeeded()

    def data_received(self, data) -> None:      # not before the handshake ends
        pass

    def eof_received(self) -> None:
        self.failed(f"TLS handshake with {self.pool.name} failed: connection closed",
                    prefix=False)

    def connection_lost(self, text: str) -> None:
        self.failed(f"TLS handshake with {self.pool.name} failed: {text}", prefix=False)

    def pause_writing(self) -> None:
        pass

    resume_writing = pause_writing

    def _timed_out(self) -> None:
        self.failed("timed out")

    def _end(self) -> bool:
        if self.done:
            return False
        self.done = True
        self.timer.stop()
        self.timer.close()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None
        return True

    def succeeded(self) -> None:
        if not self._end():
            return
        pool = self.pool
        pool.count(S.OUT_DIAL_SUCCESS)
        pool.q[pool.base + S.OUT_CONNS] += 1
        conn = self.conn
        conn.live = True
        conn.transport.start()
        ex, self.exchange = self.exchange, None
        if ex is None:           # the exchange gave up meanwhile: keep the connection
            pool.done(conn, True)
        else:
            ex.got_conn(conn, False)

    def failed(self, text: str, prefix: bool = True) -> None:
        if not self._end():
            return
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.abort()
        elif self.sock is not None:
            self.sock.close()
        pool = self.pool
        pool.count(S.OUT_DIAL_ERROR)
        ex, self.exchange = self.exchange, None
        pool.dial_failed()
        if ex is not None:
            text = f"cannot connect to {pool.name}: {text}" if prefix else text
            ex.conn_failed(UpstreamError(text))

    def cancel(self) -> None:
        """The exchange no longer waits; a connect that succeeds is pooled."""
        self.exchange = None




class HTTPUpstream:
    """A pool of keep-alive connections to one upstream address."""

    def __init__(self, address, *, parser_module, max_header_size: int, max_conns: int,
                 idle_timeout: float, stats, block: int, tls_context=None,
                 server_hostname: str | None = None, max_body_size: int = 64 << 20,
                 write_timeout: float | None = None):
        self.address = address
        self.tls = tls_context
        self.server_hostname = server_hostname
        self.name = str(address)
        # the Host of a request that came without one (HTTP/1.0)
        self.host = (self.name if address.kind == "tcp" else "localhost").encode()
        self._parser_module = parser_module
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self._idle: list[UpstreamConn] = []
        self._busy = 0                 # connections in use or being dialled
        self._max = max_conns
        self._waiting: deque = deque()
        self._idle_timeout = idle_timeout
        # an upstream that takes none of what is queued: None, the exchange's
        # -outTimeout bounds that wait (a tunnel sets its own)
        self.write_timeout = write_timeout
        self.q = stats.q
        self.base = stats.block_base(block)
        self.retired = False           # left the -out set: no pooling, close when done
        self._sockaddr = None
        if address.kind == "unix":
            self._sockaddr = (_socket.AF_UNIX, address.sockaddr())
        else:
            try:
                ip = ipaddress.ip_address(address.host)
                family = _socket.AF_INET6 if ip.version == 6 else _socket.AF_INET
                self._sockaddr = (family, (address.host, address.port))
            except ValueError:
                pass                    # a name: resolved on each dial (off the hub)

    def count(self, field: int) -> None:
        self.q[self.base + field] += 1

    def new_parser(self):
        return self._parser_module.ResponseParser(self.max_header_size)

    # -- taking and giving back ----------------------------------------------------------

    def acquire(self, exchange) -> None:
        """Call back ``exchange.got_conn(conn, reused)`` or ``conn_failed(err)``,
        now or later; over the limit the exchange waits its turn."""
        if self._busy >= self._max:
            self._waiting.append(exchange)
            exchange.waiting_for = self
            return
        self._busy += 1
        self._take(exchange)

    def cancel(self, exchange) -> None:
        """``exchange`` gave up waiting (its timeout)."""
        try:
            self._waiting.remove(exchange)
        except ValueError:
            pass

    def _take(self, exchange) -> None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > self._idle_timeout:
                self._close(conn, orderly=True)
                continue
            if conn.transport.closed:
                self._close(conn)
                continue
            exchange.got_conn(conn, True)
            return
        self._dial(exchange)

    def _dial(self, exchange) -> None:
        dial = _Dial(self, exchange)
        exchange.dialing = dial
        if self._sockaddr is not None:
            dial.connect(*self._sockaddr)
        else:
            gevent.spawn(self._resolve_and_connect, dial)

    def _resolve_and_connect(self, dial: _Dial) -> None:
        addr = self.address
        try:
            infos = _gsocket().getaddrinfo(addr.host, addr.port, 0, _socket.SOCK_STREAM)
        except OSError as e:
            dial.failed(os_error_text(e))
            return
        if not dial.done:
            family, _, _, _, sockaddr = infos[0]
            dial.connect(family, sockaddr)

    def dial_failed(self) -> None:
        self._release_slot()

    def done(self, conn: UpstreamConn, keep: bool, orderly: bool = False) -> None:
        """An exchange is over with ``conn``: pool it (``keep``) or close it
        (``orderly``: a whole response came, so TLS gets our close_notify),
        and let the next waiting exchange in."""
        if keep and not conn.transport.closed and not conn.tunnel and not self.retired:
            conn.exchange = None
            conn.idle_since = time.monotonic()
            # the response may have ended while the client's writes backed up
            # (its reading paused): an idle connection is watched for close,
            # and the next request on it must be read
            conn.transport.resume_reading()
            self._idle.append(conn)
        else:
            self._close(conn, orderly=keep or orderly)
        self._busy -= 1
        if self._waiting:
            self._let_in()

    def _release_slot(self) -> None:
        self._busy -= 1
        self._let_in()

    def _let_in(self) -> None:
        """Give free slots to the exchanges waiting for one."""
        while self._waiting and self._busy < self._max:
            ex = self._waiting.popleft()
            ex.waiting_for = None
            self._busy += 1
            self._take(ex)

    def discard(self, conn: UpstreamConn) -> None:
        """An idle connection the upstream closed or wrote on."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._close(conn)

    def _close(self, conn: UpstreamConn, orderly: bool = False) -> None:
        conn.close(orderly)
        if conn.live:
            conn.live = False
            self.q[self.base + S.OUT_CONNS] -= 1

    def close(self) -> None:
        while self._idle:
            self._close(self._idle.pop(), orderly=True)

    def retire(self) -> None:
        """This address left the -out set (discovery): the balancer sends it
        nothing new; requests in flight finish, then their connections close,
        and the idle ones close now."""
        self.retired = True
        self.close()

    @property
    def busy(self) -> bool:
        """Connections in use or being dialled, or exchanges waiting for one."""
        return self._busy > 0 or bool(self._waiting)

    @property
    def idle_count(self) -> int:
        return len(self._idle)


def _gsocket():
    from gevent import socket
    return socket
