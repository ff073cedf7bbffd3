"""One multiplexed teleport connection to one address (PROTOCOL.md §1.5–§1.7).

Theory of operation
-------------------
A ``TeleportClient`` owns at most one live ``_Link`` (TCP connection) at a
time.  ``request`` gives the call an id (1, 2, 3, … wrapping from 0xFFFFFFFF
to 1, never 0), encodes its frame, puts it in the link's id map and write
queue, and waits on its own slot until the deadline.  The link is opened
lazily by the first request:

* the **writer greenlet** dials, does the 15-byte handshake (one 3 s deadline
  for both directions), starts the reader, then loops over the queue
  compressing frames and flushing in batches (``BatchWriter``, PROTOCOL §1.6);
* the **reader greenlet** receives, decompresses and frames responses; each
  one resolves the waiter with its id; an unknown id (a request that timed
  out) is read completely and thrown away.

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
import gevent.event
from gevent import get_hub, socket
from gevent.hub import Waiter

from httptp import stats as S
from httptp.errors import GatewayTimeout, ResponseTooLarge, UpstreamError
from httptp.http.events import Response
from httptp.io.sockio import close_tls, send_all
from httptp.io.timers import Deadline
from httptp.netaddr import Address, parse_address
from httptp.teleport import FrameTooLarge, TeleportError
from httptp.teleport import handshake
from httptp.teleport.codecs import compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request
from httptp.teleport.handshake import Compress, HEADER_SIZE
from httptp.tls import error_text as _tls_text

MAX_ID = 0xFFFFFFFF
HANDSHAKE_TIMEOUT = 3.0     # one deadline for the whole handshake, both directions (§1.2)
STICKY_FOR = 1.0            # after a failed dial/handshake, fail fast this long
BATCH_BYTES = 65536         # Go's WriteBufferSize: this much unflushed input forces a flush
_RECV_SIZE = 65536
# Decompressed slices handled before the reader lets other greenlets run
# (16 x 256 KiB: a few ms of work at most).
YIELD_SLICES = 16


class _Timeout(Exception):
    """A write or the handshake did not finish in time."""


class _Closed(Exception):
    """The peer closed the connection."""


class NullStats:
    """Stand-in counters when no shared-memory block is given: ``q[base + F] += n``
    works and goes nowhere useful."""

    def __init__(self):
        self.q = [0] * S.BLOCK_HEADER_WORDS

    def block_base(self, block) -> int:
        return 0


def counters(stats, block):
    """``(q, base)`` for this worker's block, or a private scratch array."""
    if stats is None:
        return NullStats().q, 0
    return stats.q, stats.block_base(block or 0)


def least_pending(clients: list) -> "TeleportClient":
    """The connection with the fewest requests in flight (the first on a tie)."""
    return clients[0] if len(clients) == 1 else min(clients, key=_pending)


def _pending(client) -> int:
    return client.pending


def error_text(e: BaseException) -> str:
    if isinstance(e, (_stdsocket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, _Timeout):
        return str(e) or "timed out"
    if isinstance(e, OSError):
        return e.strerror or str(e) or e.__class__.__name__
    return str(e) or e.__class__.__name__


# --------------------------------------------------------------------------- batching

class BatchWriter:
    """The writer loop of PROTOCOL.md §1.6, shared by client and server.

    Items are taken from ``queue`` and turned into frame bytes by ``frame``
    (``None`` skips the item); each frame goes through ``comp.compress``.  A
    flush (``comp.flush()`` plus one ``sendall`` of everything pending) is taken

    * at once when the queue is empty and ``delay`` is 0;
    * otherwise when the queue is empty and ``delay`` has passed since the first
      unflushed frame (arming happens once per batch: later frames never push
      the flush back), or at the next item boundary after that moment;
    * whenever ``BATCH_BYTES`` of frame input are unflushed (Go's full buffer).

    While a batch waits for its delay, ``put`` only queues: the writer is not
    woken per item (a switch and a timed wait per request) but once, by the
    timer, and then frames the whole backlog into that batch; ``put`` wakes it
    early only when the backlog would fill ``BATCH_BYTES`` (``size`` tells an
    item's frame bytes) or on ``stop``.

    ``run`` returns when ``stop`` was called and everything queued is flushed;
    it raises on a write error or a write timeout (the owner closes the link).
    In a cooperative hub the queue only grows while this greenlet yields, i.e.
    during a write or the wait, so a drained queue really is empty.
    """

    __slots__ = ("sock", "comp", "delay", "write_timeout", "queue", "wake", "q", "base",
                 "in_calls", "stopping", "_fields", "_timer", "_room")

    def __init__(self, sock, comp, *, delay: float, write_timeout: float, q, base: int,
                 in_calls: bool):
        self.sock = sock
        self.comp = comp
        self.delay = delay
        self.write_timeout = write_timeout
        self.queue: deque = deque()
        self.wake = gevent.event.Event()
        self.q, self.base = q, base
        self.in_calls = in_calls           # counters: IN_* (server) or OUT_* (client)
        self.stopping = False
        self._fields = ((S.IN_WRITE_ERROR, S.IN_WRITE_CALLS, S.IN_BYTES_WRITTEN) if in_calls else
                        (S.OUT_WRITE_ERROR, S.OUT_WRITE_CALLS, S.OUT_BYTES_WRITTEN))
        self._timer: Deadline | None = None     # write_timeout, armed around each write
        self._room: int | None = None   # sleeping on the delay: frame bytes before a full batch

    def put(self, item) -> None:
        self.queue.append(item)
        room = self._room
        if room is not None:
            room = self._room = room - self.size(item)
            if room > 0:
                return                  # the delay timer takes it with its batch
        self.wake.set()

    def stop(self) -> None:
        """Flush what is queued, then let ``run`` return."""
        self.stopping = True
        self.wake.set()

    # hooks ------------------------------------------------------------------
    def frame(self, item):
        return item

    def size(self, item) -> int:
        """The frame bytes ``item`` will add (for the full-batch rule)."""
        return len(item)

    def flushing(self) -> None:
        """Called just before a batch goes to the socket."""

    # the loop ---------------------------------------------------------------
    def run(self) -> None:
        # One timer for the life of the loop, re-armed (full period) per write:
        # a gevent.Timeout per flush costs an allocation and ~2 us.
        self._timer = Deadline(self.write_timeout, _Timeout("write timed out"))
        try:
            self._run()
        finally:
            self._timer.close()

    def _run(self) -> None:
        queue, wake, comp = self.queue, self.wake, self.comp
        compress = comp.compress
        frame = self.frame
        delay = self.delay
        out: list = []
        unflushed = 0          # frame bytes fed to the compressor since the last flush
        flush_at = 0.0
        backlog = 0            # items queued while the batch slept: they belong to it
        while True:
            while queue:
                data = frame(queue.popleft())
                if backlog:
                    backlog -= 1
                if data is None:
                    continue
                if not unflushed:
                    flush_at = time.monotonic() + delay if delay > 0 else 0.0
                unflushed += len(data)
                chunk = compress(data)
                if chunk:
                    out.append(chunk)
                if unflushed >= BATCH_BYTES or (
                        not backlog and flush_at and time.monotonic() >= flush_at):
                    self._flush(out, unflushed)
                    out = []
                    unflushed = 0
            if unflushed:
                if delay <= 0:
                    self._flush(out, unflushed)
                    out = []
                    unflushed = 0
                    continue
                left = flush_at - time.monotonic()
                if left <= 0 or self.stopping:
                    self._flush(out, unflushed)
                    out = []
                    unflushed = 0
                    continue
                self._room = BATCH_BYTES - unflushed
                wake.clear()
                wake.wait(left)
                self._room = None
                backlog = len(queue)
                continue
            if self.stopping:
                return
            wake.clear()
            wake.wait()

    def _flush(self, out: list, plain: int) -> None:
        """End a batch: ``plain`` frame bytes went into the compressor for it."""
        tail = self.comp.flush()
        if tail:
            out.append(tail)
        self.flushing()
        data = out[0] if len(out) == 1 else b"".join(out)
        if not data:
            return
        q, b = self.q, self.base
        size = len(data)
        q[b + S.TELEPORT_SENT_PLAIN] += plain
        q[b + S.TELEPORT_SENT_COMPRESSED] += size
        f_err, f_calls, f_bytes = self._fields
        timer = self._timer
        timer.arm()
        try:
            send_all(self.sock, data)
        except (OSError, _Timeout):
            q[b + f_err] += 1
            raise
        finally:
            timer.disarm()
        q[b + f_calls] += 1
        q[b + f_bytes] += size


def read_exactly(sock, n: int) -> bytes:
    """Exactly ``n`` bytes (never more: what follows belongs to the codec)."""
    parts = []
    while n:
        data = sock.recv(n)
        if not data:
            raise _Closed("connection closed during the handshake")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


# --------------------------------------------------------------------------- client

class _Call:
    """One request on a link.  Its outcome (``value`` or ``error``) is stored
    here; ``waiter`` only wakes the requesting greenlet.  A gevent ``Waiter``
    plus a hub callback is what ``AsyncResult`` does underneath, without its
    link list and notifier per request."""

    __slots__ = ("id", "method", "frame", "deadline", "waiter", "done", "value", "error",
                 "sent", "cancelled")

    def __init__(self, req_id: int, method: bytes, frame: bytes, deadline: float, hub):
        self.id = req_id
        self.method = method
        self.frame = frame
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

    def __init__(self, link, sock, comp, **kw):
        super().__init__(sock, comp, **kw)
        self.link = link
        self.batch: list = []

    def frame(self, call: _Call):
        if call.cancelled:
            return None
        if call.deadline <= time.monotonic():
            # Expired while queued: never sent (PROTOCOL §1.7).
            self.link.calls.pop(call.id, None)
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
    """One TCP connection and its two greenlets."""

    def __init__(self, client: TeleportClient):
        self.client = client
        self.calls: dict[int, _Call] = {}
        self.late_heads: set[int] = set()   # HEAD ids that timed out after being sent
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
            comp, decomp = self._connect()
        except Exception as e:
            if isinstance(e, TeleportError):
                client._q[client._base + S.OUT_TELEPORT_ERRORS] += 1
            client._remember_failure(e)
            self.fail(error_text(e), sticky=True)
            return
        w = _LinkWriter(self, self.sock, comp, delay=client.delay,
                        write_timeout=client.write_timeout, q=client._q, base=client._base,
                        in_calls=False)
        w.queue = self.queue
        self.writer = w
        self._reader_g = gevent.spawn(self._run_reader, decomp)
        try:
            w.run()
        except Exception as e:
            self.fail(error_text(e))

    def _connect(self):
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
        self.sock = sock
        self.connected = True
        if self.dead:                # closed while dialing
            raise _Closed("client closed")
        sock.settimeout(None)
        tls_context = client.tls_context
        timer = gevent.Timeout(HANDSHAKE_TIMEOUT, _Timeout("handshake timed out"))
        timer.start()
        try:
            try:
                sock.sendall(handshake.encode(client.compress, tls_context is not None))
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
            theirs, tls = handshake.decode(data)
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
        return compressor(client.compress), decompressor(theirs)

    def _run_reader(self, decomp) -> None:
        client = self.client
        q, b = client._q, client._base
        sock = self.sock
        calls = self.calls
        late_heads = self.late_heads

        def is_head(req_id: int) -> bool:
            call = calls.get(req_id)
            if call is not None:
                return call.method == b"HEAD"
            return req_id in late_heads

        reader = FrameReader("response", client.max_header_size, is_head, client.max_body_size)
        feed = reader.feed
        feed_codec, read_codec = decomp.feed, decomp.read
        try:
            while True:
                try:
                    data = sock.recv(_RECV_SIZE)
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
                    raise _Closed("connection closed by the server")
                q[b + S.OUT_BYTES_READ] += len(data)
                q[b + S.TELEPORT_RECEIVED_COMPRESSED] += len(data)
                feed_codec(data)
                slices = 0
                while plain := read_codec():
                    q[b + S.TELEPORT_RECEIVED_PLAIN] += len(plain)
                    for req_id, head, body in feed(plain):
                        call = calls.pop(req_id, None)
                        if call is None:
                            late_heads.discard(req_id)
                            continue
                        call.resolve(Response(head, body))
                    slices += 1
                    if slices == YIELD_SLICES:
                        slices = 0
                        gevent.sleep(0)
        except _Closed as e:
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
        self._next_id = 1
        self._sticky: str | None = None
        self._sticky_until = 0.0
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests queued or sent and not yet answered."""
        link = self._link
        return len(link.calls) if link is not None else 0

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
        req_id = self._next_id
        self._next_id = req_id + 1 if req_id < MAX_ID else 1
        frame = encode_request(req_id, method, target, headers, body)
        if req_id in calls:
            # The id space wrapped onto a request still waiting (4G requests
            # ago): the original drops the connection (PROTOCOL §1.5).
            link.fail("request ID overflow")
            raise UpstreamError(f"teleport connection to {self.name} failed: request ID overflow")
        call = _Call(req_id, method, frame, deadline, link.hub)
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
                # A HEAD already in the stream gets an answer whose Content-Length
                # announces no body: the reader must still know it was a HEAD.
                if calls.pop(req_id, None) is not None and call.frame is None \
                        and method == b"HEAD":
                    link.late_heads.add(req_id)
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
