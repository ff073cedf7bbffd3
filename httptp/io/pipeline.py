"""The in → out wiring: one request in, one upstream exchange out, one response.

``Proxy.forward`` is the whole request path after parsing (DESIGN.md §4):
request policy → balancer pick → upstream exchange (bounded by ``-outTimeout``)
→ balancer release → response policy → encoded bytes.  It never raises for an
expected failure: upstream errors become 502, timeouts 504, each counted.
"""

from __future__ import annotations

import math
import time


from httptp import stats as S
from httptp.balancer import Balancer
from httptp.errors import (BadGateway, BadRequest, GatewayTimeout, ProxyError, ResponseTooLarge,
                           UpstreamError)
from httptp.http import policy, writer
from httptp.http.host import upstream_target
from httptp.io.http_client import HTTPUpstream, Response
from httptp.io.teleport_server import Answer
from httptp.io.timers import Deadline
from httptp.logs import RateLimitedLog

# RFC 9110 §9.2.2: safe to send twice.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))
_KEEP_ALIVE = (b"Connection", b"keep-alive")
# A Go teleport peer never reads a body after GET or HEAD (PROTOCOL.md §1.4):
# the stream would lose sync, so such a request is refused here.
_NO_BODY_OVER_TELEPORT = frozenset((b"GET", b"HEAD"))
_TEXT_PLAIN = [(b"Content-Type", b"text/plain; charset=utf-8")]
_MAX_SPARE_TIMERS = 1024


def _teleport_refuses(head, no_host: bool, body: bytes) -> str | None:
    """Why a request cannot cross a teleport link to a Go peer, or None."""
    if body and head.method in _NO_BODY_OVER_TELEPORT:
        return "a GET or HEAD request with a body cannot be sent over teleport"
    if no_host:
        return "a request without Host cannot be sent over teleport"
    return None


def _origin_form(method: bytes, target: bytes, headers: list) -> tuple[bytes | None, list]:
    """What goes upstream for a target that is not origin-form: for an
    absolute-form one, its origin-form with its authority as Host (RFC 9112
    §3.2.2: the client's Host, valid but overruled, is replaced), which is
    what nginx sends with ``proxy_pass http://up`` and ``proxy_set_header
    Host $host``; ``*`` as is.  ``(None, headers)`` for a target httptp does
    not serve."""
    upstream = upstream_target(method, target)
    if upstream is None:
        return None, headers
    target, authority = upstream
    if authority is not None:
        headers = policy.set_host(headers, authority)
    return target, headers


class _UpstreamTimeout(Exception):
    """Raised by the exchange Deadline: -outTimeout passed."""


class Proxy:
    def __init__(self, config, stats, block: int, upstream_ids: list[int], parser_module, log,
                 tls=None, access_log=None, refusals: RateLimitedLog | None = None):
        self.config = config
        self.log = log
        # responses over -outMax*Size: logged whatever -logAllErrors says,
        # rate-limited per upstream (the worker's heartbeat flushes it)
        self.refusals = refusals if refusals is not None else RateLimitedLog(log)
        self.access_log = access_log
        # https/teleports out: the master's client context (already cooperative)
        self.tls_context = tls.client if tls is not None else None
        self.tls_server_name = tls.server_name if tls is not None else ""
        self._q = stats.q
        self._base = stats.block_base(block)
        self.timeout = config.out_timeout
        n_out = len(config.upstreams)
        # -concurrency bounds upstream connections as the original does
        # (MaxConns per address = ceil(concurrency / len(out))), shared out
        # between the workers.
        per_addr = math.ceil(config.concurrency / n_out)
        per_worker = max(1, math.ceil(per_addr / max(1, config.workers)))
        self.out_teleport = config.out_type in ("teleport", "teleports")
        self.upstreams = [self._upstream(addr, per_worker, stats, block, parser_module)
                          for addr in config.upstreams]
        self.balancer = Balancer(stats, block, list(upstream_ids),
                                 max_fails=config.out_max_fails,
                                 fail_timeout=config.out_fail_timeout)
        self.client_ip_header = config.client_ip_header.encode("latin-1") or None
        self._single = len(self.upstreams) == 1
        self._log_errors = config.log_all_errors
        self._spare_timers: list[Deadline] = []   # for callers without their own (teleport in)

    def _upstream(self, addr, per_worker: int, stats, block: int, parser_module):
        cfg = self.config
        if self.out_teleport:
            from httptp.io.teleport_upstream import TeleportUpstream
            from httptp.teleport.handshake import BY_NAME
            conns = cfg.out_conns_per_addr
            return TeleportUpstream(addr, conns=conns, compress=BY_NAME[cfg.out_compress],
                                    delay=cfg.out_delay,
                                    max_pending=max(2, math.ceil(per_worker / conns) + 1),
                                    max_header_size=cfg.out_max_header_size,
                                    max_body_size=cfg.out_max_body_size, stats=stats,
                                    block=block, log=self.log, tls_context=self.tls_context,
                                    server_hostname=self._server_name(addr))
        return HTTPUpstream(addr, parser_module=parser_module,
                            max_header_size=cfg.out_max_header_size,
                            max_body_size=cfg.out_max_body_size, max_conns=per_worker,
                            idle_timeout=cfg.out_idle_timeout, stats=stats, block=block,
                            tls_context=self.tls_context,
                            server_hostname=self._server_name(addr))

    def _server_name(self, addr) -> str | None:
        """SNI and verification name: -outTLSServerName, else the -out host."""
        if self.tls_context is None:
            return None
        return self.tls_server_name or (addr.host if addr.kind == "tcp" else None)

    def exchange_timer(self) -> Deadline:
        """A -outTimeout timer for one client connection to re-arm per request."""
        return Deadline(self.timeout, _UpstreamTimeout)

    def forward(self, head, body: bytes, client_ip: bytes | None, keep_alive: bool,
                timer: Deadline | None = None) -> tuple[bytes, bool]:
        """HTTP in: proxy one request; return (response bytes, keep the client
        connection).  ``timer``: this connection's ``exchange_timer()``."""
        resp = self.proxy(head, body, client_ip, None, timer)
        if resp.__class__ is not Response:
            keep_alive = keep_alive and head.version != b"1.0"  # the cached answers say no keep-alive
            return writer.error_response(resp, keep_alive), keep_alive
        rh = resp.head
        out_headers = policy.forward_response_headers(rh.headers)
        if keep_alive and head.version == b"1.0":
            out_headers.append(_KEEP_ALIVE)   # HTTP/1.0 keeps a connection only when told
        if head.method == b"HEAD":
            data = writer.response(rh.status, rh.reason, out_headers, b"", keep_alive,
                                   content_length=rh.content_length)
        else:
            data = writer.response(rh.status, rh.reason, out_headers, resp.body, keep_alive)
        return data, keep_alive

    def answer(self, head, body: bytes, client_ip: bytes | None, peer: bytes | None = None) -> Answer:
        """Teleport in: proxy one request; the answer is framed by the teleport
        server, always with the Content-Length of the bytes it carries (a HEAD
        answer carries none: PROTOCOL.md §1.9)."""
        resp = self.proxy(head, body, client_ip, peer)
        if resp.__class__ is not Response:
            return self.answer_error(resp)
        rh = resp.head
        return Answer(rh.status, rh.reason, policy.forward_response_headers(rh.headers),
                      b"" if head.method == b"HEAD" else resp.body)

    @staticmethod
    def answer_error(err: ProxyError) -> Answer:
        return Answer(err.status, err.reason.encode("latin-1"), _TEXT_PLAIN, err.payload)

    def proxy(self, head, body: bytes, client_ip: bytes | None, peer: bytes | None = None,
              timer: Deadline | None = None):
        """The upstream Response, or the ProxyError to answer with; counted and
        access-logged either way (``peer`` names the client in the log when no
        client-IP header is to be set, e.g. a teleport peer)."""
        q, b = self._q, self._base
        headers = policy.forward_request_headers(head.headers, self.client_ip_header, client_ip)
        target = head.target
        if target[:1] != b"/":          # absolute-form, or OPTIONS *
            target, headers = _origin_form(head.method, target, headers)
            if target is None:          # a teleport frame: the HTTP parsers refuse these
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
                return BadRequest(f"unsupported request-target {head.target[:40]!r}")
        # only HTTP/1.0 may come without Host; we speak HTTP/1.1 upstream,
        # where it is required: over http it gets the upstream's (nginx's
        # $proxy_host), over teleport it is refused
        no_host = head.version == b"1.0" and not any(n.lower() == b"host" for n, _ in headers)
        if self.out_teleport:
            refused = _teleport_refuses(head, no_host, body)
            if refused:
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
                return BadRequest(refused)
        add_host = no_host and not self.out_teleport
        try:
            resp = self._exchange(head.method, target, headers, body, timer, add_host)
        except ProxyError as err:
            if err.status == 504:
                q[b + S.IN_REQUEST_TIMEOUT_ERROR] += 1
            else:
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
            if self.access_log is not None:
                self.access_log.log(client_ip or peer, head, err.status, len(err.payload),
                                    err.upstream, err.upstream_time)
            return err
        q[b + S.IN_REQUEST_SUCCESS] += 1
        if resp.head.status != 200:
            q[b + S.IN_REQUEST_NON200] += 1
        if self.access_log is not None:
            self.access_log.log(client_ip or peer, head, resp.head.status,
                                0 if head.method == b"HEAD" else len(resp.body),
                                resp.upstream, resp.upstream_time)
        return resp

    def _exchange(self, method: bytes, target: bytes, headers: list, body: bytes,
                  timer: Deadline | None = None, add_host: bool = False) -> Response:
        """Pick, exchange, release; retry an idempotent request once elsewhere."""
        deadline = time.monotonic() + self.timeout
        idempotent = method in IDEMPOTENT
        tried = set()
        own_timer = timer is None
        if own_timer:       # a Deadline arms on whichever greenlet calls: any spare one will do
            spare = self._spare_timers
            timer = spare.pop() if spare else self.exchange_timer()
        timer.arm()
        try:
            while True:
                lease = self.balancer.pick(tried)
                upstream = self.upstreams[lease.index]
                t0 = time.monotonic()
                try:
                    resp = upstream.exchange(method, target,
                                             headers + [(b"Host", upstream.host)] if add_host
                                             else headers, body, deadline, idempotent)
                except UpstreamError as e:
                    # too large: the upstream answered, it is not failing
                    too_large = e.__class__ is ResponseTooLarge
                    lease.release(too_large, time.monotonic() - t0)
                    tried.add(lease.index)
                    if too_large:
                        self.refusals.say(("too large", upstream.name),
                                          f"upstream {upstream.name}: {e}; answered 502")
                    elif self._log_errors:
                        self.log(f"upstream {upstream.name}: {e}")
                    if (idempotent and e.sent_nothing_back and len(tried) == 1
                            and not self._single):
                        continue
                    raise _from(BadGateway(str(e)), upstream, t0) from None
                except (_UpstreamTimeout, GatewayTimeout):
                    lease.release(False, time.monotonic() - t0)
                    if self._log_errors:
                        self.log(f"upstream {upstream.name}: timed out after {self.timeout}s")
                    raise _from(GatewayTimeout(), upstream, t0) from None
                except BaseException:
                    lease.release(False, time.monotonic() - t0)
                    raise
                elapsed = time.monotonic() - t0
                lease.release(True, elapsed)
                resp.upstream, resp.upstream_time = upstream.name, elapsed
                return resp
        finally:
            timer.disarm()
            if own_timer:
                if len(self._spare_timers) < _MAX_SPARE_TIMERS:
                    self._spare_timers.append(timer)
                else:
                    timer.close()

    def close(self) -> None:
        for u in self.upstreams:
            u.close()
        while self._spare_timers:
            self._spare_timers.pop().close()


def _from(err: ProxyError, upstream, t0: float) -> ProxyError:
    """``err`` with the upstream it came from, for the access log."""
    err.upstream, err.upstream_time = upstream.name, time.monotonic() - t0
    return err
