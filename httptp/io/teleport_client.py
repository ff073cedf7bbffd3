"""One multiplexed teleport connection to one address (PROTOCOL.md §1.5–§1.7), on the loop.

Theory of operation
-------------------
A ``TeleportClient`` owns at most one live ``_Link`` (connection) at a time.
What the protocol knows about a link lives in its sans-IO
``httptp.teleport.connection.ClientConnection`` (ids 1, 2, 3, … wrapping
from 0xFFFFFFFF to 1, never 0; the pending map; the codecs; the frame
reader and its limits); the link is the *protocol* of a
``httptp.io.transport`` Transport (TLSTransport for teleports) and adds the
dial, the handshake, batching and the callers' callbacks.  Everything runs
in loop callbacks: no greenlet per link or per request (a host name is
resolved in a short greenlet, as ``http_client`` does).

``request_async(method, target, headers, body, callback)`` takes an id and a
frame from the connection, queues a ``_Call`` on the link (opened lazily by
the first request) and returns it; ``callback(Response | UpstreamError)``
runs once, in the hub, unless ``cancel(call)`` came first (the caller's
-outTimeout: the connection ``forget``s the id, and an answer that still
comes is read and thrown away).  ``request`` is the blocking form on top of
it, for greenlets (the library ``Client.do``).

A link's life:

* **dial**: a non-blocking connect within ``dial_timeout``, then the 15-byte
  handshake both ways and, for teleports, the TLS handshake over the same
  socket (a TLSTransport replaces the plain one), all within
  ``HANDSHAKE_TIMEOUT``.  Requests queue meanwhile.
* **batching** (PROTOCOL §1.6): a queued request is framed only when its
  batch is flushed, so one that is cancelled while it waits is never sent.
  With ``delay`` 0 the flush runs once per loop turn (``run_callback``): the
  requests of one turn share a write.  With ``delay`` > 0 the first request
  of a batch arms a ``Timer`` (later ones never push it back).  Either way,
  once ``BATCH_BYTES`` of frames are queued they leave at once (Go's full
  buffer).  While the transport's buffer is over its high-water mark
  (``pause_writing``) nothing is flushed; a buffer that makes no progress
  for ``write_timeout`` ends the link.  Each flush tells the connection
  whether the socket still held earlier bytes: with ``level="auto"``
  (-outCompressLevel) that is how the level learns the writer fell behind;
  the level of the link is counted in the ``OUT_LEVEL_*`` gauges.
* **reading**: the bytes go to the connection, which decompresses them in
  slices (``codecs.MAX_SLICE``); after ``YIELD_SLICES`` slices in one
  callback reading pauses and the rest runs in a later loop turn, so a
  peer's bomb never holds more than one slice nor the loop for long.  Each
  response resolves its call; one to a forgotten id is dropped.  No byte for
  ``read_timeout`` ends the link (quietly when nothing is pending).

A response over ``max_header_size`` or ``max_body_size`` (-outMaxHeaderSize,
-outMaxBodySize) ends the link like any framing error (the stream cannot be
trusted to stay in sync); its own call fails with ``ResponseTooLarge`` (502),
and the refusal is counted in ``outResponseTooLarge``.

Any IO, codec or framing error ends the link: the transport is closed and
every call still pending fails with ``UpstreamError`` (``sent_nothing_back``
true only for calls whose bytes never went to the socket).  That is logged
once per link.  The next request opens a new link, except that after a failed
dial or handshake requests fail fast with the remembered error for 1 s (the
original's "sticky" error).  A refusal at submission (closed, sticky, too
many pending) reaches the callback in a later loop turn, never from inside
``request_async``.

Per request the hot path allocates the frame, a ``_Call`` and the
``Response``; the timers are the link's, re-armed.
"""

from __future__ import annotations

import ipaddress
import os
import socket as _socket
import time
from collections import deque

import gevent
from gevent import get_hub, getcurrent
from gevent.hub import Waiter

from httptp import stats as S
from httptp.errors import GatewayTimeout, ResponseTooLarge, UpstreamError
from httptp.http.events import Response
from httptp.io.common import BATCH_BYTES, COMPRESS_SPENT, YIELD_SLICES, counters, error_text
from httptp.io.timers import Timer
from httptp.io.transport import IN_PROGRESS, OUT, TLSTransport, Transport, connect
from httptp.netaddr import Address, parse_address
from httptp.teleport import FrameTooLarge, TeleportError
from httptp.teleport.connection import ClientConnection, FailFast
from httptp.teleport.codecs import check_level
from httptp.teleport.handshake import HEADER_SIZE, Compress
from httptp.tls import error_text as _tls_text

HANDSHAKE_TIMEOUT = 3.0     # one deadline for the whole handshake, both directions (§1.2)

# link states
_DIALING, _HELLO, _TLS, _OPEN, _DEAD = range(5)


def least_pending(clients: list) -> "TeleportClient":
    """The connection with the fewest requests in flight (the first on a tie)."""
    return clients[0] if len(clients) == 1 else min(clients, key=_pending)


def _pending(client) -> int:
    return client.pending


class _Call:
    """One request: its frame until it is sent, and whom to tell."""

    __slots__ = ("id", "frame", "callback", "link", "sent", "done")

    def __init__(self, req_id: int, frame: bytes | None, callback, link):
        self.id = req_id
        self.frame = frame          # None once it went into a batch (or was cancelled)
        self.callback = callback
        self.link = link
        self.sent = False           # its bytes went to the socket
        self.done = False           # answered, failed or cancelled

    def _later(self, result) -> None:
        """Deliver ``result`` in a later loop turn, in the hub (unless
        cancelled by then)."""
        self.link = None
        get_hub().loop.run_callback(self._deliver, result)

    def _deliver(self, result) -> None:
        cb = self.callback
        if cb is not None and not self.done:
            self.done = True
            self.callback = None
            cb(result)


class _Link:
    """One connection: the protocol of its transport (see the module doc)."""

    __slots__ = ("client", "conn", "calls", "queue", "queued", "state", "transport", "sock",
                 "error", "connected", "loop", "hub", "_dial_watcher", "_dial_timer", "_hello",
                 "_flush_scheduled", "_batch_timer", "_read_timer", "_write_timer", "_paused",
                 "_draining", "_eof", "_wt_mark", "_wt_added", "_plain_seen", "_level")

    def __init__(self, client: TeleportClient):
        self.client = client
        # a wrapped id still pending ends the link, as in Go (PROTOCOL §1.5)
        self.conn = ClientConnection(client.compress, max_header_size=client.max_header_size,
                                     max_body_size=client.max_body_size,
                                     first_id=client._first_id, skip_pending_ids=False,
                                     level=client.level, clock=time.monotonic,
                                     cpu=time.process_time, spent=COMPRESS_SPENT)
        self.calls: dict[int, _Call] = {}   # every call pending: queued or sent
        self.queue: deque = deque()         # calls not framed into a batch yet
        self.queued = 0                     # their frame bytes
        self.state = _DIALING
        self.transport = None
        self.sock = None
        self.error: str | None = None
        self.connected = False              # counted in outConns
        self.hub = get_hub()
        self.loop = self.hub.loop
        self._dial_watcher = None
        self._dial_timer = None
        self._hello = b""
        self._flush_scheduled = False
        self._batch_timer = Timer(client.delay) if client.delay > 0 else None
        self._read_timer = None
        self._write_timer = None
        self._paused = False                # the transport's buffer is over its high-water mark
        self._draining = False              # decompression continues in a later turn
        self._eof = False                   # the peer closed while we were draining
        self._wt_mark = 0
        self._wt_added = 0
        self._plain_seen = 0
        self._level = level = self.conn.compress_level
        if level is not None:               # the gauge: counted until fail()
            q, b = client._q, client._base
            q[b + S.OUT_LEVEL_SUM] += level
            q[b + S.OUT_LEVEL_LINKS] += 1
        self._dial()

    # -- the dial -------------------------------------------------------------------------------

    def _dial(self) -> None:
        client = self.client
        # libev times from the loop's cached clock, read when it last polled:
        # a dial started by a greenlet (the library's blocking client) after
        # seconds of work without yielding would see its deadline already past
        self.loop.update_now()
        self._dial_timer = timer = self.loop.timer(client.dial_timeout)
        timer.start(self._connect_failed, "timed out")
        addr = client.address
        if addr.kind == "unix":
            self._connect(_socket.AF_UNIX, addr.sockaddr())
            return
        try:
            ip = ipaddress.ip_address(addr.host)
        except ValueError:
            gevent.spawn(self._resolve_and_connect, addr)    # a name: resolved off the hub
            return
        self._connect(_socket.AF_INET6 if ip.version == 6 else _socket.AF_INET,
                      (addr.host, addr.port))

    def _resolve_and_connect(self, addr: Address) -> None:
        from gevent import socket as gsocket
        try:
            infos = gsocket.getaddrinfo(addr.host, addr.port, 0, _socket.SOCK_STREAM)
        except OSError as e:
            self._connect_failed(error_text(e))
            return
        if self.state == _DIALING:
            family, _, _, _, sockaddr = infos[0]
            self._connect(family, sockaddr)

    def _connect(self, family, sockaddr) -> None:
        try:
            sock, err = connect(family, sockaddr)
        except OSError as e:
            self._connect_failed(error_text(e))
            return
        self.sock = sock
        if err == 0:
            self._connected()
        elif err in IN_PROGRESS:
            self._dial_watcher = w = self.loop.io(sock.fileno(), 2)
            w.start(self._writable)
        else:
            self._connect_failed(os.strerror(err))

    def _writable(self) -> None:
        self._stop_dial_watcher()
        if self.state != _DIALING:
            return
        err = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            self._connect_failed(os.strerror(err))
        else:
            self._connected()

    def _stop_dial_watcher(self) -> None:
        w = self._dial_watcher
        if w is not None:
            self._dial_watcher = None
            w.stop()
            w.close()

    def _stop_dial_timer(self) -> None:
        t = self._dial_timer
        if t is not None:
            self._dial_timer = None
            t.stop()
            t.close()

    def _connect_failed(self, text: str) -> None:
        if self.state != _DIALING:
            return
        client = self.client
        client._q[client._base + S.OUT_DIAL_ERROR] += 1
        self._setup_failed(f"cannot connect: {text}")

    def _connected(self) -> None:
        """Connected: send our handshake, wait for the peer's (one deadline)."""
        client = self.client
        q, b = client._q, client._base
        q[b + S.OUT_DIAL_SUCCESS] += 1
        q[b + S.OUT_CONNS] += 1
        self.connected = True
        self._stop_dial_timer()
        self._dial_timer = timer = self.loop.timer(HANDSHAKE_TIMEOUT)
        timer.start(self._setup_failed, "handshake timed out")
        self.state = _HELLO
        t = self.transport = Transport(self.sock, self, q, b, OUT)
        self.sock = None
        t.start()
        t.write(self.conn.handshake(client.tls_context is not None))

    def _got_hello(self, data: bytes) -> None:
        hello = self._hello + data
        if len(hello) < HEADER_SIZE:
            self._hello = hello
            return
        self._hello = b""
        client = self.client
        try:
            _, tls = self.conn.receive_handshake(hello[:HEADER_SIZE])
            if client.tls_context is not None and not tls:
                raise TeleportError("the server refused TLS")
            if client.tls_context is None and tls:
                raise TeleportError("the server requires TLS (use -outType=teleports)")
        except TeleportError as e:
            client._q[client._base + S.OUT_TELEPORT_ERRORS] += 1
            self._setup_failed(error_text(e))
            return
        if client.tls_context is None:
            self._open()
            rest = hello[HEADER_SIZE:]
            if rest and self.state == _OPEN:
                self.data_received(rest)
            return
        # teleports: TLS over the same socket, from here on (PROTOCOL §2)
        self.state = _TLS
        sock = self.transport.detach()
        try:
            self.transport = TLSTransport(sock, self, client._q, client._base, OUT,
                                          client.tls_context, server_side=False,
                                          server_hostname=client.server_hostname)
        except (ValueError, OSError) as e:     # e.g. no name to check the certificate against
            self.transport = None
            self.sock = sock
            self.handshake_done(e)
            return
        self.transport.start()

    def handshake_done(self, error) -> None:
        """The TLS handshake ended (TLSTransport)."""
        if self.state != _TLS:
            return
        if error is not None:
            client = self.client
            client._q[client._base + S.OUT_DIAL_ERROR] += 1
            self._setup_failed(f"TLS handshake failed: {_tls_text(error)}")
            return
        self._open()

    def _setup_failed(self, text: str) -> None:
        """The dial or a handshake failed: fail fast for a while (sticky)."""
        if self.state >= _OPEN:
            return
        self.client.fail_fast.failed(text)
        self.fail(text, sticky=True)

    def _open(self) -> None:
        client = self.client
        self.state = _OPEN
        self._stop_dial_timer()
        self._read_timer = Timer(client.read_timeout)
        self._read_timer.arm(self._read_timed_out)
        self._write_timer = Timer(client.write_timeout)
        if self.queue:
            self._flush()

    # -- requests --------------------------------------------------------------------------------

    def put(self, call: _Call) -> None:
        self.calls[call.id] = call
        self.queue.append(call)
        self.queued += len(call.frame)
        if self.state != _OPEN or self._paused:
            return                              # flushed once open, or resumed
        if self.queued >= BATCH_BYTES:
            self._flush()                       # a full buffer leaves at once
        elif self._batch_timer is not None:
            if not self._batch_timer.armed:     # the first of a batch: never pushed back
                self._batch_timer.arm(self._flush)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.run_callback(self._flush)

    def cancel(self, call: _Call) -> None:
        """The caller gave up on ``call``: forget its id (it may still be answered)."""
        if self.calls.pop(call.id, None) is None:
            return
        frame = call.frame
        if frame is not None:                   # never sent: it never will be
            call.frame = None
            self.queued -= len(frame)
            self.conn.forget(call.id, sent=False)
        else:
            self.conn.forget(call.id, sent=True)

    def _flush(self) -> None:
        """Frame what is queued into batches and send them, compressed."""
        self._flush_scheduled = False
        if self._batch_timer is not None:
            self._batch_timer.disarm()
        if self.state != _OPEN or self._paused:
            return
        queue, conn = self.queue, self.conn
        batch = []
        try:
            while queue:
                call = queue.popleft()
                frame = call.frame
                if frame is None:               # cancelled while queued
                    continue
                call.frame = None
                self.queued -= len(frame)
                batch.append(call)
                if conn.write(frame) >= BATCH_BYTES:
                    self._send(batch)
                    batch = []
                    if self._paused or self.state != _OPEN:
                        return
            if batch:
                self._send(batch)
        except TeleportError as e:
            self._teleport_error(e)

    def _send(self, batch: list) -> None:
        conn = self.conn
        plain = conn.buffered
        t = self.transport
        data = conn.flush(t.write_buffer_size > 0)
        if conn.auto is not None and conn.auto.level != self._level:
            self._level_changed()
        for call in batch:
            call.sent = True
        client = self.client
        q, b = client._q, client._base
        q[b + S.TELEPORT_SENT_PLAIN] += plain
        q[b + S.TELEPORT_SENT_COMPRESSED] += len(data)
        before = t.write_buffer_size
        t.write(data)
        added = t.write_buffer_size - before
        if added > 0:
            timer = self._write_timer
            if timer.armed:
                self._wt_added += added
            else:
                self._wt_mark, self._wt_added = t.write_buffer_size, 0
                timer.arm(self._write_check)

    def _level_changed(self) -> None:
        """auto moved our level (at the flush that just ended): tell the
        debug log and the gauge."""
        auto, client = self.conn.auto, self.client
        if client.debug is not None:
            client.debug(f"teleport connection to {client.name}: compression level "
                         f"{self._level} -> {auto.level} ({auto.reason})")
        client._q[client._base + S.OUT_LEVEL_SUM] += auto.level - self._level
        self._level = auto.level

    def _write_check(self) -> None:
        """``write_timeout`` passed with bytes queued: fail unless some went out."""
        t = self.transport
        if self.state != _OPEN:
            return
        size = t.write_buffer_size
        if not size:
            return
        if size < self._wt_mark + self._wt_added:
            self._wt_mark, self._wt_added = size, 0
            self._write_timer.arm(self._write_check)
            return
        client = self.client
        client._q[client._base + S.OUT_WRITE_ERROR] += 1
        self.fail("write timed out")

    # -- transport callbacks ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state != _OPEN:
            if state == _HELLO:
                self._got_hello(data)
            return
        client = self.client
        client._q[client._base + S.TELEPORT_RECEIVED_COMPRESSED] += len(data)
        self._read_timer.arm(self._read_timed_out)
        try:
            self.conn.feed(data)
        except TeleportError as e:
            self._teleport_error(e)
            return
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Decompress and hand out responses, ``YIELD_SLICES`` slices per turn."""
        if self.state != _OPEN:
            return
        conn, calls = self.conn, self.calls
        next_frames = conn.next_frames
        slices = 0
        try:
            while (frames := next_frames()) is not None:
                for req_id, head, body in frames:      # only answers to pending calls
                    call = calls.pop(req_id, None)
                    if call is not None:
                        call.done = True
                        cb = call.callback
                        call.callback = None
                        cb(Response(head, body))
                if self.state != _OPEN:
                    return
                slices += 1
                if slices == YIELD_SLICES:
                    self._count_plain()
                    if not self._draining:
                        self._draining = True
                        self.transport.pause_reading()
                    self.loop.run_callback(self._drain)
                    return
        except FrameTooLarge as e:
            self._count_plain()
            self._too_large(e)
            return
        except TeleportError as e:
            self._teleport_error(e)
            return
        self._count_plain()
        if self._draining:
            self._draining = False
            self.transport.resume_reading()
        if self._eof:
            self.eof_received()

    def _count_plain(self) -> None:
        plain = self.conn.plain_received
        client = self.client
        client._q[client._base + S.TELEPORT_RECEIVED_PLAIN] += plain - self._plain_seen
        self._plain_seen = plain

    def eof_received(self) -> None:
        if self.state < _OPEN:
            self._setup_failed("connection closed during the handshake")
            return
        if self._draining:
            self._eof = True                    # what came before it goes out first
            return
        self.fail("connection closed by the server", quiet=not self.calls)

    def connection_lost(self, text: str) -> None:
        if self.state < _OPEN:
            self._setup_failed(text)
        else:
            self.fail(text)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.queue and self.state == _OPEN and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.run_callback(self._flush)

    def _read_timed_out(self) -> None:
        if self.state != _OPEN:
            return
        if not self.calls:
            self.fail("idle for longer than the read timeout", quiet=True)
            return
        client = self.client
        client._q[client._base + S.OUT_READ_ERROR] += 1
        self.fail("timed out")

    # -- errors ---------------------------------------------------------------------------------

    def _teleport_error(self, e: TeleportError) -> None:
        client = self.client
        client._q[client._base + S.OUT_TELEPORT_ERRORS] += 1
        self.fail(error_text(e))

    def _too_large(self, e: FrameTooLarge) -> None:
        client = self.client
        client._q[client._base + S.OUT_RESPONSE_TOO_LARGE] += 1
        text = f"response {e} ({client.limit_names[e.what]})"
        call = self.calls.pop(e.req_id, None) if e.req_id is not None else None
        if call is not None and not call.done:
            call.done = True
            cb = call.callback
            call.callback = None
            cb(ResponseTooLarge(text))
        # the refused call carries the news (the pipeline logs it, rate-limited);
        # the TLS session is sound: close it in order
        self.fail(text, quiet=True, orderly=True)

    def fail(self, text: str, *, sticky: bool = False, quiet: bool = False,
             orderly: bool | None = None) -> None:
        """Close the connection; fail every call still pending on it.

        ``quiet``: not logged (idle, closed by us, by the server with nothing
        pending, or a refusal that its own call reports).  ``orderly`` (by
        default ``quiet``): the TLS session is sound, so our close_notify goes
        first."""
        if self.state == _DEAD:
            return
        self.state = _DEAD
        self.error = text
        client = self.client
        if client._link is self:
            client._link = None
            client._first_id = self.conn.next_id    # ids carry on over the next link
        self._stop_dial_watcher()
        self._stop_dial_timer()
        for timer in (self._batch_timer, self._read_timer, self._write_timer):
            if timer is not None:
                timer.close()
        t = self.transport
        if t is not None:
            if quiet if orderly is None else orderly:
                t.close()
            else:
                t.abort()
        elif self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.connected:
            self.connected = False
            client._q[client._base + S.OUT_CONNS] -= 1
        if self._level is not None:
            client._q[client._base + S.OUT_LEVEL_SUM] -= self._level
            client._q[client._base + S.OUT_LEVEL_LINKS] -= 1
            self._level = None
        calls = list(self.calls.values())
        self.calls.clear()
        self.queue.clear()
        self.queued = 0
        msg = f"teleport connection to {client.name} failed: {text}"
        if calls and not quiet or sticky:
            if client.log is not None:
                client.log(msg)
        in_hub = getcurrent() is self.hub
        for call in calls:
            if call.done:
                continue
            err = UpstreamError(msg, sent_nothing_back=not call.sent)
            if in_hub:
                call._deliver(err)
            else:
                call._later(err)


class TeleportClient:
    """One multiplexed teleport connection to one address (PROTOCOL.md §1.5)."""

    def __init__(self, address, *, compress: int = Compress.FLATE, level=None,
                 delay: float = 0.0,
                 max_pending: int = 1000, max_header_size: int = 4096,
                 max_body_size: int = 64 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, dial_timeout: float = 3.0, stats=None,
                 block: int | None = None, log=None, tls_context=None,
                 server_hostname: str | None = None, limit_names: dict | None = None,
                 debug=None):
        if isinstance(address, str):
            address = parse_address(address, "tcp")
        self.address: Address = address
        self.name = str(address)
        self.compress = Compress(compress)
        #: None (the codec's default), a level, or "auto" (httptp.teleport.autolevel)
        self.level = check_level(self.compress, level)
        self.delay = delay
        self.max_pending = max_pending
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self.limit_names = limit_names or {"header": "max_header_size",
                                           "body": "max_body_size"}
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.dial_timeout = dial_timeout
        self.log = log
        self.debug = debug                  # debug(msg): level changes (auto)
        self.tls_context = tls_context      # a stdlib context: the transport does the IO
        # SNI and the name the certificate is checked against (teleports, PROTOCOL §2)
        self.server_hostname = server_hostname or (
            self.address.host if self.address.kind == "tcp" else None)
        self._q, self._base = counters(stats, block)
        self._link: _Link | None = None
        self._first_id = 1          # the next link's first id (ids carry on across links)
        self.fail_fast = FailFast(self.name, time.monotonic)

    @property
    def pending(self) -> int:
        """Requests queued or sent and not yet answered."""
        link = self._link
        return len(link.calls) if link is not None else 0

    @property
    def _next_id(self) -> int:
        """The id the next request gets (the tests set it to reach the wrap)."""
        link = self._link
        return link.conn.next_id if link is not None else self._first_id

    @_next_id.setter
    def _next_id(self, value: int) -> None:
        self._first_id = value
        if self._link is not None:
            self._link.conn.next_id = value

    # -- the async API (the pipeline's) --------------------------------------------------------

    def request_async(self, method: bytes, target: bytes, headers: list, body: bytes,
                      callback) -> _Call:
        """Send one request; ``callback(Response | UpstreamError)`` runs once,
        in the hub, unless ``cancel`` is called first.  Returns the call
        (for ``cancel``).  Raises ``ValueError`` at once for a request the
        codec refuses (a GET/HEAD with a body, no Host); every other failure
        goes to the callback, never from inside this call."""
        why = self.fail_fast.refusal()
        if why is not None:
            return self._refuse(UpstreamError(why), callback)
        link = self._link
        if link is None:
            link = _Link(self)
            if link.state == _DEAD:             # failed at once (a unix path that is not there)
                return self._refuse(UpstreamError(self.fail_fast.last or link.error), callback)
            self._link = link
        if len(link.calls) >= self.max_pending:
            return self._refuse(UpstreamError("teleport: too many pending requests"), callback)
        try:
            req_id, frame = link.conn.send_request(method, target, headers, body)
        except TeleportError as e:
            # RequestIdOverflow: the id space wrapped onto a request still
            # waiting (4G requests ago); the original drops the connection
            # (PROTOCOL §1.5).  Any other: the link failed already.
            link.fail(str(e))
            return self._refuse(UpstreamError(f"teleport connection to {self.name} failed: "
                                              f"{link.error}"), callback)
        call = _Call(req_id, frame, callback, link)
        link.put(call)
        return call

    @staticmethod
    def _refuse(err: UpstreamError, callback) -> _Call:
        call = _Call(0, None, callback, None)
        call._later(err)
        return call

    @staticmethod
    def cancel(call: _Call) -> None:
        """Stop waiting for ``call`` (its callback will not run)."""
        if call.done:
            return
        call.done = True
        call.callback = None
        link = call.link
        if link is not None and link.state != _DEAD:
            link.cancel(call)

    # -- the blocking API (greenlets) -----------------------------------------------------------

    def request(self, method: bytes, target: bytes, headers: list, body: bytes,
                deadline: float, *, interrupted_at_deadline: bool = False) -> Response:
        """Send one request and wait for its response until ``deadline``
        (``time.monotonic()`` seconds), from a greenlet.  Raises
        ``UpstreamError`` (connection failed, too many pending requests,
        client closed), ``GatewayTimeout`` (deadline passed) or ``ValueError``
        (a request the codec refuses: a GET/HEAD with a body, no Host).

        ``interrupted_at_deadline``: the caller has a timer of its own that
        raises in this greenlet at ``deadline``, so no timer is started here;
        its exception propagates and the request is forgotten as on a
        timeout."""
        hub = get_hub()
        waiter = Waiter(hub)
        call = self.request_async(method, target, headers, body, waiter.switch)
        timer = None
        result = _TIMED_OUT
        try:
            left = deadline - time.monotonic()
            if left > 0:
                if not interrupted_at_deadline:
                    timer = hub.loop.timer(left)
                    timer.start(waiter.switch, _TIMED_OUT)
                result = waiter.get()
        finally:
            if timer is not None:
                timer.close()
            if not call.done:
                self.cancel(call)
        if result is _TIMED_OUT:
            raise GatewayTimeout("teleport: timed out")
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Close the connection; waiting requests fail with UpstreamError."""
        self.fail_fast.closed = True
        link = self._link
        if link is not None:
            link.fail("client closed", quiet=True)


_TIMED_OUT = object()
