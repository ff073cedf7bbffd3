"""One multiplexed teleport connection to one address (PROTOCOL.md §1.5–§1.7).

Theory of operation
-------------------
A ``TeleportClient`` owns at most one live ``_Link`` (TCP connection) at a
time.  What the protocol knows about a link lives in its sans-IO
``httptp.teleport.connection.ClientConnection`` (ids 1, 2, 3, … wrapping
from 0xFFFFFFFF to 1, never 0; the pending map; the codecs; the frame
reader and its limits); the link adds the socket, the greenlets and the
waiting callers.  ``request`` takes an id and a frame from the connection,
puts a ``_Call`` in the link's id map and write queue, and waits on its own
slot until the deadline.  The link is opened lazily by the first request:

* the **writer greenlet** dials, does the 15-byte handshake (one 3 s deadline
  for both directions), starts the reader, then loops over the queue
  putting frames into the connection's batch and flushing it compressed
  (``httptp.io.common.BatchWriter``, PROTOCOL §1.6);
* the **reader greenlet** receives and hands the bytes to the connection,
  which decompresses and frames responses; each one resolves the waiter with
  its id; an unknown id (a request that timed out) is read completely and
  thrown away.

A response over ``max_header_size`` or ``max_body_size`` (-outMaxHeaderSize,
-outMaxBodySize) ends the link like any framing error (the stream cannot be
trusted to stay in sync); its own call fails with ``ResponseTooLarge`` (502),
and the refusal is counted in ``outResponseTooLarge``.  Decompression is read
in slices, and the reader yields to other greenlets every ``YIELD_SLICES``
slices, so a peer's bomb never holds more than one slice nor the hub for long.

Any IO, codec or framing error ends the link: the socket is closed and every
call still in the id map fails with ``UpstreamError`` (``sent_nothing_back``
true only for calls whose bytes never reached the socket).  That is logged
once per link.  The next request opens a new link, except that after a failed
dial or handshake requests fail fast with the remembered error for 1 s (the
original's "sticky" error).

Sockets come from ``gevent.socket`` explicitly (no monkey-patching).  The
socket's own timeout is the read timeout (idle connections end after it);
each write runs under a ``Deadline`` of ``write_timeout`` (one timer per
writer, re-armed per write).

Per request the hot path allocates only the frame and a ``_Call`` with a
gevent ``Waiter``: the reader stores the answer on the call and wakes the
waiter with one hub callback, and the pipeline's own -outTimeout timer bounds
the wait (``interrupted_at_deadline``), so no timer is created per request.
"""

from __future__ import annotations

import socket as _stdsocket
import time
from collections import deque

import gevent
from gevent import get_hub, socket
from gevent.hub import Waiter

from httptp import stats as S
from httptp.errors import GatewayTimeout, ResponseTooLarge, UpstreamError
from httptp.http.events import Response
from httptp.io.common import (RECV_SIZE, YIELD_SLICES, BatchWriter, Closed, TimedOut,
                              counters, error_text, read_exactly)
from httptp.io.sockio import close_tls
from httptp.netaddr import Address, parse_address
from httptp.teleport import FrameTooLarge, TeleportError
from httptp.teleport.connection import ClientConnection
from httptp.teleport.handshake import Compress, HEADER_SIZE
from httptp.tls import error_text as _tls_text

HANDSHAKE_TIMEOUT = 3.0     # one deadline for the whole handshake, both directions (§1.2)
STICKY_FOR = 1.0            # after a failed dial/handshake, fail fast this long


def least_pending(clients: list) -> "TeleportClient":
    """The connection with the fewest requests in flight (the first on a tie)."""
    return clients[0] if len(clients) == 1 else min(clients, key=_pending)


def _pending(client) -> int:
    return client.pending


# --------------------------------------------------------------------------- client

class _Call:
    """One request on a link.  Its outcome (``value`` or ``error``) is stored
    here; ``waiter`` only wakes the requesting greenlet.  A gevent ``Waiter``
    plus a hub callback is what ``AsyncResult`` does underneath, without its
    link list and notifier per request."""

    __slots__ = ("id", "frame", "deadline", "waiter", "done", "value", "error", "sent",
                 "cancelled")

    def __init__(self, req_id: int, frame: bytes, deadline: float, hub):
        self.id = req_id
        self.frame = frame          # None once the writer put it into a batch
        self.deadline = deadline
        self.waiter = Waiter(hub)
        self.done = False           # value or error is set
        self.value = None
        self.error = None
        self.sent = False
        self.cancelled = False

    def resolve(self, value) -> None:
        """Give the call its answer (from any greenlet but the hub)."""
        if not self.done:
            self.done = True
            self.value = value
            w = self.waiter
            w.hub.loop.run_callback(w.switch, None)

    def reject(self, error: BaseException) -> None:
        """Fail the call with ``error`` (from any greenlet but the hub)."""
        if not self.done:
            self.done = True
            self.error = error
            w = self.waiter
            w.hub.loop.run_callback(w.switch, None)


class _LinkWriter(BatchWriter):
    __slots__ = ("link", "batch")

    def __init__(self, link, sock, conn, **kw):
        super().__init__(sock, conn, **kw)
        self.link = link
        self.batch: list = []

    def frame(self, call: _Call):
        if call.cancelled:
            return None
        if call.deadline <= time.monotonic():
            # Expired while queued: never sent (PROTOCOL §1.7).
            link = self.link
            link.calls.pop(call.id, None)
            link.conn.forget(call.id, sent=False)
            call.cancelled = True
            call.reject(GatewayTimeout("teleport: timed out before it was sent"))
            return None
        data = call.frame
        call.frame = None
        self.batch.append(call)
        return data

    def size(self, call: _Call) -> int:
        frame = call.frame
        return len(frame) if frame is not None else 0

    def flushing(self) -> None:
        for call in self.batch:
            call.sent = True
        self.batch.clear()


class _Link:
    """One TCP connection, its sans-IO ``ClientConnection`` and its two greenlets."""

    def __init__(self, client: TeleportClient):
        self.client = client
        # ids, the pending map, codecs and frame limits live in ``conn``; a
        # wrapped id still pending ends the link, as in Go (PROTOCOL §1.5)
        self.conn = ClientConnection(client.compress, max_header_size=client.max_header_size,
                                     max_body_size=client.max_body_size,
                                     first_id=client._first_id, skip_pending_ids=False)
        self.calls: dict[int, _Call] = {}   # the waiters of conn.pending
        self.sock = None
        self.writer: _LinkWriter | None = None
        self.queue: deque = deque()
        self.dead = False
        self.connected = False
        self.error: str | None = None
        self.hub = get_hub()
        self._reader_g = None
        self._writer_g = gevent.spawn(self._run_writer)

    # -- queueing ------------------------------------------------------------
    def put(self, call: _Call) -> None:
        self.calls[call.id] = call
        w = self.writer
        if w is not None:
            w.put(call)
        else:
            self.queue.append(call)      # the writer adopts this deque once connected

    # -- greenlets -----------------------------------------------------------
    def _run_writer(self) -> None:
        client = self.client
        try:
            self._connect()
        except Exception as e:
            if isinstance(e, TeleportError):
                client._q[client._base + S.OUT_TELEPORT_ERRORS] += 1
            client._remember_failure(e)
            self.fail(error_text(e), sticky=True)
            return
        w = _LinkWriter(self, self.sock, self.conn, delay=client.delay,
                        write_timeout=client.write_timeout, q=client._q, base=client._base,
                        in_calls=False)
        w.queue = self.queue
        self.writer = w
        self._reader_g = gevent.spawn(self._run_reader)
        try:
            w.run()
        except Exception as e:
            self.fail(error_text(e))

    def _dial(self):
        client = self.client
        q, b = client._q, client._base
        addr = client.address
        try:
            if addr.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(client.dial_timeout)
                try:
                    sock.connect(addr.sockaddr())
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((addr.host, addr.port), timeout=client.dial_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            q[b + S.OUT_DIAL_ERROR] += 1
            raise UpstreamError(f"cannot connect: {error_text(e)}") from None
        q[b + S.OUT_DIAL_SUCCESS] += 1
        q[b + S.OUT_CONNS] += 1
        return sock

    def _connect(self) -> None:
        """Dial, then the handshake (and TLS) under one HANDSHAKE_TIMEOUT."""
        client = self.client
        q, b = client._q, client._base
        sock = self.sock = self._dial()
        self.connected = True
        if self.dead:                # closed while dialing
            raise Closed("client closed")
        sock.settimeout(None)
        tls_context = client.tls_context
        timer = gevent.Timeout(HANDSHAKE_TIMEOUT, TimedOut("handshake timed out"))
        timer.start()
        try:
            try:
                sock.sendall(self.conn.handshake(tls_context is not None))
            except OSError:
                q[b + S.OUT_WRITE_ERROR] += 1
                raise
            q[b + S.OUT_WRITE_CALLS] += 1
            q[b + S.OUT_BYTES_WRITTEN] += HEADER_SIZE
            try:
                data = read_exactly(sock, HEADER_SIZE)
            except OSError:
                q[b + S.OUT_READ_ERROR] += 1
                raise
            q[b + S.OUT_READ_CALLS] += 1
            q[b + S.OUT_BYTES_READ] += HEADER_SIZE
            _, tls = self.conn.receive_handshake(data)
            if tls_context is not None:
                if not tls:
                    raise TeleportError("the server refused TLS")
                try:
                    sock = tls_context.wrap_socket(sock, server_hostname=client.server_hostname)
                except OSError as e:
                    q[b + S.OUT_DIAL_ERROR] += 1
                    raise UpstreamError(f"TLS handshake failed: {_tls_text(e)}") from None
                self.sock = sock
            elif tls:
                raise TeleportError("the server requires TLS (use -outType=teleports)")
        except OSError as e:
            raise UpstreamError(f"handshake failed: {error_text(e)}") from None
        finally:
            timer.close()
        sock.settimeout(client.read_timeout)

    def _run_reader(self) -> None:
        client = self.client
        q, b = client._q, client._base
        calls = self.calls
        try:
            self._read()
        except Closed as e:
            self.fail(str(e), quiet=not calls)
        except FrameTooLarge as e:
            q[b + S.OUT_RESPONSE_TOO_LARGE] += 1
            text = f"response {e} ({client.limit_names[e.what]})"
            call = calls.pop(e.req_id, None) if e.req_id is not None else None
            if call is not None:
                call.reject(ResponseTooLarge(text))
            # the refused call carries the news (the pipeline logs it,
            # rate-limited); the TLS session is sound: close it in order
            self.fail(text, quiet=True, orderly=True)
        except Exception as e:
            if isinstance(e, TeleportError):
                q[b + S.OUT_TELEPORT_ERRORS] += 1
            self.fail(error_text(e))

    def _read(self) -> None:
        """recv → ``conn`` → resolve each answered call, until the link ends."""
        q, b = self.client._q, self.client._base
        sock, conn, calls = self.sock, self.conn, self.calls
        feed, next_frames = conn.feed, conn.next_frames
        plain_seen = conn.plain_received
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except (_stdsocket.timeout, TimeoutError):
                if not calls:
                    self.fail("idle for longer than the read timeout", quiet=True)
                    return
                q[b + S.OUT_READ_ERROR] += 1
                raise
            except OSError:
                q[b + S.OUT_READ_ERROR] += 1
                raise
            q[b + S.OUT_READ_CALLS] += 1
            if not data:
                raise Closed("connection closed by the server")
            q[b + S.OUT_BYTES_READ] += len(data)
            q[b + S.TELEPORT_RECEIVED_COMPRESSED] += len(data)
            feed(data)
            slices = 0
            while (frames := next_frames()) is not None:
                plain = conn.plain_received
                q[b + S.TELEPORT_RECEIVED_PLAIN] += plain - plain_seen
                plain_seen = plain
                for req_id, head, body in frames:      # only answers to pending calls
                    call = calls.pop(req_id, None)
                    if call is not None:
                        call.resolve(Response(head, body))
                slices += 1
                if slices == YIELD_SLICES:
                    slices = 0
                    gevent.sleep(0)

    # -- the end -------------------------------------------------------------
    def fail(self, text: str, *, sticky: bool = False, quiet: bool = False,
             orderly: bool | None = None) -> None:
        """Close the connection; fail every call still waiting on it.

        ``quiet``: not logged (idle, closed by us, by the server with nothing
        pending, or a refusal that its own call reports).  ``orderly`` (by
        default ``quiet``): the TLS session is sound, so our close_notify goes
        first."""
        if self.dead:
            return
        self.dead = True
        self.error = text
        client = self.client
        if client._link is self:
            client._link = None
            client._first_id = self.conn.next_id    # ids carry on over the next link
        cur = gevent.getcurrent()
        for g in (self._reader_g, self._writer_g):
            if g is not None and g is not cur:
                g.kill(block=False)
        if self.sock is not None:
            if quiet if orderly is None else orderly:
                close_tls(self.sock)
            else:
                try:
                    self.sock.close()
                except OSError:
                    pass
        if self.connected:
            self.connected = False
            client._q[client._base + S.OUT_CONNS] -= 1
        calls = list(self.calls.values())
        self.calls.clear()
        msg = f"teleport connection to {client.name} failed: {text}"
        if calls and not quiet or sticky:
            if client.log is not None:
                client.log(msg)
        for call in calls:
            call.reject(UpstreamError(msg, sent_nothing_back=not call.sent))


class TeleportClient:
    """One multiplexed teleport connection to one address (PROTOCOL.md §1.5)."""

    def __init__(self, address, *, compress: int = Compress.FLATE, delay: float = 0.0,
                 max_pending: int = 1000, max_header_size: int = 4096,
                 max_body_size: int = 64 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, dial_timeout: float = 3.0, stats=None,
                 block: int | None = None, log=None, tls_context=None,
                 server_hostname: str | None = None, limit_names: dict | None = None):
        if isinstance(address, str):
            address = parse_address(address, "tcp")
        self.address: Address = address
        self.name = str(address)
        self.compress = Compress(compress)
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
        if tls_context is not None:
            from httptp.tls import cooperative
            tls_context = cooperative(tls_context)   # gevent SSLSockets from a stdlib context
        self.tls_context = tls_context
        # SNI and the name the certificate is checked against (teleports, PROTOCOL §2)
        self.server_hostname = server_hostname or (
            self.address.host if self.address.kind == "tcp" else None)
        self._q, self._base = counters(stats, block)
        self._link: _Link | None = None
        self._first_id = 1          # the next link's first id (ids carry on across links)
        self._sticky: str | None = None
        self._sticky_until = 0.0
        self._closed = False

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

    def _remember_failure(self, e: BaseException) -> None:
        self._sticky = f"teleport connection to {self.name} failed: {error_text(e)}"
        self._sticky_until = time.monotonic() + STICKY_FOR

    def request(self, method: bytes, target: bytes, headers: list, body: bytes,
                deadline: float, *, interrupted_at_deadline: bool = False) -> Response:
        """Send one request and wait for its response until ``deadline``
        (``time.monotonic()`` seconds).  Raises ``UpstreamError`` (connection
        failed, too many pending requests, client closed), ``GatewayTimeout``
        (deadline passed) or ``ValueError`` (a request the codec refuses: a
        GET/HEAD with a body, no Host).

        ``interrupted_at_deadline``: the caller has a timer of its own that
        raises in this greenlet at ``deadline`` (the pipeline's -outTimeout
        ``Deadline``), so no timer is started here; its exception propagates
        and the request is forgotten as on a timeout."""
        if self._closed:
            raise UpstreamError(f"teleport client for {self.name} is closed")
        if self._sticky is not None:
            if time.monotonic() < self._sticky_until:
                raise UpstreamError(self._sticky)
            self._sticky = None
        link = self._link
        if link is None:
            link = self._link = _Link(self)
        calls = link.calls
        if len(calls) >= self.max_pending:
            raise UpstreamError("teleport: too many pending requests")
        try:
            req_id, frame = link.conn.send_request(method, target, headers, body)
        except TeleportError as e:
            # RequestIdOverflow: the id space wrapped onto a request still
            # waiting (4G requests ago); the original drops the connection
            # (PROTOCOL §1.5).  Any other: the link failed already.
            link.fail(str(e))
            raise UpstreamError(f"teleport connection to {self.name} failed: "
                                f"{link.error}") from None
        call = _Call(req_id, frame, deadline, link.hub)
        link.put(call)
        timer = None
        try:
            left = deadline - time.monotonic()
            if left > 0:
                if not interrupted_at_deadline:
                    timer = link.hub.loop.timer(left)
                    timer.start(call.waiter.switch, None)
                call.waiter.get()
        finally:
            if timer is not None:
                timer.close()
            if not call.done:
                call.cancelled = True
                if calls.pop(req_id, None) is not None:
                    # an answer may still come if the frame is in the stream
                    # (a HEAD's must then still be read without a body)
                    link.conn.forget(req_id, sent=call.frame is None)
        if not call.done:
            raise GatewayTimeout("teleport: timed out")
        if call.error is not None:
            raise call.error
        return call.value

    def close(self) -> None:
        """Close the connection; waiting requests fail with UpstreamError."""
        self._closed = True
        link = self._link
        if link is not None:
            link.fail("client closed", quiet=True)
