"""The teleport listener side: serve multiplexed requests on accepted connections.

Theory of operation
-------------------
The caller (the worker, or ``httptp.io.teleport_api.Server``) accepts a
connection and calls ``TeleportServer.handle(sock, peer)`` in the
connection's greenlet.  That greenlet

1. reads the client's 15-byte header within ``handshake_timeout`` (a peer that
   says nothing is closed silently), then writes ours: our codec, or the
   client's with ``compress="auto"``.  TLS (PROTOCOL.md §1.2, §2):

   * no ``tls`` (a plain ``teleport`` listener), client flag 1: we answer
     flag 0 and close, as the original does;
   * ``tls`` given, client flag 1: we answer flag 1 and run the server side of
     the TLS handshake, still within ``handshake_timeout``; both compression
     streams then run inside TLS;
   * ``tls`` given, client flag 0: the original accepts plaintext here; we do
     only with ``allow_plaintext`` (-inTLSAllowPlaintext).  Otherwise we
     answer flag 1 ("this listener needs TLS": a client of ours reports that),
     log one line and close;
2. starts a writer greenlet (``httptp.io.common.BatchWriter``: the same
   batching as the client, ``-inDelay``) and becomes the reader: recv → the
   connection's ``ServerConnection`` (``httptp.teleport.connection``: it
   decompresses in slices, and we yield to other connections every
   ``YIELD_SLICES`` of them) → request frames;
3. for each request frame runs the handler in a greenlet of its own; the
   answer is encoded with the request's id by the connection (no body for a
   HEAD, 1xx, 204 or 304) and queued to the writer, so responses go out in
   completion order.  Handler greenlets are kept for the
   next request once they finish (up to ``MAX_IDLE_HANDLERS`` per server):
   a new greenlet costs ~7 us on CPython 3.11 (its first frame maps a fresh
   data stack chunk, which is unmapped again when it dies), a parked one is
   woken for ~1 us.  Id 0 is fire-and-forget: the handler
   runs, nothing is written.  When ``concurrency`` handlers are already running
   the request is answered at once with 429 and never reaches the handler.

Size limits (``max_header_size``, ``max_body_size``: -inMaxHeaderSize and
-inMaxBodySize in a worker) are the frame reader's: a request whose
Content-Length is over the limit is answered 413 at once and its body skipped
as it arrives; a header block or a chunked body over a limit closes the
connection.  Each refusal is counted (``inRequestTooLarge``) and logged with
the peer's address, rate-limited per peer (``refusals``), and reported to
``refused(head, peer, status, size)`` when given (the worker's access log).

An idle connection ends silently after ``read_timeout``.  Any IO, codec or
framing error closes the connection; answers of handlers still running on it
are dropped (the handlers themselves finish).  ``drain`` stops reading on every
connection, lets the running handlers finish and their answers flush, then
closes.  The idle and the drain ends are orderly: on TLS they send our
close_notify (``sockio.close_tls``); errors just close.
"""

from __future__ import annotations

import socket as _stdsocket

import gevent
import gevent.event
from gevent import get_hub
from gevent.hub import Waiter
from greenlet import greenlet as _RawGreenlet

from httptp import stats as S
from httptp.errors import PayloadTooLarge
from httptp.io.common import (RECV_SIZE, YIELD_SLICES, BatchWriter, Closed, TimedOut,
                              counters, error_text, read_exactly)
from httptp.io.sockio import close_tls
from httptp.logs import RateLimitedLog
from httptp.teleport import FrameTooLarge, HandshakeError, TeleportError
from httptp.teleport.connection import ServerConnection
from httptp.teleport.handshake import BY_NAME, Compress, HEADER_SIZE
from httptp.tls import error_text as tls_error_text

MAX_IDLE_HANDLERS = 128     # parked handler greenlets kept per server (~7 KiB each)
_TEXT_PLAIN = [(b"Content-Type", b"text/plain; charset=utf-8")]


class Answer:
    """What a handler returns: ``reason`` bytes, ``headers`` a list of
    ``(bytes, bytes)`` without hop-by-hop headers or Content-Length (the
    encoder frames the body), ``body`` bytes (b"" for HEAD)."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: bytes, headers: list, body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


INTERNAL_ERROR = Answer(500, b"Internal Server Error", _TEXT_PLAIN, b"internal error\n")
_TOO_LARGE = PayloadTooLarge()


class _PeerClosed(Closed):
    """The client closed its side (EOF, not an error)."""


class _Drain(Exception):
    """Thrown into a connection's reader: stop reading, finish, close."""


class _Conn:
    __slots__ = ("server", "sock", "peer", "conn", "reader", "writer", "inflight", "reading",
                 "closed", "draining", "idle")

    def __init__(self, server: TeleportServer, sock, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        # the protocol's side: handshake, codecs, frame reader and limits,
        # which answers are to HEADs
        self.conn = ServerConnection(server.compress, max_header_size=server.max_header_size,
                                     max_body_size=server.max_body_size)
        self.reader = None
        self.writer: BatchWriter | None = None
        self.inflight = 0                 # handlers running for this connection
        self.reading = True
        self.closed = False
        self.draining = False
        self.idle = gevent.event.Event()  # set when inflight drops to 0 while draining

    def serve(self) -> None:
        srv = self.server
        q, b = srv._q, srv._base
        sock = self.sock
        sock.settimeout(None)
        # -- handshake -----------------------------------------------------------
        conn = self.conn
        timer = gevent.Timeout(srv.handshake_timeout, TimedOut("handshake timed out"))
        timer.start()
        try:
            try:
                data = read_exactly(sock, HEADER_SIZE)
            except OSError:
                q[b + S.IN_READ_ERROR] += 1
                return
            q[b + S.IN_READ_CALLS] += 1
            q[b + S.IN_BYTES_READ] += HEADER_SIZE
            try:
                _, tls = conn.receive_handshake(data)
            except HandshakeError as e:
                q[b + S.IN_TELEPORT_ERRORS] += 1
                srv._log(f"teleport client {self.peer}: {e}")
                return
            refuse_plain = not tls and srv.tls is not None and not srv.allow_plaintext
            reply = conn.handshake(srv.tls is not None and (tls or refuse_plain))
            try:
                sock.sendall(reply)
            except OSError:
                q[b + S.IN_WRITE_ERROR] += 1
                return
            q[b + S.IN_WRITE_CALLS] += 1
            q[b + S.IN_BYTES_WRITTEN] += HEADER_SIZE
            if tls and srv.tls is None:
                srv._log(f"teleport client {self.peer} asked for TLS, which this listener "
                         "does not offer; closing")
                return
            if refuse_plain:
                q[b + S.IN_TELEPORT_ERRORS] += 1
                srv._log(f"teleport client {self.peer} did not ask for TLS, which this "
                         "listener requires (-inTLSAllowPlaintext accepts it); closing")
                return
            if tls:
                tls_sock = None
                try:
                    tls_sock = srv.tls.wrap(sock)
                    tls_sock.do_handshake()
                except (OSError, ValueError, TimedOut) as e:
                    q[b + S.IN_TLS_HANDSHAKE_ERRORS] += 1
                    srv._log(f"teleport client {self.peer}: TLS handshake failed: "
                             f"{tls_error_text(e)}")
                    if tls_sock is not None:
                        tls_sock.close()
                    return
                sock = self.sock = tls_sock
        except (TimedOut, Closed):
            return                       # said nothing (in time): close silently
        finally:
            timer.close()
        if self.draining:
            self._close(orderly=True)
            return
        # -- streams ---------------------------------------------------------------
        sock.settimeout(srv.read_timeout)
        writer = self.writer = BatchWriter(sock, conn, delay=srv.delay,
                                           write_timeout=srv.write_timeout, q=q, base=b,
                                           in_calls=True)
        # The reader runs in a greenlet of its own so that drain() and a failed
        # write can interrupt it (kill) without throwing into our caller's greenlet.
        rg = self.reader = gevent.spawn(self._reader)
        wg = gevent.spawn(self._write, writer)
        orderly = False
        try:
            rg.join()
            if self.draining and not self.closed:
                # let the handlers finish, flush their answers, then close
                if self.inflight:
                    self.idle.wait()
                if not self.closed:
                    writer.stop()
                    wg.join()
                    orderly = True      # both greenlets are done with the socket
        finally:
            self.reading = False
            rg.kill(block=False)
            wg.kill(block=False)
            self._close(orderly)

    def _reader(self) -> None:
        try:
            self._read()
        except _Drain:
            pass
        except (_stdsocket.timeout, TimeoutError):
            self._close(orderly=True)    # idle for read_timeout
        except _PeerClosed:
            self._close(orderly=True)    # the client ended it: ours ends in order too
        except Closed:
            self._close()
        except FrameTooLarge as e:
            srv = self.server
            srv._q[srv._base + S.IN_REQUEST_TOO_LARGE] += 1
            srv._refuse_log(self.peer, f"teleport client {self.peer}: request "
                            f"{e} ({srv.limit_names[e.what]}); closing the connection")
            self._close(orderly=True)    # our refusal: the TLS session itself is sound
        except (OSError, TeleportError) as e:
            if isinstance(e, TeleportError):
                srv = self.server
                srv._q[srv._base + S.IN_TELEPORT_ERRORS] += 1
            self.server._log(f"teleport client {self.peer}: {error_text(e)}")
            self._close()
        except Exception as e:           # a bug: say it once, never leave the socket open
            self.server._log(f"teleport client {self.peer}: internal error: "
                             f"{e.__class__.__name__}: {e}")
            self._close()
        finally:
            self.reading = False

    def _read(self) -> None:
        srv = self.server
        q, b = srv._q, srv._base
        sock, conn = self.sock, self.conn
        feed, next_frames = conn.feed, conn.next_frames
        plain_seen = conn.plain_received
        dispatch = srv._dispatch
        while not self.draining:
            try:
                data = sock.recv(RECV_SIZE)
            except (_stdsocket.timeout, TimeoutError):
                raise
            except OSError:
                q[b + S.IN_READ_ERROR] += 1
                raise Closed() from None
            q[b + S.IN_READ_CALLS] += 1
            if not data:
                raise _PeerClosed()
            q[b + S.IN_BYTES_READ] += len(data)
            q[b + S.TELEPORT_RECEIVED_COMPRESSED] += len(data)
            feed(data)
            slices = 0
            while (frames := next_frames()) is not None:
                plain = conn.plain_received
                q[b + S.TELEPORT_RECEIVED_PLAIN] += plain - plain_seen
                plain_seen = plain
                for req_id, head, body in frames:
                    if body is None:
                        self._too_large(req_id, head)
                        continue
                    if srv._busy >= srv.concurrency:
                        q[b + S.IN_REQUEST_OVERLOAD] += 1
                        self._answer(conn.send_response(req_id, 429, b"Too Many Requests",
                                                        _TEXT_PLAIN, srv._busy_body))
                        continue
                    srv._busy += 1
                    self.inflight += 1
                    dispatch((self, req_id, head, body))
                slices += 1
                if slices == YIELD_SLICES:      # a bomb must not hold the hub
                    slices = 0
                    gevent.sleep(0)

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
        self._answer(self.conn.send_response(req_id, err.status, err.reason.encode(),
                                             _TEXT_PLAIN, err.payload))

    def _answer(self, frame: bytes) -> None:
        """Queue an answer's frame (none for id 0) unless the connection ended."""
        if frame and not self.closed:
            self.writer.put(frame)

    def _run(self, req_id: int, head, body: bytes) -> None:
        srv = self.server
        conn = self.conn
        frame = b""
        try:
            try:
                ans = srv.handler(head, body, self.peer)
                if req_id and not self.closed:
                    # no body for HEAD, 1xx, 204, 304: the connection knows
                    frame = conn.send_response(req_id, ans.status, ans.reason, ans.headers,
                                               ans.body)
            except gevent.GreenletExit:
                raise
            except Exception as e:
                srv._log(f"teleport handler failed for {head.method.decode('latin-1')} "
                         f"{head.target.decode('latin-1')}: {e.__class__.__name__}: {e}")
                a = INTERNAL_ERROR
                frame = conn.send_response(req_id, a.status, a.reason, a.headers, a.body)
        finally:
            srv._busy -= 1
            self.inflight -= 1
            if not self.inflight and self.draining:
                self.idle.set()
        self._answer(frame)

    def _write(self, writer: BatchWriter) -> None:
        try:
            writer.run()
        except (OSError, TimedOut, TeleportError):
            # TeleportError: the connection's sticky error (the reader failed
            # and is closing it)
            self._close()
            if self.reading:
                self.reader.kill(Closed, block=False)

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        if not self.inflight:
            self.idle.set()
        if self.reading and self.reader is not None:
            self.reader.kill(_Drain, block=False)

    def _close(self, orderly: bool = False) -> None:
        """Close the connection; ``orderly``: TLS sends our close_notify first."""
        if self.closed:
            return
        self.closed = True
        self.idle.set()
        if orderly:
            close_tls(self.sock)
            return
        try:
            self.sock.close()
        except OSError:
            pass


class TeleportServer:
    """Serves teleport connections handed to ``handle`` (PROTOCOL.md §1)."""

    def __init__(self, handler, *, compress: int | str = Compress.FLATE, delay: float = 0.0,
                 concurrency: int = 10000, max_header_size: int = 4096,
                 max_body_size: int = 4 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, handshake_timeout: float = 3.0, stats=None,
                 block: int | None = None, log=None, tls=None, allow_plaintext: bool = False,
                 refusals: RateLimitedLog | None = None, refused=None,
                 limit_names: dict | None = None):
        self.handler = handler
        self.tls = tls                    # httptp.tls.ServerTLS (teleports) or None
        self.allow_plaintext = allow_plaintext
        if isinstance(compress, str):
            if compress == "auto":
                self.compress = None
            else:
                try:
                    self.compress = BY_NAME[compress]
                except KeyError:
                    raise ValueError(f"unknown teleport compression {compress!r}: want auto or "
                                     f"one of {', '.join(BY_NAME)}") from None
        else:
            self.compress = Compress(compress)
        self.delay = delay
        self.concurrency = concurrency
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        # refusals over a limit: logged rate-limited per peer address (the
        # owner calls refusals.flush() now and then for the counts)
        self.refusals = refusals if refusals is not None else (
            RateLimitedLog(log) if log is not None else None)
        self.refused = refused            # refused(head, peer, status, size): an access log
        self.limit_names = limit_names or {"header": "max_header_size",
                                           "body": "max_body_size"}
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.log = log
        self._q, self._base = counters(stats, block)
        self._busy = 0
        self._busy_body = (f"concurrency limit of {concurrency} exceeded; raise -concurrency or "
                           "reduce the load\n").encode()
        self._conns: set[_Conn] = set()
        self._idle: list[Waiter] = []     # parked handler greenlets, each waiting for a job
        self.draining = False

    def _log(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def _refuse_log(self, peer: str, msg: str) -> None:
        if self.refusals is not None:
            self.refusals.say(("too large", peer.rsplit(":", 1)[0]), msg)

    # -- handler greenlets ---------------------------------------------------
    def _dispatch(self, job: tuple) -> None:
        """Run ``conn._run(req_id, head, body)`` for ``job = (conn, req_id,
        head, body)`` in a handler greenlet of its own, started from the hub
        as ``gevent.spawn_raw`` would: a parked one if there is one."""
        idle = self._idle
        if idle:
            waiter = idle.pop()
            waiter.hub.loop.run_callback(waiter.switch, job)
        else:
            hub = get_hub()
            hub.loop.run_callback(_RawGreenlet(self._handle_jobs, hub).switch, job)

    def _handle_jobs(self, job: tuple) -> None:
        """A handler greenlet: run a job, then park until the next one, or
        end when enough greenlets are parked already."""
        idle = self._idle
        waiter = None
        while True:
            conn, req_id, head, body = job
            job = None                   # hold no request while parked
            conn._run(req_id, head, body)
            conn = head = body = None
            if len(idle) >= MAX_IDLE_HANDLERS:
                return
            if waiter is None:
                waiter = Waiter(get_hub())
            else:
                waiter.clear()
            idle.append(waiter)
            job = waiter.get()

    @property
    def busy(self) -> int:
        """Handlers running now."""
        return self._busy

    @property
    def connections(self) -> int:
        return len(self._conns)

    def handle(self, sock, peer: str) -> None:
        """Serve one accepted connection until it ends; the socket is closed on return."""
        if self.draining:
            sock.close()
            return
        conn = _Conn(self, sock, peer)
        self._conns.add(conn)
        try:
            conn.serve()
        finally:
            self._conns.discard(conn)
            conn._close()

    def drain(self) -> None:
        """Stop reading new frames on every connection; each one closes once its
        running handlers have finished and their answers are flushed.  Returns at
        once; ``handle`` calls return as their connections finish."""
        self.draining = True
        for conn in list(self._conns):
            conn.drain()
