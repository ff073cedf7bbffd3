"""One teleport server connection: a protocol on gevent's loop (hot path).

Theory of operation
-------------------
``TeleportServerConn`` serves one accepted teleport connection with
callbacks in the hub, no greenlet of its own (``httptp.io.transport``):

1. *hello*: a read watcher of our own takes exactly the client's 15-byte
   header (never more: what follows may be TLS), within
   ``handshake_timeout`` (a peer that says nothing in time is closed
   silently).  Our header is sent at once.  TLS (PROTOCOL.md §1.2, §2):

   * no ``tls`` (a plain ``teleport`` listener), client flag 1: we answer
     flag 0 and close, as the original does;
   * ``tls`` given, client flag 1: we answer flag 1 and the socket goes to a
     ``TLSTransport``, whose handshake must end within the same
     ``handshake_timeout``; both compression streams then run inside TLS;
   * ``tls`` given, client flag 0: accepted only with ``allow_plaintext``
     (-inTLSAllowPlaintext); otherwise we answer flag 1 ("this listener
     needs TLS"), log one line and close;
2. *frames*: each read is fed to the sans-IO ``ServerConnection``
   (``httptp.teleport.connection``), which decompresses it in slices.  A
   callback handles at most ``YIELD_SLICES`` slices: when more is left,
   reading pauses and the rest goes on in a ``loop.run_callback``, so a
   compression bomb never holds the hub (and its input stays bounded);
3. each request frame is handed to the server's ``dispatch(conn, req_id,
   head, body)``, which answers it later, exactly once, with
   ``conn.respond(req_id, answer)`` (an ``Answer``; from the hub or from a
   greenlet; a dispatch that raises has answered nothing: 500).  The answer is framed with the request's id (no body for a
   HEAD, 1xx, 204 or 304) into the current batch: answers go out in
   completion order.  Id 0 is fire-and-forget: nothing is written.  When
   the server's ``concurrency`` handlers are already running a request is
   answered 429 at once and never dispatched.

Batches (PROTOCOL.md §1.6): with ``delay`` 0 the answers produced in one
loop turn are compressed together and flushed by a ``loop.run_callback``;
with ``delay`` > 0 a timer armed by a batch's first answer flushes it (later
answers never push the flush back).  Either way ``BATCH_BYTES`` of
unflushed frames flush at once (Go's full buffer).  Each flush tells the
connection whether our socket still held earlier bytes (-inCompressLevel
``auto`` goes down when it does); the connection's level is counted in the
``IN_LEVEL_*`` gauges from the handshake to the close.

Flow control: when the transport's queue passes its high-water mark
(``pause_writing``) we stop reading new requests until ``resume_writing``:
reading pauses, and slices already read but not decompressed wait too (a
bomb of small requests cannot grow the queue).  A peer of which nothing
went out for ``write_timeout`` is cut (the transport's ``write_timeout``).

Size limits (``max_header_size``, ``max_body_size``) are the frame
reader's: a request whose Content-Length is over the limit is answered 413
at once and its body skipped as it arrives; a header block or a chunked
body over a limit closes the connection.  Each refusal is counted
(``inRequestTooLarge``), logged rate-limited per peer and reported to the
server's ``refused`` hook (the worker's access log).

Ends: an idle connection (nothing read for ``read_timeout``) and a client
that closes its side end in order (TLS: our close_notify after what is
queued); a codec, framing or IO error closes at once.  Answers to requests
still running on a closed connection are dropped (the requests themselves
finish).  ``drain`` stops reading, lets the requests in flight finish and
their answers flush, then closes in order.
"""

from __future__ import annotations

import time

from gevent import get_hub

from httptp import stats as S
from httptp.errors import PayloadTooLarge
from httptp.io.common import BATCH_BYTES, COMPRESS_SPENT, YIELD_SLICES, error_text
from httptp.io.timers import Timer
from httptp.io.transport import IN, TLSTransport, Transport
from httptp.teleport import FrameTooLarge, HandshakeError, TeleportError
from httptp.teleport.connection import ServerConnection
from httptp.teleport.handshake import HEADER_SIZE
from httptp.tls import error_text as tls_error_text

_TEXT_PLAIN = [(b"Content-Type", b"text/plain; charset=utf-8")]


class Answer:
    """What a handler returns: ``reason`` bytes, ``headers`` a list of
    ``(bytes, bytes)`` without hop-by-hop headers or Content-Length (the
    encoder frames the body), or those fields as wire lines (bytes: the
    proxy passes an upstream head's ``raw``), ``body`` bytes (b"" for HEAD)."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: bytes, headers: list, body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


INTERNAL_ERROR = Answer(500, b"Internal Server Error", _TEXT_PLAIN, b"internal error\n")
_TOO_LARGE = PayloadTooLarge()

# why reading is paused (bits of _paused)
_BACKLOG = 1        # decompressed slices left for the next loop turn
_WRITES = 2         # our transport's queue is over its high-water mark
_DRAIN = 4          # draining: no new request is read
_HELLO, _TLS, _FRAMES, _CLOSED = range(4)


class TeleportServerConn:
    """The protocol of one teleport server connection (see the module doc).

    ``server`` is a ``httptp.io.teleport_server.TeleportServer``: settings,
    counters, logs, the running-request count and ``dispatch``.
    ``on_close(conn)`` is called once when the connection ends."""

    __slots__ = ("server", "sock", "peer", "conn", "transport", "loop", "state", "inflight",
                 "draining", "on_close", "_hello", "_rw", "_timer", "_batch_timer", "_paused", "_backlog", "_held", "_flush_soon", "_plain_seen", "_level",
                 "__weakref__")

    def __init__(self, server, sock, peer: str, on_close=None):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.on_close = on_close
        # the protocol's side: handshake, codecs, frame reader and limits,
        # which answers are to HEADs
        self.conn = ServerConnection(server.compress, max_header_size=server.max_header_size,
                                     max_body_size=server.max_body_size, level=server.level,
                                     clock=time.monotonic, cpu=time.process_time,
                                     spent=COMPRESS_SPENT)
        self.transport = None
        self.loop = get_hub().loop
        self.state = _HELLO
        self.inflight = 0               # requests dispatched and not answered yet
        self.draining = False
        self._hello = b""
        self._rw = None                 # the hello's read watcher
        self._timer = None              # the handshake deadline, then the idle timeout
        self._batch_timer = None        # -inDelay (made by the first delayed batch)
        self._paused = 0
        self._backlog = False           # a _frames callback is scheduled
        self._held = False              # slices left, held until our writes drain
        self._flush_soon = False        # a _flush callback is scheduled
        self._plain_seen = 0
        self._level = None              # our level, as counted in the gauge

    @property
    def closed(self) -> bool:
        return self.state == _CLOSED

    # -- the hello ----------------------------------------------------------------------

    def start(self) -> None:
        """Read the client's header (from the next loop turn on)."""
        sock = self.sock
        sock.setblocking(False)
        self._timer = Timer(self.server.handshake_timeout)
        self._timer.arm(self._handshake_timeout)
        self._rw = self.loop.io(sock.fileno(), 1)
        self._rw.start(self._on_hello)

    def _on_hello(self) -> None:
        srv = self.server
        q, b = srv._q, srv._base
        try:
            data = self.sock.recv(HEADER_SIZE - len(self._hello))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            q[b + S.IN_READ_ERROR] += 1
            self._close()
            return
        q[b + S.IN_READ_CALLS] += 1
        if not data:
            self._close()               # left before saying anything: not an error
            return
        q[b + S.IN_BYTES_READ] += len(data)
        hello = self._hello = self._hello + data
        if len(hello) < HEADER_SIZE:
            return
        self._stop_hello_watcher()
        try:
            self._handshake(hello)
        except Exception as e:          # a bug: say it once, never leave the socket open
            self._internal_error(e)

    def _stop_hello_watcher(self) -> None:
        if self._rw is not None:
            self._rw.stop()
            self._rw.close()
            self._rw = None

    def _handshake(self, hello: bytes) -> None:
        srv = self.server
        q, b = srv._q, srv._base
        conn = self.conn
        try:
            _, tls = conn.receive_handshake(hello)
        except HandshakeError as e:
            q[b + S.IN_TELEPORT_ERRORS] += 1
            srv._log(f"teleport client {self.peer}: {e}")
            self._close()
            return
        refuse_plain = not tls and srv.tls is not None and not srv.allow_plaintext
        reply = conn.handshake(srv.tls is not None and (tls or refuse_plain))
        try:
            sent = self.sock.send(reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            q[b + S.IN_WRITE_ERROR] += 1
            self._close()
            return
        q[b + S.IN_WRITE_CALLS] += 1
        q[b + S.IN_BYTES_WRITTEN] += sent
        if tls and srv.tls is None:
            srv._log(f"teleport client {self.peer} asked for TLS, which this listener "
                     "does not offer; closing")
            self._close_after(reply[sent:])
            return
        if refuse_plain:
            q[b + S.IN_TELEPORT_ERRORS] += 1
            srv._log(f"teleport client {self.peer} did not ask for TLS, which this "
                     "listener requires (-inTLSAllowPlaintext accepts it); closing")
            self._close_after(reply[sent:])
            return
        if tls:
            self.state = _TLS
            t = self.transport = TLSTransport(
                self.sock, self, q, b, IN, srv.tls.default, server_side=True,
                greenlet_handshake=getattr(srv.tls, "autocert", None) is not None)
        else:
            t = self.transport = Transport(self.sock, self, q, b, IN)
        t.write_timeout = srv.write_timeout     # nothing of our queue went out: cut
        if sent < len(reply):           # a fresh socket takes 15 bytes; if not, queue them
            Transport.write(t, reply[sent:])
        t.start()
        if not tls:
            self._streams()

    def _close_after(self, rest: bytes) -> None:
        """Close once the rest of our header is sent (bounded by the transport)."""
        if not rest:
            self._close()
            return
        t = self.transport = Transport(self.sock, self, self.server._q, self.server._base, IN)
        t.write(rest)
        self._close(orderly=True)

    def handshake_done(self, error) -> None:
        """teleports: the TLS handshake ended."""
        if self.state != _TLS:
            return
        if error is not None:
            srv = self.server
            srv._q[srv._base + S.IN_TLS_HANDSHAKE_ERRORS] += 1
            srv._log(f"teleport client {self.peer}: TLS handshake failed: "
                     f"{tls_error_text(error)}")
            self._close(leave_transport=True)   # it sends our alert, if any, and closes
            return
        self._streams()

    def _handshake_timeout(self) -> None:
        if self.state == _TLS:
            srv = self.server
            srv._q[srv._base + S.IN_TLS_HANDSHAKE_ERRORS] += 1
            srv._log(f"teleport client {self.peer}: TLS handshake failed: handshake timed out")
        self._close()                   # the hello: said nothing (in time), closed silently

    def _streams(self) -> None:
        """The handshake is done: requests from now on."""
        self.state = _FRAMES
        level = self._level = self.conn.compress_level
        if level is not None:               # the gauge: counted until _close
            srv = self.server
            srv._q[srv._base + S.IN_LEVEL_SUM] += level
            srv._q[srv._base + S.IN_LEVEL_LINKS] += 1
        self._timer.disarm()
        if self.draining:
            self._close(orderly=True)
            return
        self._timer.close()
        self._timer = Timer(self.server.read_timeout)
        self._timer.arm(self._idle_timeout)

    # -- reading frames -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state != _FRAMES or self._paused & _DRAIN:
            return
        srv = self.server
        srv._q[srv._base + S.TELEPORT_RECEIVED_COMPRESSED] += len(data)
        self._timer.arm(self._idle_timeout)
        try:
            self.conn.feed(data)
        except TeleportError as e:
            self._failed(e)
            return
        except Exception as e:
            self._internal_error(e)
            return
        if not self._backlog and not self._held:
            self._frames()

    def _frames(self) -> None:
        """Decompress up to YIELD_SLICES slices and dispatch their requests;
        schedule the rest for the next loop turn (reading paused meanwhile)."""
        self._backlog = False
        if self.state != _FRAMES or self._paused & _DRAIN:
            return
        srv = self.server
        q, b = srv._q, srv._base
        conn = self.conn
        next_frames = conn.next_frames
        request = self._request
        try:
            for _ in range(YIELD_SLICES):
                frames = next_frames()
                if frames is None:
                    break
                plain = conn.plain_received
                q[b + S.TELEPORT_RECEIVED_PLAIN] += plain - self._plain_seen
                self._plain_seen = plain
                for req_id, head, body in frames:
                    request(req_id, head, body)
                if self.state != _FRAMES or self._paused & _DRAIN:
                    return
                if self._paused & _WRITES:      # the answers back up: no more requests
                    self._held = True
                    self._pause(_BACKLOG)
                    return
            else:                       # a bomb must not hold the hub
                self._backlog = True
                self._pause(_BACKLOG)
                self.loop.run_callback(self._frames)
                return
        except TeleportError as e:
            self._failed(e)
            return
        except Exception as e:
            self._internal_error(e)
            return
        self._resume(_BACKLOG)

    def _request(self, req_id: int, head, body) -> None:
        srv = self.server
        if body is None:
            self._too_large(req_id, head)
            return
        if srv._busy >= srv.concurrency:
            srv._q[srv._base + S.IN_REQUEST_OVERLOAD] += 1
            self._queue(self.conn.send_response(req_id, 429, b"Too Many Requests", _TEXT_PLAIN,
                                                srv._busy_body))
            return
        srv._busy += 1
        self.inflight += 1
        try:
            srv.dispatch(self, req_id, head, body)
        except Exception as e:          # a bug: dispatch must not raise; answer 500
            srv._log(f"teleport client {self.peer}: internal error: "
                     f"{e.__class__.__name__}: {e}")
            self.respond(req_id, INTERNAL_ERROR)

    def _too_large(self, req_id: int, head) -> None:
        """A request whose Content-Length is over max_body_size: 413 now (its
        body is being skipped by the reader)."""
        srv = self.server
        q, b = srv._q, srv._base
        q[b + S.IN_REQUEST_BAD_REQUEST] += 1
        q[b + S.IN_REQUEST_TOO_LARGE] += 1
        srv._refuse_log(self.peer, (
            f"teleport client {self.peer}: {head.method.decode('latin-1')} "
            f"{head.target[:200].decode('latin-1')}: body of {head.content_length} bytes is over "
            f"the limit of {srv.max_body_size} ({srv.limit_names['body']}); answered 413"))
        err = _TOO_LARGE
        if srv.refused is not None:
            srv.refused(head, self.peer, err.status, len(err.payload))
        self._queue(self.conn.send_response(req_id, err.status, err.reason.encode(),
                                            _TEXT_PLAIN, err.payload))

    # -- answers ------------------------------------------------------------------------

    def respond(self, req_id: int, ans: Answer | None, head=None) -> None:
        """The answer to a dispatched request (call it once per dispatch, from
        the hub or a greenlet; None: none is sent).  ``head``: the request's,
        for the log line of an answer that cannot be framed (it becomes a 500)."""
        srv = self.server
        srv._busy -= 1
        self.inflight -= 1
        if req_id and ans is not None and self.state == _FRAMES:
            conn = self.conn
            try:
                frame = conn.send_response(req_id, ans.status, ans.reason, ans.headers, ans.body)
            except ValueError as e:
                what = ("" if head is None else f" for {head.method.decode('latin-1')} "
                        f"{head.target.decode('latin-1')}")
                srv._log(f"teleport handler failed{what}: {e.__class__.__name__}: {e}")
                a = INTERNAL_ERROR
                frame = conn.send_response(req_id, a.status, a.reason, a.headers, a.body)
            self._queue(frame)
        if self.draining and not self.inflight and self.state == _FRAMES:
            self._close(orderly=True)

    def _queue(self, frame: bytes) -> None:
        """Put a frame into the current batch and see to its flush."""
        if not frame or self.state != _FRAMES:
            return
        try:
            unflushed = self.conn.write(frame)
        except TeleportError:            # sticky: the reader failed and is closing
            return
        if unflushed >= BATCH_BYTES:
            self._flush()
            return
        delay = self.server.delay
        if delay <= 0:
            if not self._flush_soon:
                self._flush_soon = True
                self.loop.run_callback(self._flush)
            return
        timer = self._batch_timer
        if timer is None:
            timer = self._batch_timer = Timer(delay)
        if not timer.armed:
            timer.arm(self._flush)

    def _flush(self) -> None:
        """End a batch: compress it and write it."""
        self._flush_soon = False
        if self._batch_timer is not None:
            self._batch_timer.disarm()
        if self.state != _FRAMES:
            return
        conn = self.conn
        plain = conn.buffered
        if not plain:
            return
        t = self.transport
        try:
            data = conn.flush(t.write_buffer_size > 0)
        except TeleportError:
            self._close()
            return
        srv = self.server
        q, b = srv._q, srv._base
        auto = conn.auto
        if auto is not None and auto.level != self._level:
            q[b + S.IN_LEVEL_SUM] += auto.level - self._level
            self._level = auto.level
            srv._level_changed(self, auto)
        q[b + S.TELEPORT_SENT_PLAIN] += plain
        q[b + S.TELEPORT_SENT_COMPRESSED] += len(data)
        t.write(data)

    # -- flow control -------------------------------------------------------------------

    def _pause(self, why: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if not self._paused & why:
            return
        self._paused &= ~why
        if not self._paused and self.state == _FRAMES:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._pause(_WRITES)

    def resume_writing(self) -> None:
        self._resume(_WRITES)
        if self._held and self.state == _FRAMES:
            self._held = False              # the slices left wait no more
            self._backlog = True
            self.loop.run_callback(self._frames)

    # -- ends ---------------------------------------------------------------------------

    def eof_received(self) -> None:
        self._close(orderly=True)       # the client ended it: ours ends in order too

    def connection_lost(self, text: str) -> None:
        self._close()

    def _idle_timeout(self) -> None:
        self._close(orderly=True)

    def _failed(self, e: TeleportError) -> None:
        srv = self.server
        q, b = srv._q, srv._base
        if isinstance(e, FrameTooLarge):
            q[b + S.IN_REQUEST_TOO_LARGE] += 1
            srv._refuse_log(self.peer, f"teleport client {self.peer}: request "
                            f"{e} ({srv.limit_names[e.what]}); closing the connection")
            self._close(orderly=True)    # our refusal: the TLS session itself is sound
            return
        q[b + S.IN_TELEPORT_ERRORS] += 1
        srv._log(f"teleport client {self.peer}: {error_text(e)}")
        self._close()

    def _internal_error(self, e: Exception) -> None:
        self.server._log(f"teleport client {self.peer}: internal error: "
                         f"{e.__class__.__name__}: {e}")
        self._close()

    def drain(self) -> None:
        """Stop reading requests; close in order once those in flight are answered."""
        if self.draining or self.state == _CLOSED:
            return
        self.draining = True
        if self.state != _FRAMES:
            return                      # closed in order when the handshake ends
        self._pause(_DRAIN)
        if not self.inflight:
            self._close(orderly=True)

    def abort(self) -> None:
        """Close now, dropping anything queued."""
        self._close()

    def _close(self, orderly: bool = False, leave_transport: bool = False) -> None:
        """Close the connection; ``orderly``: flush the batch and what is
        queued first, and on TLS send our close_notify.  ``leave_transport``:
        it is closing itself."""
        if self.state == _CLOSED:
            return
        if orderly and self.state == _FRAMES:
            self._flush()
        self.state = _CLOSED
        if self._level is not None:
            srv = self.server
            srv._q[srv._base + S.IN_LEVEL_SUM] -= self._level
            srv._q[srv._base + S.IN_LEVEL_LINKS] -= 1
            self._level = None
        self._stop_hello_watcher()
        for timer in (self._timer, self._batch_timer):
            if timer is not None:
                timer.close()
        t = self.transport
        if leave_transport:
            pass
        elif t is not None:
            if orderly:
                t.close()
            else:
                t.abort()
        else:
            try:
                self.sock.close()
            except OSError:
                pass
        on_close, self.on_close = self.on_close, None
        self.server._closed(self)
        if on_close is not None:
            on_close(self)

