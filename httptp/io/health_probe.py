"""The health checker's I/O: one check per upstream per round, in greenlets.

Runs in the health helper process only (``httptp.supervisor.helpers``), on
a gevent hub of its own; the bookkeeping is ``httptp.health.Checker``.

* http, https, unix upstreams: a fresh connection per check (as HAProxy's
  checks: a broken dial is seen too), ``GET /path HTTP/1.1`` with
  ``Connection: close``, and only the status line is read.  https uses the
  workers' client context (``-outTLSCA``, ``-outTLSServerName``,
  ``-outTLSCert``...; verification failures are failed checks).
* teleport, teleports upstreams: a teleport request ``GET /path`` on a fresh
  teleport connection (``TeleportClient``, the workers' client, with their
  codec and TLS settings), closed after the answer.

Every check is bounded by ``timeout`` (dial, TLS, request and answer head);
a round waits for all of its checks, then the next round starts
``interval`` after the previous one started (at once if the round took
longer).
"""

from __future__ import annotations

import re
import socket as _socket
import time

import gevent
from gevent import socket as gsocket

from httptp import __version__
from httptp.errors import GatewayTimeout, UpstreamError
from httptp.health import Checker, Target, Verdict, verdict_for_status
from httptp.io.transport import os_error_text
from httptp.tls import error_text as tls_error_text

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?:[ \r]|$)")
MAX_STATUS_LINE = 8192


class CheckTimeout(Exception):
    """The check got no full answer head within the timeout."""


class HTTPProbe:
    """``GET path`` over a fresh http, https or unix connection."""

    def __init__(self, path: str, timeout: float, tls_context=None, server_name: str = ""):
        self.path = path.encode("ascii")
        self.timeout = timeout
        self.tls = tls_context          # a gevent-cooperative client context, or None
        self.server_name = server_name  # -outTLSServerName; "" → the address's host

    def __call__(self, address) -> Verdict:
        try:
            with gevent.Timeout(self.timeout, CheckTimeout):
                return self._check(address)
        except CheckTimeout:
            return Verdict(False, 0, f"no answer within {self.timeout:g} s")
        except OSError as err:
            return Verdict(False, 0, _error_text(err))

    def _check(self, address) -> Verdict:
        sock = self._connect(address)
        try:
            host = str(address) if address.kind == "tcp" else "localhost"
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: httptp-health/%s\r\n"
                         b"Accept: */*\r\nConnection: close\r\n\r\n"
                         % (self.path, host.encode("ascii", "replace"), __version__.encode()))
            return self._status(sock)
        finally:
            sock.close()

    def _connect(self, address):
        if address.kind == "unix":
            sock = gsocket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                sock.connect(address.sockaddr())
            except BaseException:
                sock.close()
                raise
            return sock
        sock = gsocket.create_connection((address.host, address.port))
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.server_name or address.host)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _status(sock) -> Verdict:
        buf = b""
        while b"\n" not in buf:
            data = sock.recv(4096)
            if not data:
                return Verdict(False, 0, "connection closed before an answer"
                               if not buf else "answer cut short")
            buf += data
            if len(buf) > MAX_STATUS_LINE:
                break
        match = _STATUS_LINE.match(buf)
        if match is None:
            return Verdict(False, 0, "answered something that is not HTTP/1.x")
        return verdict_for_status(int(match.group(1)))


class TeleportProbe:
    """A teleport request ``GET path`` on a fresh teleport connection."""

    def __init__(self, path: str, timeout: float, *, compress: int, max_header_size: int,
                 max_body_size: int, tls_context=None, server_name: str = ""):
        self.path = path.encode("ascii")
        self.timeout = timeout
        self.compress = compress
        self.max_header_size, self.max_body_size = max_header_size, max_body_size
        self.tls = tls_context          # stdlib context: the transport does the I/O
        self.server_name = server_name

    def __call__(self, address) -> Verdict:
        from httptp.io.teleport_client import TeleportClient
        client = TeleportClient(address, compress=self.compress, dial_timeout=self.timeout,
                                max_header_size=self.max_header_size,
                                max_body_size=self.max_body_size, tls_context=self.tls,
                                server_hostname=self.server_name or None)
        host = (str(address) if address.kind == "tcp" else "localhost").encode("ascii", "replace")
        try:
            resp = client.request(b"GET", self.path, [(b"Host", host),
                                                      (b"User-Agent", b"httptp-health")],
                                  b"", time.monotonic() + self.timeout)
        except GatewayTimeout:
            return Verdict(False, 0, f"no answer within {self.timeout:g} s")
        except (UpstreamError, ValueError, OSError) as err:
            return Verdict(False, 0, str(err) or type(err).__name__)
        finally:
            client.close()
        return verdict_for_status(resp.head.status)


def _error_text(err: OSError) -> str:
    import ssl
    if isinstance(err, (ssl.SSLError, ssl.CertificateError)):
        return f"TLS: {tls_error_text(err)}"
    if isinstance(err, _socket.gaierror):
        return f"cannot resolve: {err.strerror or err}"
    return os_error_text(err)


def check_round(checker: Checker, probe, timeout: float) -> int:
    """Check every target once, concurrently; return how many were checked."""
    targets = checker.targets()
    jobs = [(t, gevent.spawn(_timed, probe, t)) for t in targets]
    gevent.joinall([g for _, g in jobs], timeout=timeout + 5.0)
    for target, greenlet in jobs:
        if greenlet.successful():
            verdict, sent, ended = greenlet.value
        else:                   # a bug in a probe, or a check stuck past its own timeout
            greenlet.kill(block=False)
            now = time.monotonic()
            verdict, sent, ended = Verdict(False, 0, _failure(greenlet)), now, now
        checker.record(target, verdict, sent, ended)
    return len(targets)


def _timed(probe, target: Target):
    sent = time.monotonic()
    try:
        verdict = probe(target.address)
    except Exception as exc:    # a bug, not the upstream's fault: a failed check, no traceback
        verdict = Verdict(False, 0, f"check failed: {type(exc).__name__}: {exc}")
    return verdict, sent, time.monotonic()


def _failure(greenlet) -> str:
    exc = greenlet.exception
    if exc is None:
        return "check did not finish"
    return f"check failed: {type(exc).__name__}: {exc}"


def run(checker: Checker, probe, interval: float, timeout: float,
        rounds: int | None = None) -> None:
    """Check every ``interval`` seconds, forever (or ``rounds`` times)."""
    next_at = time.monotonic()
    done = 0
    while rounds is None or done < rounds:
        check_round(checker, probe, timeout)
        done += 1
        next_at += interval
        now = time.monotonic()
        if next_at < now:
            next_at = now
        if rounds is None or done < rounds:
            gevent.sleep(next_at - now)
