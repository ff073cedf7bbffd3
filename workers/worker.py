"""One worker process: accept on the inherited listener and proxy until drained.

The master forks us and calls ``run`` in the child.  Everything gevent is
created here, after the fork (the master never has a hub).  We install our own
signal handlers through gevent:

* TERM: graceful drain: stop accepting (the master keeps the listening socket
  open, so connections still queued on it go to the next worker of this slot),
  close idle keep-alive connections, let in-flight requests finish with
  ``Connection: close``, exit 0 when none is left or ``-gracefulTimeout`` passed;
* QUIT: exit at once;
* INT and HUP: ignored (Ctrl-C reaches the whole process group; the master decides);
* USR1: reopen the access log (logrotate);
* the master going away (our parent pid changes) drains us too.

A heartbeat greenlet writes the time into our shared-memory block every second;
the master kills a worker whose heartbeat stops (a wedged hub).  The same beat
picks up a new set of upstream addresses (discovery: Proxy.refresh_upstreams).

A worker that cannot boot (anything before it reports ready fails: the access
log will not open, a module will not import...) writes one line naming the
cause and exits with ``WORKER_BOOT_ERROR`` (3); the master then decides
whether to respawn it, stop, or abort a reload.
"""

from __future__ import annotations

import math
import os
import signal
import socket as _stdsocket
import time

import gevent
import gevent.event
from gevent import socket

from httptp import stats as S
from httptp.errors import MethodNotAllowed, ServiceUnavailable
from httptp.http import writer
from httptp.http.parser import select_backend
from httptp.certstore import offers_acme_tls
from httptp.io.http_server import ClientConn, Listener
from httptp.io.sockio import close_tls, readable
from httptp.io.pipeline import Proxy
from httptp.io.transport import IN, TLSTransport, Transport
from httptp.logs import ERROR, INFO, WARNING, AccessLog, RateLimitedLog, error_logger
from httptp.netaddr import AllowList
from httptp.settings import ADDR_TYPE
from httptp.supervisor.procs import WORKER_BOOT_ERROR, report_boot_error
from httptp.tls import error_text as tls_error_text


HEARTBEAT_INTERVAL = 1.0
_ACCEPT_BATCH = 32          # connections accepted per readable event of the listener


class Worker:
    def __init__(self, config, listener, stats, block: int, slot: int, generation: int,
                 upstream_ids: list[int], tls=None):
        self.config = config
        if tls is not None:
            # the server contexts stay stdlib ones (https and teleports run
            # SSLObjects over memory BIOs); the client's is made cooperative
            # for what runs in greenlets (teleports upstreams)
            tls.for_worker(server_sockets=False)
        self.tls = tls
        self.server_tls = tls.server if tls is not None else None
        self.stats = stats
        self.block = block
        self.base = stats.block_base(block)
        self.slot = slot
        self.generation = generation
        self.log = error_logger(f"worker {slot}", config.log_format, ERROR)
        # refusals an operator must see, whatever -logAllErrors says: the
        # first at once, then a count a minute (flushed by the heartbeat)
        self.refusals = RateLimitedLog(self.log)
        self.access_log = AccessLog(config.access_log, config.log_format) if config.access_log else None
        self.parser_module = select_backend(config.http_parser)
        self.proxy = Proxy(config, stats, block, upstream_ids, self.parser_module, self.log,
                           tls=tls, access_log=self.access_log, refusals=self.refusals)
        self.get_only = config.in_get_only
        self.log_all_errors = config.log_all_errors
        self.is_unix = listener.family == _stdsocket.AF_UNIX
        # checked at accept, before any byte is read; None: nothing to check
        self.allow = (AllowList.from_networks(config.in_allow_ip)
                      if config.in_allow_ip and not self.is_unix else None)
        self.max_conns = max(1, math.ceil(config.concurrency / max(1, config.workers)))
        self.teleport = self._teleport_server() if ADDR_TYPE[config.in_type].teleport else None
        # every listener type: callbacks on the loop, an accept watcher
        self.listener = _stdsocket.socket(listener.family, listener.type,
                                          fileno=listener.detach())
        self.listener.setblocking(False)
        self.conns: set = set()    # teleport, teleports: TeleportServerConn
        self.clients: set = set()  # http, https, unix: ClientConn
        self.ctx = Listener(self)
        self._accept_watcher = None
        self._backoff = 0.0
        self._backoff_timer = None
        self.draining = False
        self._ppid = os.getppid()
        self._done = gevent.event.Event()

    def _teleport_server(self):
        from httptp.io.teleport_server import TeleportServer
        from httptp.teleport.handshake import BY_NAME
        cfg = self.config
        compress = cfg.in_compress if cfg.in_compress == "auto" else BY_NAME[cfg.in_compress]
        # -concurrency caps running requests (429 beyond), as the original's
        # teleport server does; split between the workers.
        return TeleportServer(None, dispatch=self._teleport_dispatch, compress=compress,
                              level=cfg.in_compress_level,
                              delay=cfg.in_delay,
                              concurrency=self.max_conns, max_header_size=cfg.in_max_header_size,
                              max_body_size=cfg.in_max_body_size,
                              stats=self.stats, block=self.block, log=self.log,
                              tls=self.server_tls,
                              allow_plaintext=cfg.in_tls_allow_plaintext,
                              refusals=self.refusals, refused=self._teleport_refused,
                              limit_names={"header": "-inMaxHeaderSize",
                                           "body": "-inMaxBodySize"})

    def _teleport_dispatch(self, conn, req_id: int, head, body: bytes) -> None:
        """One request from a teleport peer, from the hub: an exchange whose
        answer goes back to ``conn.respond``.  -clientIPHeader is not touched:
        the peer is the other httptp, and the first hop already set it."""
        self.stats.q[self.base + S.IN_REQUEST_START] += 1
        if self.get_only and head.method != b"GET":
            conn.respond(req_id, self.proxy.answer_error(MethodNotAllowed()), head)
            return
        self.proxy.answer_async(head, body, None, conn.peer.encode("ascii", "replace"),
                                conn.respond, req_id)

    def _teleport_refused(self, head, peer: str, status: int, size: int) -> None:
        """A teleport request httptp answered itself (413): its access-log line."""
        if self.access_log is not None:
            self.access_log.log(peer.encode("ascii", "replace"), head, status, size, "", 0.0)

    # -- lifecycle -------------------------------------------------------------

    def boot(self) -> None:
        """The end of the boot, after ``__init__``: our signal handlers (this
        creates the hub)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gevent.signal_handler(signal.SIGTERM, self.drain)
        gevent.signal_handler(signal.SIGQUIT, self._quit)
        gevent.signal_handler(signal.SIGUSR1, self._reopen_logs)

    def serve(self) -> int:
        """Ready: heartbeat, accept and serve until drained; returns 0."""
        stats, block = self.stats, self.block
        stats.set_state(block, S.STATE_READY)
        stats.beat(block, time.monotonic())
        beat = gevent.spawn(self._heartbeat)
        self._accept_watcher = gevent.get_hub().loop.io(self.listener.fileno(), 1)
        self._accept_watcher.start(self._on_accept)
        rotate = gevent.spawn(self.server_tls.rotate_forever) if self.server_tls else None
        self._done.wait()
        beat.kill(block=False)
        if rotate is not None:
            rotate.kill(block=False)
        self.proxy.close()
        return 0

    def _reopen_logs(self) -> None:
        """USR1 (logrotate): reopen the access log; stderr belongs to the master."""
        if self.access_log is not None:
            try:
                self.access_log.reopen()
            except OSError as e:
                self.log(f"cannot reopen the access log {self.access_log.path}: {e.strerror}")

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.stats.set_state(self.block, S.STATE_DRAINING)
        self._stop_accepting()
        try:
            self.listener.close()   # our copy; the master's keeps the queue alive
        except OSError:
            pass
        if self.teleport is not None:
            self.teleport.drain()   # stop reading frames; answer what is in flight
        self._close_idle()
        gevent.spawn(self._finish_drain)

    def _close_idle(self) -> None:
        """Close keep-alive connections that wait for a request.  One whose next
        request already sits in the socket buffer is left to be served (with
        ``Connection: close``) instead of being cut mid-race."""
        for conn in list(self.clients):
            if conn.idle and not conn.gone and not readable(conn.transport.sock):
                conn.close()            # between requests: https ends with close_notify

    def _finish_drain(self) -> None:
        deadline = time.monotonic() + self.config.graceful_timeout
        while (self.conns or self.clients) and time.monotonic() < deadline:
            self._close_idle()
            gevent.sleep(0.05)
        left = len(self.conns) + len(self.clients)
        if left:
            self.log(f"graceful timeout: closing {left} connection(s)", WARNING)
            for conn in list(self.clients):
                conn.close(orderly=False)
            for conn in list(self.conns):
                conn.abort()
        gevent.sleep(0)         # let the last writes' callbacks run
        self._done.set()

    def _quit(self) -> None:
        os._exit(0)

    def _heartbeat(self) -> None:
        stats, block = self.stats, self.block
        while True:
            stats.beat(block, time.monotonic())
            self.refusals.flush()
            try:
                self.proxy.refresh_upstreams()  # discovery: a new set of addresses
            except Exception as e:              # a bug: keep the old set, keep beating
                self.refusals.say("upstream set", f"upstream set not updated: "
                                  f"{e.__class__.__name__}: {e}")
            if os.getppid() != self._ppid and not self.draining:
                self.drain()            # first: the log below may fail with the master gone
                self.log("master went away; draining", INFO)
            if self.server_tls is not None:
                self.server_tls.flush_logs()      # counts of rate-limited autocert refusals
            gevent.sleep(HEARTBEAT_INTERVAL)

    # -- accepting -------------------------------------------------------------

    def _log_refused(self, ip: str) -> None:
        """A peer outside -inAllowIP: each one with -logAllErrors, else the
        first per address at once and then a count per minute."""
        message = f"connection from {ip} refused by -inAllowIP"
        if self.log_all_errors:
            self.log(message)
        else:
            self.refusals.say(("-inAllowIP", ip), message)

    def _stop_accepting(self) -> None:
        if self._accept_watcher is not None:
            self._accept_watcher.stop()
            self._accept_watcher.close()
            self._accept_watcher = None
        if self._backoff_timer is not None:
            self._backoff_timer.stop()
            self._backoff_timer.close()
            self._backoff_timer = None

    def _on_accept(self) -> None:
        """The listener is readable: accept what is queued (a bounded batch)."""
        q, b = self.stats.q, self.base
        listener = self.listener
        allow = self.allow
        for _ in range(_ACCEPT_BATCH):
            if self.draining:
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                self._backoff = 0.0
                return
            except OSError as e:
                q[b + S.IN_ACCEPT_ERROR] += 1
                self.log(f"accept failed: {e}")
                self._pause_accepting()
                return
            q[b + S.IN_ACCEPT_SUCCESS] += 1
            if self.is_unix:
                client_ip = b"0.0.0.0"
            else:
                ip = addr[0]
                if allow is not None and not allow.allows(ip):
                    q[b + S.IN_CONNS_REJECTED_BY_ALLOW_LIST] += 1
                    self._log_refused(ip)
                    sock.close()
                    continue
                client_ip = ip.encode("ascii")
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            if self.teleport is not None:
                # no cap on connections: -concurrency counts running requests
                conn = self.teleport.start(sock, client_ip.decode("ascii"),
                                           self._teleport_closed)
                if conn is not None:
                    self.conns.add(conn)
                    q[b + S.IN_CONNS] += 1
                continue
            if len(self.clients) >= self.max_conns:
                q[b + S.IN_REQUEST_OVERLOAD] += 1
                self._refuse(sock, client_ip)
                continue
            conn = ClientConn(self.ctx, client_ip)
            if self.server_tls is None:
                conn.transport = Transport(sock, conn, q, b, IN)
            else:
                conn.transport = TLSTransport(
                    sock, conn, q, b, IN, self.server_tls.default, server_side=True,
                    sniff=lambda data, conn=conn: self._sniff(conn, data),
                    greenlet_handshake=self.server_tls.autocert is not None)
            self.clients.add(conn)
            q[b + S.IN_CONNS] += 1
            conn.start()

    def _pause_accepting(self) -> None:
        """Accept failed (EMFILE...): try again after a growing pause."""
        self._backoff = min(1.0, self._backoff * 2 or 0.005)
        self._accept_watcher.stop()
        if self._backoff_timer is not None:
            self._backoff_timer.close()
        self._backoff_timer = gevent.get_hub().loop.timer(self._backoff)
        self._backoff_timer.start(self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._accept_watcher is not None and not self.draining:
            self._accept_watcher.start(self._on_accept)

    def conn_closed(self, conn) -> None:
        """A client connection ended (ClientConn calls it once)."""
        if conn in self.clients:
            self.clients.discard(conn)
            self.stats.q[self.base + S.IN_CONNS] -= 1

    def tls_failed(self, client_ip: bytes, error) -> None:
        self.stats.q[self.base + S.IN_TLS_HANDSHAKE_ERRORS] += 1
        if self.log_all_errors:
            self.log(f"client {client_ip.decode()}: TLS handshake failed: "
                     f"{tls_error_text(error)}")

    def _sniff(self, conn, data: bytes) -> bool:
        """The first bytes on an https connection: a TLS handshake goes on;
        plain HTTP gets nginx's 400; an ACME TLS-ALPN validation is answered
        by a greenlet (its SNI callback may wait for the certificate)."""
        if data[:1] != b"\x16":                  # not a TLS handshake record
            sock = conn.transport.detach()
            conn._closed()
            self.stats.q[self.base + S.IN_TLS_HANDSHAKE_ERRORS] += 1
            failed = "not a TLS handshake"
            if data[:1].isalpha():
                failed = "plain HTTP request on the https port"
                try:
                    sock.recv(65536)                # consume the request: no reset on close
                    sock.send(_PLAIN_HTTP_ON_HTTPS)
                    sock.shutdown(_stdsocket.SHUT_WR)
                except OSError:
                    pass
            sock.close()
            if self.log_all_errors:
                self.log(f"client {conn.client_ip.decode()}: TLS handshake failed: {failed}")
            return False
        if self.server_tls.autocert is not None and offers_acme_tls(data):
            sock = conn.transport.detach()
            conn._closed()
            gsock = socket.socket(sock.family, sock.type, fileno=sock.detach())
            gevent.spawn(self._acme_challenge, gsock, conn.client_ip)
            return False
        return True

    def _acme_challenge(self, sock, client_ip: bytes) -> None:
        """A TLS-ALPN-01 validation: the handshake is the answer."""
        tls_sock = self._tls_accept(sock, client_ip)
        if tls_sock is not None:
            close_tls(tls_sock)
        else:
            sock.close()

    def _teleport_closed(self, conn) -> None:
        """A teleport connection ended (its on_close, called once)."""
        if conn in self.conns:
            self.conns.discard(conn)
            self.stats.q[self.base + S.IN_CONNS] -= 1

    def _refuse(self, sock, client_ip: bytes) -> None:
        """Over -concurrency: answer 503 and close without reading the request
        (on an https port after the TLS handshake, so the client can read it,
        followed by our close_notify)."""
        _Refusal(self, sock, client_ip)

    def _tls_accept(self, sock, client_ip: bytes):
        """https: the TLS handshake, bounded by -inHeaderTimeout.  None (counted,
        closed by the caller, no traceback) when it fails: a scanner, a timeout,
        or plain HTTP on the https port, which gets nginx's 400 first."""
        q, b = self.stats.q, self.base
        deadline = time.monotonic() + self.config.in_header_timeout
        failed = None
        tls_sock = None
        try:
            sock.settimeout(self.config.in_header_timeout)
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return None                     # connected and left: not an error
            if first != b"\x16":               # not a TLS handshake record
                failed = "not a TLS handshake"
                if first.isalpha():
                    failed = "plain HTTP request on the https port"
                    sock.settimeout(1.0)
                    sock.recv(65536)            # consume the request: no reset on close
                    sock.sendall(_PLAIN_HTTP_ON_HTTPS)
                    sock.shutdown(socket.SHUT_WR)
                return None
            if self.server_tls.autocert is not None and offers_acme_tls(
                    sock.recv(4096, socket.MSG_PEEK)):
                tls_sock = self.server_tls.wrap_challenge(sock)   # a TLS-ALPN-01 validation
            else:
                tls_sock = self.server_tls.wrap(sock)
            tls_sock.settimeout(max(0.001, deadline - time.monotonic()))
            tls_sock.do_handshake()
            tls_sock.settimeout(None)
            return tls_sock
        except (OSError, ValueError) as e:      # ssl.SSLError, timeouts, resets
            failed = tls_error_text(e)
            return None
        finally:
            if failed is not None:
                if tls_sock is not None:
                    tls_sock.close()
                q[b + S.IN_TLS_HANDSHAKE_ERRORS] += 1
                if self.log_all_errors:
                    self.log(f"client {client_ip.decode()}: TLS handshake failed: {failed}")


class _Refusal:
    """The protocol of a connection over -concurrency: 503, then close (after
    the TLS handshake on https), all within -inHeaderTimeout."""

    __slots__ = ("transport", "timer")

    def __init__(self, worker: Worker, sock, client_ip: bytes):
        q, b = worker.stats.q, worker.base
        if worker.server_tls is None:
            self.transport = Transport(sock, self, q, b, IN)
        else:
            self.transport = TLSTransport(sock, self, q, b, IN, worker.server_tls.default,
                                          server_side=True)
        self.timer = gevent.get_hub().loop.timer(worker.config.in_header_timeout)
        self.timer.start(self._end)
        self.transport.start()
        if worker.server_tls is None:
            self.handshake_done(None)

    def handshake_done(self, error) -> None:
        if error is not None:
            self._end()
            return
        self.transport.write(writer.error_response(ServiceUnavailable(), False))
        self.transport.write_eof()
        if self.transport.half_close:
            self.transport.pause_reading()
            self.transport.close()
        self.timer.stop()
        self.timer.close()

    def _end(self) -> None:
        self.timer.stop()
        self.timer.close()
        self.transport.abort()

    def data_received(self, data) -> None:
        pass

    def eof_received(self) -> None:
        self.transport.close()

    def connection_lost(self, text) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    resume_writing = pause_writing


_PLAIN_HTTP_BODY = b"The plain HTTP request was sent to HTTPS port\n"
_PLAIN_HTTP_ON_HTTPS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_PLAIN_HTTP_BODY)
                        + _PLAIN_HTTP_BODY)


def run(config, listener, stats, block: int, slot: int, generation: int,
        upstream_ids: list[int], tls=None) -> int:
    """Entry point in the forked child; returns the exit status: 0 after a
    drain, or ``WORKER_BOOT_ERROR`` (after one line on stderr naming the cause)
    if anything before serving failed, so the master does not respawn a
    configuration that cannot boot for ever.  ``tls`` is the master's
    ``httptp.tls.TLS`` (contexts built before the fork), or None."""
    try:
        worker = Worker(config, listener, stats, block, slot, generation, upstream_ids, tls)
        worker.boot()
    except Exception as e:
        report_boot_error(slot, generation, e, config.log_format)
        return WORKER_BOOT_ERROR
    return worker.serve()
