"""The teleport listener side: settings, counters and dispatch for its connections.

Theory of operation
-------------------
A ``TeleportServer`` holds what every connection of one listener shares: the
codec, ``-inDelay``, the limits and timeouts, the counters and logs, the
count of requests running (``busy``, capped by ``concurrency``: 429 beyond)
and the live connections, for ``drain``.  Each accepted socket becomes a
``TeleportServerConn`` (``httptp.io.teleport_serverconn``), a protocol
driven by callbacks on gevent's loop: no greenlet per connection.

``start(sock, peer, on_close)`` serves a socket from the hub and returns at
once (the worker's accept watcher); ``handle(sock, peer)`` serves it and
returns when the connection has ended (a greenlet per connection, as the
library's ``Server`` and older callers use it).

Dispatch: each request frame goes to ``dispatch(conn, req_id, head, body)``,
which must answer it exactly once with ``conn.respond(req_id, answer)``.

* The worker passes its own ``dispatch``: a proxy exchange driven by
  callbacks (``httptp.io.pipeline.TeleportAnswer``), no greenlet per request.
* By default (the library API), ``handler(head, body, peer) -> Answer``
  runs in a greenlet of its own, so it may block cooperatively; an
  exception becomes a 500 and one log line.  Handler greenlets are kept for
  the next request once they finish (up to ``MAX_IDLE_HANDLERS`` per
  server): a new greenlet costs ~7 us on CPython 3.11 (its first frame maps
  a fresh data stack chunk, which is unmapped again when it dies), a parked
  one is woken for ~1 us.

``drain`` stops reading on every connection; each one closes in order once
its requests in flight are answered and flushed.
"""

from __future__ import annotations

import socket as _stdsocket

import gevent
import gevent.event
from gevent import get_hub
from gevent.hub import Waiter
from greenlet import greenlet as _RawGreenlet

from httptp.io.common import counters
from httptp.io.teleport_serverconn import INTERNAL_ERROR, Answer, TeleportServerConn
from httptp.logs import RateLimitedLog
from httptp.teleport.codecs import AUTO, check_level
from httptp.teleport.handshake import BY_NAME, Compress

__all__ = ["Answer", "INTERNAL_ERROR", "TeleportServer", "TeleportServerConn"]

MAX_IDLE_HANDLERS = 128     # parked handler greenlets kept per server (~7 KiB each)


class TeleportServer:
    """Serves teleport connections handed to ``start`` or ``handle`` (PROTOCOL.md §1).

    ``handler(head, body, peer) -> Answer`` answers each request in a
    greenlet, unless ``dispatch(conn, req_id, head, body)`` is given (see
    the module doc).  ``tls``: a ``httptp.tls.ServerTLS`` (teleports) or
    None."""

    def __init__(self, handler, *, compress: int | str = Compress.FLATE, level=None,
                 delay: float = 0.0,
                 concurrency: int = 10000, max_header_size: int = 4096,
                 max_body_size: int = 4 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, handshake_timeout: float = 3.0, stats=None,
                 block: int | None = None, log=None, tls=None, allow_plaintext: bool = False,
                 refusals: RateLimitedLog | None = None, refused=None,
                 limit_names: dict | None = None, dispatch=None, debug=None):
        self.handler = handler
        #: dispatch(conn, req_id, head, body): answer with conn.respond(req_id, answer)
        self.dispatch = dispatch if dispatch is not None else self._dispatch
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
        #: None (the codec's default), a level, or "auto" (httptp.teleport.autolevel);
        #: a number needs a fixed codec
        self.level = level
        if level is not None:
            if self.compress is not None:
                check_level(self.compress, level)
            elif level != AUTO:
                raise ValueError("a numeric compression level needs a fixed codec, "
                                 "not compress='auto'")
        self.debug = debug                # debug(msg): level changes (auto)
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
        self._conns: set[TeleportServerConn] = set()
        self._idle: list[Waiter] = []     # parked handler greenlets, each waiting for a job
        self._empty = None                # wait_closed's event
        self.draining = False

    def _log(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def _level_changed(self, conn: TeleportServerConn, auto) -> None:
        """auto moved the level of ``conn``'s responses."""
        if self.debug is not None:
            self.debug(f"teleport client {conn.peer}: compression level now {auto.level} "
                       f"({auto.reason})")

    def _refuse_log(self, peer: str, msg: str) -> None:
        if self.refusals is not None:
            self.refusals.say(("too large", peer.rsplit(":", 1)[0]), msg)

    # -- handler greenlets ---------------------------------------------------
    def _dispatch(self, conn: TeleportServerConn, req_id: int, head, body: bytes) -> None:
        """Run ``handler`` for one request in a handler greenlet of its own,
        started from the hub as ``gevent.spawn_raw`` would: a parked one if
        there is one."""
        job = (conn, req_id, head, body)
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
            self._run(conn, req_id, head, body)
            conn = head = body = None
            if len(idle) >= MAX_IDLE_HANDLERS:
                return
            if waiter is None:
                waiter = Waiter(get_hub())
            else:
                waiter.clear()
            idle.append(waiter)
            job = waiter.get()

    def _run(self, conn: TeleportServerConn, req_id: int, head, body: bytes) -> None:
        ans = INTERNAL_ERROR
        try:
            ans = self.handler(head, body, conn.peer)
        except gevent.GreenletExit:
            conn.respond(req_id, None)      # killed: no answer
            raise
        except Exception as e:
            self._log(f"teleport handler failed for {head.method.decode('latin-1')} "
                      f"{head.target.decode('latin-1')}: {e.__class__.__name__}: {e}")
        conn.respond(req_id, ans, head)

    @property
    def busy(self) -> int:
        """Requests running now."""
        return self._busy

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- connections ---------------------------------------------------------
    def start(self, sock, peer: str, on_close=None) -> TeleportServerConn | None:
        """Serve ``sock`` from the hub; return at once.  ``on_close(conn)`` is
        called when the connection ends.  None (the socket closed) while
        draining."""
        if self.draining:
            sock.close()
            return None
        if type(sock) is not _stdsocket.socket:        # a gevent socket: take its fd
            sock = _stdsocket.socket(sock.family, sock.type, fileno=sock.detach())
        conn = TeleportServerConn(self, sock, peer, on_close)
        self._conns.add(conn)
        conn.start()
        return conn

    def handle(self, sock, peer: str) -> None:
        """Serve one accepted connection until it ends; the socket is closed
        on return (also when the calling greenlet is killed)."""
        done = gevent.event.Event()
        conn = self.start(sock, peer, lambda conn: done.set())
        if conn is None:
            return
        try:
            done.wait()
        finally:
            conn.abort()

    def _closed(self, conn: TeleportServerConn) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait (in a greenlet) until no connection is left: True, or False
        when ``timeout`` passed first."""
        if not self._conns:
            return True
        if self._empty is None:
            self._empty = gevent.event.Event()
        self._empty.clear()
        return self._empty.wait(timeout)

    def abort(self) -> None:
        """Close every connection now (what is queued is dropped)."""
        for conn in list(self._conns):
            conn.abort()

    def drain(self) -> None:
        """Stop reading new frames on every connection; each one closes once its
        requests in flight are answered and flushed.  Returns at once;
        ``handle`` calls return as their connections finish."""
        self.draining = True
        for conn in list(self._conns):
            conn.drain()
