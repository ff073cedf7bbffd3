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
the master kills a worker whose heartbeat stops (a wedged hub).

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
from httptp.io.http_client import readable
from httptp.io.http_server import ClientConnection
from httptp.io.sockio import close_tls
from httptp.io.pipeline import Proxy
from httptp.logs import AccessLog, RateLimitedLog, error_logger
from httptp.netaddr import AllowList
from httptp.supervisor.procs import WORKER_BOOT_ERROR, report_boot_error
from httptp.tls import error_text as tls_error_text


HEARTBEAT_INTERVAL = 1.0


class Worker:
    def __init__(self, config, listener, stats, block: int, slot: int, generation: int,
                 upstream_ids: list[int], tls=None):
        self.config = config
        if tls is not None:
            tls.for_worker()          # gevent-cooperative sockets from the master's contexts
        self.tls = tls
        self.server_tls = tls.server if tls is not None else None
        self.stats = stats
        self.block = block
        self.base = stats.block_base(block)
        self.slot = slot
        self.generation = generation
        self.log = error_logger(f"worker {slot}", config.log_format)
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
        self.teleport = self._teleport_server() if config.in_type in ("teleport", "teleports") else None
        self.listener = socket.socket(listener.family, listener.type, fileno=listener.detach())
        self.conns: dict = {}      # greenlet -> ClientConnection (None: a teleport connection)
        self.draining = False
        self._ppid = os.getppid()
        self._done = gevent.event.Event()

    def _teleport_server(self):
        from httptp.io.teleport_server import TeleportServer
        from httptp.teleport.handshake import BY_NAME
        cfg = self.config
        compress = cfg.in_compress if cfg.in_compress == "auto" else BY_NAME[cfg.in_compress]
        # -concurrency caps running handlers (429 beyond), as the original's
        # teleport server does; split between the workers.
        return TeleportServer(self._teleport_request, compress=compress, delay=cfg.in_delay,
                              concurrency=self.max_conns, max_header_size=cfg.in_max_header_size,
                              max_body_size=cfg.in_max_body_size,
                              stats=self.stats, block=self.block, log=self.log,
                              tls=self.server_tls,
                              allow_plaintext=cfg.in_tls_allow_plaintext,
                              refusals=self.refusals, refused=self._teleport_refused,
                              limit_names={"header": "-inMaxHeaderSize",
                                           "body": "-inMaxBodySize"})

    def _teleport_request(self, head, body: bytes, peer: str):
        """One request from a teleport peer.  -clientIPHeader is not touched: the
        peer is the other httptp, and the first hop already set it."""
        self.stats.q[self.base + S.IN_REQUEST_START] += 1
        if self.get_only and head.method != b"GET":
            return self.proxy.answer_error(MethodNotAllowed())
        return self.proxy.answer(head, body, None, peer.encode("ascii", "replace"))

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
        acceptor = gevent.spawn(self._accept_loop)
        rotate = gevent.spawn(self.server_tls.rotate_forever) if self.server_tls else None
        self._done.wait()
        acceptor.kill(block=False)
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
        for g, conn in list(self.conns.items()):
            if conn is not None and conn.idle and not readable(conn.sock):
                conn.orderly = True     # between requests: https ends with close_notify
                g.kill(block=False)

    def _finish_drain(self) -> None:
        deadline = time.monotonic() + self.config.graceful_timeout
        while self.conns and time.monotonic() < deadline:
            self._close_idle()
            gevent.sleep(0.05)
        if self.conns:
            self.log(f"graceful timeout: closing {len(self.conns)} connection(s)")
            gevent.killall(list(self.conns), block=True, timeout=1)
        self._done.set()

    def _quit(self) -> None:
        os._exit(0)

    def _heartbeat(self) -> None:
        stats, block = self.stats, self.block
        while True:
            stats.beat(block, time.monotonic())
            self.refusals.flush()
            if os.getppid() != self._ppid and not self.draining:
                self.drain()            # first: the log below may fail with the master gone
                self.log("master went away; draining")
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

    def _accept_loop(self) -> None:
        q, b = self.stats.q, self.base
        listener = self.listener
        allow = self.allow
        backoff = 0.0
        while not self.draining:
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if self.draining:
                    return
                q[b + S.IN_ACCEPT_ERROR] += 1
                self.log(f"accept failed: {e}")
                backoff = min(1.0, backoff * 2 or 0.005)
                gevent.sleep(backoff)
                continue
            backoff = 0.0
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
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            g = gevent.Greenlet(self._handle, sock, client_ip)
            if self.teleport is not None:
                self.conns[g] = None     # -concurrency counts its handlers instead
            elif len(self.conns) >= self.max_conns:
                q[b + S.IN_REQUEST_OVERLOAD] += 1
                gevent.spawn(self._refuse, sock, client_ip)
                continue
            else:
                self.conns[g] = ClientConnection(sock, client_ip, self)
            g.start()

    def _handle(self, sock, client_ip) -> None:
        g = gevent.getcurrent()
        q, b = self.stats.q, self.base
        q[b + S.IN_CONNS] += 1
        try:
            conn = self.conns[g]
            if conn is None:
                self.teleport.handle(sock, client_ip.decode("ascii"))
            elif self.server_tls is None:
                conn.serve()
            else:
                tls_sock = self._tls_accept(sock, client_ip)
                if tls_sock is not None:
                    sock = conn.sock = tls_sock
                    conn.serve()
        except gevent.GreenletExit:
            pass
        except Exception as e:  # a bug: log it once, never show the client a traceback
            self.log(f"internal error: {e.__class__.__name__}: {e}")
        finally:
            q[b + S.IN_CONNS] -= 1
            del self.conns[g]
            if self.server_tls is not None and conn is not None and conn.orderly:
                close_tls(sock)         # a raw socket (no handshake) is just closed
            else:
                sock.close()


    def _refuse(self, sock, client_ip: bytes) -> None:
        """Over -concurrency: answer 503 and close without reading the request
        (on an https port after the TLS handshake, so the client can read it,
        followed by our close_notify)."""
        tls = self.server_tls is not None
        if tls:
            tls_sock = self._tls_accept(sock, client_ip)
            if tls_sock is None:
                sock.close()
                return
            sock = tls_sock
        try:
            sock.settimeout(1.0)
            sock.sendall(writer.error_response(ServiceUnavailable(), False))
            if tls:
                close_tls(sock)
                return
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

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
