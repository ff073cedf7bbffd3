"""The in → out wiring: one request in, one upstream exchange out, streamed back.

Theory of operation
-------------------
``Proxy.begin`` applies the request policy (hop-by-hop headers, the client-IP
header, origin-form, what teleport cannot carry) and returns an ``Exchange``,
or the ``ProxyError`` to answer with.  The exchange is the request's whole
trip (DESIGN.md §4): balancer pick → a connection from the upstream's pool →
the request head and its body as it arrives → the response, handed to the
*downstream* (the client connection, ``httptp.io.http_server``) as it comes →
balancer release, counters, access log.  Everything runs in loop callbacks:
no greenlet per request.

The downstream is any object with::

    response_whole(head, body, exchange)     a whole response (one write)
    response_head(head, exchange)            the head of a streamed one ...
    response_data(data)                      ... its body as it comes ...
    response_end()                           ... and its end
    response_error(err, head_sent)           a ProxyError: its answer, or (after
                                             the head went out) a cut connection
    response_upgraded(head, rest, exchange)  a 101: a tunnel from now on
    tunnel_data(data) / tunnel_eof()         bytes from the upstream in a tunnel
    pause_reading() / resume_reading()       the upstream cannot take the body as fast
    tls_info()                               (TLS version, SNI name) or None: access log

and it gives the exchange ``body_data``/``body_end`` (the request body),
``pause_response``/``resume_response`` (its own writes back up), ``abort``
(the client left) and, in a tunnel, ``tunnel_send``/``tunnel_send_eof``.

Errors: every upstream driver raises or reports only ``UpstreamError`` (with
``sent_nothing_back``) and the exchange's timer reports the timeout; this
module alone maps them to answers (``_answer``: 502, 504).  Until the
response head went out, a failure is answered; after it, the client
connection is cut (a 502 can no longer be sent).

Retries: an idempotent request whose whole body was there at the start (so
it can be sent again) goes once more, before any response byte reached the
client: on a fresh connection when a reused one failed before answering (a
keep-alive race), and to another upstream when one failed without answering.

``-outTimeout`` bounds the wait for the response head, then each wait for
response body bytes (nginx's proxy_read_timeout); it does not run while the
client is the slow side (its writes back up).  While a request body streams
up it runs only while we wait on the upstream (for a connection, or for it to
take the body: its write buffer is full and does not drain), as nginx's
proxy_send_timeout; not while we wait on the client for more body (its
``-inIdleTimeout`` does), so a long upload that keeps moving is not cut.

Teleport out (``-outType=teleport``): frames are whole messages, so the
request body is collected first (bounded by -inMaxBodySize), then
``TeleportExchange`` sends it with the teleport client's ``request_async``
and answers from its callback, in the hub as well.  Teleport in:
``Proxy.answer_async`` (the worker's teleport listener) starts an exchange
from the hub whose downstream, a ``TeleportAnswer``, collects the whole
response (bounded by -outMaxBodySize) and hands the connection its
``Answer``.

Discovery (-out names, ``httptp.discovery``): the upstreams are the listed
entries of the shared table, not the -out list.  ``refresh_upstreams`` (the
worker's heartbeat, every second) reads the table's generation and, when it
changed, builds a new upstream list and balancer in one step of the hub: an
upstream still listed keeps its object (and its pooled connections), a new
address gets one, a removed one is retired (no new request: it is not in the
new balancer; in-flight exchanges hold their upstream and lease and finish;
its connections close as they come back).  A retry after the swap may pick
the upstream it already tried (``tried`` holds positions of the old list).
"""

from __future__ import annotations

import math
import os
import re
import time
from bisect import bisect_left
from functools import partial

from httptp import stats as S
from httptp.balancer import EJECTED, REVIVED, STILL_DOWN, Balancer
from httptp.discovery import uses_discovery
from httptp.errors import (BadGateway, BadRequest, GatewayTimeout, NoUpstreamUp, ProxyError,
                           ResponseTooLarge, UpgradeNotSupported, UpstreamError)
from httptp.http import policy, writer
from httptp.http.events import Response, ResponseHead
from httptp.http.host import upstream_target
from httptp.http.rules import status_has_body
from httptp.io.http_client import HTTPUpstream
from httptp.io.teleport_serverconn import INTERNAL_ERROR, Answer
from httptp.io.timers import Timer
from httptp.io.transport import HIGH_WATER, tls_info
from httptp.logs import INFO, WARNING, RateLimitedLog, say
from httptp.netaddr import parse_address
from httptp.settings import ADDR_TYPE

# RFC 9110 §9.2.2: safe to send twice.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))
# A Go teleport peer never reads a body after GET or HEAD (PROTOCOL.md §1.4):
# the stream would lose sync, so such a request is refused here.
_NO_BODY_OVER_TELEPORT = frozenset((b"GET", b"HEAD"))
_TEXT_PLAIN = [(b"Content-Type", b"text/plain; charset=utf-8")]
_MAX_REPLAY = 1 << 20           # the largest request kept to be sent again
_MAX_SPARE_TIMERS = 1024
# a request id taken as it comes (-requestIDHeader); any other value is replaced
_NONE_TRIED = frozenset()
_VALID_REQUEST_ID = re.compile(rb"[0-9A-Za-z._:+/=@-]{1,128}")


def _teleport_refuses(head, no_host: bool, has_body: bool) -> str | None:
    """Why a request cannot cross a teleport link to a Go peer, or None."""
    if has_body and head.method in _NO_BODY_OVER_TELEPORT:
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


def upgrade_token(headers: list) -> bytes | None:
    """The ``Upgrade`` value of a request that asks for one (``Connection:
    upgrade`` and ``Upgrade: websocket``), else None."""
    value = None
    for name, v in headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            value = v
    if value is None or value.strip().lower() != b"websocket":
        return None
    if b"upgrade" not in policy.connection_tokens(headers):
        return None
    return value.strip()


class Proxy:
    def __init__(self, config, stats, block: int, upstream_ids: list[int], parser_module, log,
                 tls=None, access_log=None, refusals: RateLimitedLog | None = None):
        self.config = config
        self.log = log
        # responses over -outMax*Size: logged whatever -logAllErrors says,
        # rate-limited per upstream (the worker's heartbeat flushes it)
        self.refusals = refusals if refusals is not None else RateLimitedLog(log)
        self._pending_event = None      # an ejection waiting for its reason (_upstream_event)
        self.access_log = access_log
        self.tls_context = tls.client if tls is not None else None
        self.tls_server_name = tls.server_name if tls is not None else ""
        self.q = stats.q
        self.d = stats.d
        self.base = stats.block_base(block)
        self.timeout = config.out_timeout
        n_out = len(config.upstreams)
        # -concurrency bounds upstream connections as the original does
        # (MaxConns per address = ceil(concurrency / len(out))), shared out
        # between the workers.
        per_addr = math.ceil(config.concurrency / n_out)
        per_worker = max(1, math.ceil(per_addr / max(1, config.workers)))
        self.out_teleport = ADDR_TYPE[config.out_type].teleport
        self.stats, self.block = stats, block
        self._parser_module = parser_module
        self._retiring: list = []               # (upstream, close-by time)
        self.dynamic = uses_discovery(config)
        if self.dynamic:
            self._generation = -1
            self._names: list[tuple[int, str]] = []
            self.upstreams, self.balancer = [], None
            for _ in range(1000):               # the table is being written: try again
                if self.refresh_upstreams():
                    break
                os.sched_yield()
            else:
                raise RuntimeError("no upstream listed in the shared table")
        else:
            self.upstreams = [self._upstream(addr, per_worker, stats, block, parser_module)
                              for addr in config.upstreams]
            self.balancer = Balancer(stats, block, list(upstream_ids),
                                     max_fails=config.out_max_fails,
                                     fail_timeout=config.out_fail_timeout,
                                     health_stale_after=_health_stale_after(config),
                                     on_event=partial(self._upstream_event, self.upstreams))
        self.client_ip_header = config.client_ip_header.encode("latin-1") or None
        self.forwarded_proto = _forwarded_proto(config)
        self.single = len(self.upstreams) == 1
        self.log_errors = config.log_all_errors
        self.max_body = config.out_max_body_size
        self._spare_timers: list[Timer] = []   # for teleport-in answers
        self._init_request_ids(config)
        self._init_raw_lines()

    # -- discovery: the set of upstreams changes -------------------------------------

    def refresh_upstreams(self) -> bool:
        """Take the shared table's current set if it changed (module doc); close
        retired upstreams that are done.  Cheap when nothing changed: one
        read.  False when the table was being written (try on the next beat)."""
        if self._retiring:
            self._close_retired()
        if not self.dynamic:
            return True
        stats = self.stats
        if stats.upstream_generation() == self._generation:
            return True
        table = stats.upstream_table()
        if table is None or not table[1]:
            return False
        generation, entries = table
        old = dict(zip(self._names, self.upstreams))
        names, upstreams, weights, priorities = [], [], [], []
        for index, name, priority, weight in entries:
            up = old.pop((index, name), None) or self._discovered(name, len(entries))
            names.append((index, name))
            upstreams.append(up)
            weights.append(weight - 1 if weight else 1.0)
            priorities.append(priority)
        cfg = self.config
        self.balancer = Balancer(stats, self.block, [i for i, _ in names],
                                 max_fails=cfg.out_max_fails, fail_timeout=cfg.out_fail_timeout,
                                 health_stale_after=_health_stale_after(cfg),
                                 weights=weights, priorities=priorities,
                                 on_event=partial(self._upstream_event, upstreams))
        self.upstreams, self._names, self._generation = upstreams, names, generation
        self.single = len(upstreams) == 1
        deadline = time.monotonic() + cfg.out_timeout + 5.0
        for up in old.values():
            up.retire()
            self._retiring.append((up, deadline))
        return True

    def _discovered(self, name: str, count: int):
        """An upstream object for a table entry (``address NUL origin``)."""
        address, origin = S.split_upstream_name(name)
        cfg = self.config
        per_addr = math.ceil(cfg.concurrency / max(1, count))
        per_worker = max(1, math.ceil(per_addr / max(1, cfg.workers)))
        # TLS: the -out name; an SRV target's name is not kept (-outTLSServerName)
        host = origin.rpartition(":")[0] if not origin.startswith("_") else None
        return self._upstream(parse_address(address, cfg.out_type), per_worker, self.stats,
                              self.block, self._parser_module, server_name=host)

    def _close_retired(self) -> None:
        now = time.monotonic()
        still = []
        for up, deadline in self._retiring:
            if up.busy and now < deadline:
                still.append((up, deadline))
            else:
                up.close()
        self._retiring = still

    def _upstream(self, addr, per_worker: int, stats, block: int, parser_module,
                  server_name: str | None = None):
        cfg = self.config
        if self.out_teleport:
            from httptp.io.teleport_upstream import TeleportUpstream
            from httptp.teleport.handshake import BY_NAME
            conns = cfg.out_conns_per_addr
            return TeleportUpstream(addr, conns=conns, compress=BY_NAME[cfg.out_compress],
                                    level=cfg.out_compress_level,
                                    delay=cfg.out_delay,
                                    max_pending=max(2, math.ceil(per_worker / conns) + 1),
                                    max_header_size=cfg.out_max_header_size,
                                    max_body_size=cfg.out_max_body_size, stats=stats,
                                    block=block, log=self.log, tls_context=self.tls_context,
                                    server_hostname=self._server_name(addr, server_name))
        return HTTPUpstream(addr, parser_module=parser_module,
                            max_header_size=cfg.out_max_header_size,
                            max_body_size=cfg.out_max_body_size, max_conns=per_worker,
                            idle_timeout=cfg.out_idle_timeout, stats=stats, block=block,
                            tls_context=self._plain_context(),
                            server_hostname=self._server_name(addr, server_name))

    def _plain_context(self):
        """The client context as a stdlib one (wrap_bio: the transport does the IO)."""
        return self.tls_context

    def _server_name(self, addr, name: str | None = None) -> str | None:
        """SNI and verification name: -outTLSServerName, else the -out host
        (``name``: the name a discovered address came from)."""
        if self.tls_context is None:
            return None
        return self.tls_server_name or name or (addr.host if addr.kind == "tcp" else None)

    def exchange_timer(self) -> Timer:
        """A -outTimeout timer for one client connection to re-arm per request."""
        return Timer(self.timeout)

    # -- starting an exchange ---------------------------------------------------------

    def begin(self, head, client_ip: bytes | None, down, timer: Timer, *, body_done: bool,
              peer: bytes | None = None, tunnel: bool = True):
        """An Exchange for ``head`` (not started), or the ProxyError to answer.
        ``body_done``: the whole body is already there (so the request may be
        sent again); ``tunnel``: the downstream can carry an Upgrade."""
        q, b = self.q, self.base
        raw = head.raw
        if raw is not None:
            ex = self._begin_raw(head, raw, client_ip, down, timer, body_done, peer)
            if ex is not None:
                return ex
        headers = policy.forward_request_headers(head.headers, self.client_ip_header, client_ip,
                                                 self.forwarded_proto)
        request_id = b""
        if self.request_id_header is not None:
            request_id = self._request_id(head.headers, headers)
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
        upgrade = upgrade_token(head.headers) if tunnel and head.method == b"GET" else None
        if self.out_teleport:
            if upgrade is not None:
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
                return UpgradeNotSupported()
            has_body = bool(head.content_length) or head.chunked
            refused = _teleport_refuses(head, no_host, has_body)
            if refused:
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
                return BadRequest(refused)
            ex = TeleportExchange(self, down, head, target, headers, client_ip, peer, timer)
            ex.request_id = request_id
            return ex
        if upgrade is not None:
            headers = headers + [(b"Connection", b"upgrade"), (b"Upgrade", upgrade)]
        ex = Exchange(self, down, head, target, headers, client_ip, peer, timer,
                      no_host, body_done, upgrade is not None)
        ex.request_id = request_id
        return ex

    def _begin_raw(self, head, raw: bytes, client_ip, down, timer, body_done, peer):
        """``begin`` for a head the parser's fast path read, sent on as its
        forwardable lines (``head.raw``: the policy's base drops are out, and
        no Connection field names more) plus the lines the proxy adds: in an
        http request, or in a teleport frame.  None when the request is
        HTTP/1.0, or a GET or HEAD with a body for a teleport upstream: the
        general path then reads its fields and answers (as it does for a
        request with a field the proxy sets itself, the client-IP header,
        X-Forwarded-Proto or the request id, which the parser gives no
        ``raw``: ``_init_raw_lines``)."""
        if head.version != b"1.1":
            return None
        teleport = self.out_teleport
        if teleport and _teleport_refuses(head, False, bool(head.content_length) or head.chunked):
            return None
        request_id = b""
        if self.request_id_header is not None:
            self._request_ids += 1
            request_id = b"%s%x" % (self._request_id_prefix, self._request_ids)
        if client_ip is not None:
            added = self._added_lines % (client_ip, request_id)
        else:
            added = self._added_lines_no_ip % request_id
        if teleport:                    # the lines go into the frame (framing.encode_request)
            ex = TeleportExchange(self, down, head, head.target, raw + added, client_ip, peer,
                                  timer)
            ex.request_id = request_id
            return ex
        ex = Exchange(self, down, head, head.target, None, client_ip, peer, timer, False,
                      body_done, False)
        ex.raw = raw + added
        ex.request_id = request_id
        return ex

    def _init_raw_lines(self) -> None:
        """What ``_begin_raw`` needs: the parser told which fields the proxy
        sets (a request with one has no ``raw``), and the lines it adds, as
        templates for the client's address and the request id (in the
        order forward_request_headers and _request_id add them)."""
        own = getattr(self._parser_module, "own_fields", None)
        if own is not None:
            own([self.client_ip_header, b"x-forwarded-proto" if self.forwarded_proto else None,
                 self.request_id_header])
        def literal(text: bytes) -> bytes:      # a name may hold a % (a token character)
            return text.replace(b"%", b"%%")
        proto = (b"X-Forwarded-Proto: %s\r\n" % literal(self.forwarded_proto)
                 if self.forwarded_proto else b"")
        rid = (literal(self._request_id_name) + b": %s\r\n"
               if self.request_id_header is not None else b"%.0s")
        ip = (literal(self.client_ip_header) + b": %s\r\n"
              if self.client_ip_header is not None else b"%.0s")
        self._added_lines = ip + proto + rid
        self._added_lines_no_ip = proto + rid

    # -- request ids (-requestIDHeader) -----------------------------------------------

    def _init_request_ids(self, config) -> None:
        """A random prefix per process (we run after the fork) and a counter:
        unique enough, and far cheaper than a uuid4 per request."""
        name = getattr(config, "request_id_header", "")
        self.request_id_header = name.lower().encode("latin-1") if name else None
        self._request_id_name = name.encode("latin-1")
        self._request_id_prefix = os.urandom(6).hex().encode("ascii") + b"-"
        self._request_ids = 0

    def _request_id(self, incoming: list, headers: list) -> bytes:
        """The request's id: the client's when valid, else a new one, added
        to ``headers`` (in place: forward_request_headers built that list)."""
        name, n = self.request_id_header, len(self.request_id_header)
        for field in incoming:
            key, value = field
            if len(key) == n and key.lower() == name:
                valid = _VALID_REQUEST_ID.fullmatch(value) is not None
                if valid and headers and headers[-1] is field:
                    return value        # the only one, and last already (a hop of ours added it)
                headers[:] = [h for h in headers if len(h[0]) != n or h[0].lower() != name]
                if valid:
                    headers.append((key, value))
                    return value
                break
        self._request_ids += 1
        request_id = b"%s%x" % (self._request_id_prefix, self._request_ids)
        headers.append((self._request_id_name, request_id))
        return request_id

    # -- finishing: counters and the access log -----------------------------------------

    def succeeded(self, ex, status: int, size: int) -> None:
        q, b = self.q, self.base
        q[b + S.IN_REQUEST_SUCCESS] += 1
        if status != 200:
            q[b + S.IN_REQUEST_NON200] += 1
        q[b + (S.RESP_1XX - 1 + status // 100 if 100 <= status < 600 else S.RESP_OTHER)] += 1
        self._took(ex.started)
        if self.access_log is not None:
            self.log_access(ex, status, size, ex.upstream_name, ex.upstream_time, status)

    def failed(self, ex, err: ProxyError, size: int | None = None) -> None:
        q, b = self.q, self.base
        if err.status == 504:
            q[b + S.IN_REQUEST_TIMEOUT_ERROR] += 1
        elif err.status != 499:
            q[b + S.IN_REQUEST_OTHER_ERROR] += 1
        if err.status != 499:
            self._took(ex.started)
        if self.access_log is not None:
            self.log_access(ex, err.status, len(err.payload) if size is None else size,
                            err.upstream, err.upstream_time, 0)

    def log_access(self, ex, status: int, size: int, upstream: str, upstream_time: float,
                   upstream_status: int) -> None:
        """The access-log line of an exchange (``self.access_log`` is set)."""
        self.access_log.log(ex.client_ip or ex.peer, ex.head, status, size, upstream,
                            upstream_time, request_time=time.monotonic() - ex.started,
                            received=ex.received, upstream_status=upstream_status,
                            tries=ex.tries, tls=ex.down.tls_info(),
                            request_id=ex.request_id.decode("ascii"))

    def _took(self, started: float) -> None:
        """The request duration histogram: from ``begin`` to its answer."""
        seconds = time.monotonic() - started
        b = self.base
        self.q[b + S.DURATION_HIST + bisect_left(S.LATENCY_BUCKETS, seconds)] += 1
        self.d[b + S.DURATION_SUM] += seconds

    def upstream_error(self, upstream, e: UpstreamError) -> None:
        if self._pending_event is not None:
            self._say_pending(str(e))
        if e.__class__ is ResponseTooLarge:
            self.refusals.say(("too large", upstream.name),
                              f"upstream {upstream.name}: {e}; answered 502")
        elif self.log_errors:
            self.log(f"upstream {upstream.name}: {e}")

    def upstream_timed_out(self, upstream) -> None:
        """An exchange with ``upstream`` ran out of -outTimeout (its lease released)."""
        reason = f"timed out after {self.timeout:g}s"
        if self._pending_event is not None:
            self._say_pending(reason)
        if self.log_errors:
            self.log(f"upstream {upstream.name}: {reason}")

    # -- passive health: the balancer's events, logged whatever -logAllErrors says ---------

    def _upstream_event(self, upstreams: list, position: int, event: str, failures: int) -> None:
        """``Balancer``'s ``on_event`` (``upstreams``: the list it balances).
        An ejection waits for the failure's reason (``upstream_error`` or
        ``upstream_timed_out`` come right after the release that ejected)."""
        if self._pending_event is not None:
            self._say_pending("failed")
        name = upstreams[position].name
        if event == EJECTED or event == STILL_DOWN:
            self._pending_event = (name, event, failures)
        elif event == REVIVED:
            say(self.log, f"upstream {name} is up again: the trial request succeeded", INFO)
        else:
            say(self.log, f"upstream {name} is up again: it passed a health check "
                          "since it was ejected", INFO)

    def _say_pending(self, reason: str) -> None:
        name, event, failures = self._pending_event
        self._pending_event = None
        cfg = self.config
        then = ("until it passes a health check" if _health_stale_after(cfg) is not None
                else "then one trial request")
        if event == EJECTED:
            times = "once" if failures == 1 else f"{failures} times in a row"
            say(self.log, f"upstream {name} is down: {reason}; failed {times} "
                          f"(-outMaxFails={cfg.out_max_fails}): no client requests for "
                          f"{cfg.out_fail_timeout:g} s (-outFailTimeout), {then}", WARNING)
        else:       # a failed trial: every -outFailTimeout while it stays down, so rate-limited
            self.refusals.say(("still down", name),
                              f"upstream {name} is still down: the trial request failed: "
                              f"{reason}; no client requests for {cfg.out_fail_timeout:g} s more")

    # -- teleport in: a whole answer, from the hub -------------------------------------------

    def answer_async(self, head, body: bytes, client_ip: bytes | None, peer: bytes | None,
                     respond, req_id: int) -> None:
        """Teleport in, from the hub: proxy one request and call
        ``respond(req_id, answer, head)`` once with its ``Answer`` (maybe
        before this returns); counted and access-logged as ``answer`` is."""
        spare = self._spare_timers
        timer = spare.pop() if spare else self.exchange_timer()
        down = TeleportAnswer(self, head, timer, respond, req_id)
        try:
            ex = self.begin(head, client_ip, down, timer, body_done=True, peer=peer,
                            tunnel=False)
            if isinstance(ex, ProxyError):
                down.response_error(ex, False)
                return
            down.exchange = ex
            ex.start([body] if body else [], True)
        except Exception as e:      # a bug: say it once, answer 500, never hang the request
            self.log(f"internal error: {e.__class__.__name__}: {e}")
            down.finish(None)

    def release_timer(self, timer: Timer) -> None:
        """Give back a timer of ``answer_async``'s (disarmed) for the next request."""
        timer.disarm()
        spare = self._spare_timers
        if len(spare) < _MAX_SPARE_TIMERS:
            spare.append(timer)
        else:
            timer.close()

    @staticmethod
    def answer_error(err: ProxyError) -> Answer:
        return Answer(err.status, err.reason.encode("latin-1"), _TEXT_PLAIN, err.payload)

    def close(self) -> None:
        for u in self.upstreams:
            u.close()
        for u, _ in self._retiring:
            u.close()
        self._retiring = []
        while self._spare_timers:
            self._spare_timers.pop().close()


class Exchange:
    """One request's trip to an http/https/unix upstream and back (module doc)."""

    __slots__ = ("proxy", "down", "head", "method", "target", "headers", "client_ip", "peer",
                 "timer", "add_host", "upgrade", "replay", "chunked", "pending", "pending_size",
                 "body_done", "tried", "lease", "upstream", "conn", "reused", "dialing",
                 "waiting_for", "t0", "head_sent", "size", "resp_head", "finished",
                 "stale_retried", "down_paused", "up_paused", "upstream_name", "upstream_time",
                 "tunnel_eofs", "up_mark", "raw",
                 "request_id", "started", "received", "tries")   # the access log's

    def __init__(self, proxy: Proxy, down, head, target: bytes, headers: list,
                 client_ip, peer, timer: Timer, add_host: bool, body_done: bool, upgrade: bool):
        self.proxy = proxy
        self.down = down
        self.head = head
        self.method = head.method
        self.target = target
        self.headers = headers
        self.client_ip = client_ip
        self.peer = peer
        self.timer = timer
        self.add_host = add_host
        self.upgrade = upgrade
        self.replay = None          # the whole request, when it may be sent again
        self.chunked = False        # the body goes up chunked, as it comes
        self.pending = []           # body bytes (framed) waiting for a connection
        self.pending_size = 0
        self.body_done = body_done
        self.tried = _NONE_TRIED     # a set once an upstream failed it
        self.lease = None
        self.upstream = None
        self.conn = None
        self.reused = False
        self.dialing = None
        self.waiting_for = None
        self.t0 = 0.0
        self.head_sent = False
        self.size = 0
        self.resp_head = None
        self.finished = False
        self.stale_retried = False
        self.down_paused = False
        self.up_paused = False
        self.upstream_name = ""
        self.upstream_time = 0.0
        self.tunnel_eofs = 0
        self.up_mark = -1           # what the upstream had not taken when -outTimeout was
                                    # armed (-1: not measured, to save a syscall per request)
        self.raw = None             # the fields as wire lines, instead of ``headers``
        self.request_id = b""
        self.started = time.monotonic()     # request_time and the duration histogram
        self.received = 0                   # request body bytes
        self.tries = 0

    # -- the request ----------------------------------------------------------------------

    def start(self, body: list, body_done: bool) -> None:
        """Send: ``body`` is what arrived with the head; ``body_done`` whether
        that is all of it."""
        self.body_done = body_done
        head = self.head
        self.received = size = sum(map(len, body)) if body else 0
        if body_done:
            self.pending = body
            self.pending_size = size
            if self.method in IDEMPOTENT and size <= _MAX_REPLAY:
                self.replay = True
        else:
            if head.content_length is None:      # chunked: streamed as chunks
                self.chunked = True
                body = [writer.chunk(b) for b in body]
            self.pending = body
            self.pending_size = sum(map(len, body))
        self.timer.arm(self._timed_out)
        self._try()

    def _request_head(self) -> bytes:
        if self.chunked:
            size = None
        elif self.body_done:
            size = self.pending_size
        else:
            size = self.head.content_length
        if self.raw is not None:
            return writer.request_lines(self.method, self.target, self.raw, size)
        headers = self.headers
        if self.add_host:
            headers = headers + [(b"Host", self.upstream.host)]
        return writer.request_head(self.method, self.target, headers, size)

    def _try(self) -> None:
        self.lease = lease = self.proxy.balancer.pick(self.tried)
        if lease is None:                   # every upstream is down (health checks)
            self._fail(NoUpstreamUp())
            return
        self.upstream = up = self.proxy.upstreams[lease.index]
        self.t0 = time.monotonic()
        self.tries += 1
        up.acquire(self)

    def got_conn(self, conn, reused: bool) -> None:
        """The pool's answer: a connection to send on."""
        self.dialing = None
        if self.finished:                    # cannot happen: the pool is told when we give up
            self.upstream.done(conn, True)
            return
        self.conn = conn
        self.reused = reused
        data = self._request_head()
        pending = self.pending
        if pending:
            data = b"".join([data, *pending]) if len(pending) > 1 else data + pending[0]
        if self.replay is None:
            self.pending = []
            self.pending_size = 0
        conn.send(self, self.method, data, self.upgrade)
        if self.down_paused:
            conn.transport.pause_reading()
        if self.up_paused and conn.transport.write_buffer_size <= HIGH_WATER:
            self.upstream_paused(False)     # what waited for the connection is sent
        elif self.up_paused:
            self.up_mark = conn.transport.unsent()     # still full: -outTimeout runs
        elif not self.body_done:
            self.timer.disarm()             # the upstream waits for the client's body now

    def conn_failed(self, err: UpstreamError) -> None:
        self.dialing = None
        self.upstream_failed(err)

    def body_data(self, data: bytes) -> None:
        """More of the request body from the client."""
        if self.finished:
            return
        self.received += len(data)
        if self.chunked:
            data = writer.chunk(data)
        conn = self.conn
        if conn is not None:
            conn.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > HIGH_WATER and not self.up_paused:
            self.upstream_paused(True)

    def body_end(self) -> None:
        if self.finished:
            return
        self.body_done = True
        if self.chunked:
            if self.conn is not None:
                self.conn.write(writer.LAST_CHUNK)
            else:
                self.pending.append(writer.LAST_CHUNK)
        if not self.head_sent and self.conn is not None:
            self._wait_upstream()       # the whole request is given: for the head now

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's (or our pending) buffer is full, or drained again."""
        if paused == self.up_paused:
            return
        self.up_paused = paused
        conn = self.conn
        if conn is not None and not self.head_sent and not self.finished:
            # the request body waits on the upstream (-outTimeout runs) or, once
            # it drained, on the client again (it does not: see the module doc)
            if paused:
                self._wait_upstream()
            elif not self.body_done:
                self.timer.disarm()
        if paused:
            self.down.pause_reading()
        else:
            self.down.resume_reading()

    def _wait_upstream(self) -> None:
        """Arm -outTimeout for a wait on the upstream to take the rest of the
        request and answer, noting what it has not taken yet (``_timed_out``
        waits on while that shrinks)."""
        self.up_mark = self.conn.transport.unsent()
        self.timer.arm(self._timed_out)

    # -- the response -------------------------------------------------------------------------

    def _limit(self, announced: int | None) -> bool:
        """Count, log and fail a response over -outMaxBodySize; True if it was."""
        if self.proxy.max_body <= 0:
            return False
        size = "" if announced is None else f"of {announced} bytes "
        self.upstream.count(S.OUT_RESPONSE_TOO_LARGE)
        self._drop_conn()
        self.upstream_failed(ResponseTooLarge(
            f"response body {size}is over the limit of {self.proxy.max_body} bytes "
            "(-outMaxBodySize)"), dropped=True)
        return True

    def response_whole(self, head: ResponseHead, body: bytes) -> None:
        self.conn = None                      # already back in the pool
        if len(body) > self.proxy.max_body:
            self._limit_whole(None)
            return
        if (head.content_length is not None and head.content_length > self.proxy.max_body
                and status_has_body(head.status, self.method)):
            self._limit_whole(head.content_length)
            return
        self._done(head, len(body) if self.method != b"HEAD" else 0)
        self.down.response_whole(head, body, self)

    def _limit_whole(self, announced) -> None:
        self.upstream.count(S.OUT_RESPONSE_TOO_LARGE)
        size = "" if announced is None else f"of {announced} bytes "
        self.upstream_failed(ResponseTooLarge(
            f"response body {size}is over the limit of {self.proxy.max_body} bytes "
            "(-outMaxBodySize)"), dropped=True)

    def response_head(self, head: ResponseHead) -> None:
        announced = head.content_length
        if (announced is not None and announced > self.proxy.max_body
                and status_has_body(head.status, self.method)):
            self._limit(announced)
            return
        self.resp_head = head
        self.head_sent = True
        if not self.down_paused:
            self.timer.arm(self._timed_out)
        self.down.response_head(head, self)

    def response_data(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.proxy.max_body:
            self._limit(None)
            return
        if not self.down_paused:
            self.timer.arm(self._timed_out)
        self.down.response_data(data)

    def response_end(self) -> None:
        self.conn = None
        self._done(self.resp_head, self.size)
        self.down.response_end()

    def _done(self, head: ResponseHead, size: int) -> None:
        self.finished = True
        self.timer.disarm()
        elapsed = time.monotonic() - self.t0
        self.lease.release(True, elapsed)
        self.lease = None
        self.upstream_name, self.upstream_time = self.upstream.name, elapsed
        self.proxy.succeeded(self, head.status, size)

    def pause_response(self) -> None:
        """The client's writes back up: stop reading the upstream."""
        self.down_paused = True
        self.timer.disarm()
        if self.conn is not None:
            self.conn.transport.pause_reading()

    def resume_response(self) -> None:
        self.down_paused = False
        if self.conn is not None:
            self.conn.transport.resume_reading()
        if not self.finished and not self.upgrade:
            self.timer.arm(self._timed_out)     # also while it still waits for a connection

    # -- failures ---------------------------------------------------------------------------------

    def _drop_conn(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            if conn.exchange is self:
                conn.exchange = None
                self.upstream.done(conn, False)

    def upstream_failed(self, e: UpstreamError, dropped: bool = False) -> None:
        """The connection failed (it is closed already), or a limit was hit."""
        self.conn = None
        if self.finished:
            return
        proxy = self.proxy
        up = self.upstream
        elapsed = time.monotonic() - self.t0
        too_large = e.__class__ is ResponseTooLarge
        index = self.lease.index
        self.lease.release(too_large, elapsed)   # too large: the upstream answered
        self.lease = None
        proxy.upstream_error(up, e)
        if not self.head_sent and self.replay is not None and e.sent_nothing_back \
                and not self.down.gone:
            if self.reused and not self.stale_retried:
                self.stale_retried = True        # a keep-alive race: once more, fresh
                self._try()
                return
            if self.tried is _NONE_TRIED:
                self.tried = set()
            self.tried.add(index)
            if len(self.tried) == 1 and not proxy.single:
                self._try()
                return
        err = _answer(e, up, elapsed)
        self._fail(err)

    def _timed_out(self) -> None:
        if self.finished:
            return
        conn = self.conn
        if conn is not None and not self.head_sent and (self.up_paused or self.body_done):
            # a slow upstream that still takes the body: not stuck (the kernel's
            # buffer counts: the socket turns writable only once a third is free)
            left = conn.transport.unsent()
            if left and (self.up_mark < 0 or left < self.up_mark):
                self.up_mark = left
                self.timer.arm(self._timed_out)
                return
        up = self.upstream
        waited = self.waiting_for
        if waited is not None:
            waited.cancel(self)
            self.waiting_for = None
        if self.dialing is not None:
            self.dialing.cancel()
            self.dialing = None
        self._drop_conn()
        elapsed = time.monotonic() - self.t0
        if self.lease is not None:
            self.lease.release(False, elapsed)
            self.lease = None
        self.proxy.upstream_timed_out(up)
        self._fail(_answer(None, up, elapsed, "no free upstream connection before the deadline"
                           if waited is not None else ""))

    def _fail(self, err: ProxyError) -> None:
        self.finished = True
        self.timer.disarm()
        self.proxy.failed(self, err, self.size if self.head_sent else None)
        self.down.response_error(err, self.head_sent)

    def abort(self, log: bool = True) -> None:
        """The client went away (``log``: as 499 in the access log; not when
        its own error answer is logged): let the upstream side go (its
        connection is closed, not pooled: a response may be half read)."""
        if self.finished:
            if self.upgrade and self.conn is not None:      # a tunnel
                self._drop_conn()
            return
        self.finished = True
        self.timer.disarm()
        if self.waiting_for is not None:
            self.waiting_for.cancel(self)
            self.waiting_for = None
        if self.dialing is not None:
            self.dialing.cancel()
            self.dialing = None
        self._drop_conn()
        if self.lease is not None:
            self.lease.release(True, time.monotonic() - self.t0)
            self.lease = None
        if log and self.proxy.access_log is not None and self.upstream is not None:
            self.proxy.log_access(self, 499, self.size, self.upstream.name,
                                  time.monotonic() - self.t0,
                                  self.resp_head.status if self.resp_head is not None else 0)

    # -- upgrade: a tunnel ----------------------------------------------------------------------

    def upgraded(self, head: ResponseHead, rest: bytes) -> None:
        """The upstream switched protocols (101): bytes flow both ways now."""
        self._done(head, 0)
        self.head_sent = True
        if self.conn is not None:      # a tunnel waits on people: the idle timeout, both ways
            self.conn.transport.write_timeout = self.proxy.config.in_idle_timeout
        self.down.response_upgraded(head, rest, self)

    def tunnel_send(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)

    def tunnel_send_eof(self) -> None:
        if self.conn is not None:
            self.conn.transport.write_eof()
            self._tunnel_eof()

    def tunnel_data(self, data: bytes) -> None:
        self.down.tunnel_data(data)

    def tunnel_eof(self) -> None:
        self.down.tunnel_eof()
        self._tunnel_eof()

    def _tunnel_eof(self) -> None:
        self.tunnel_eofs += 1
        if self.tunnel_eofs == 2:
            self.down.tunnel_closed()
            self._drop_conn()

    def tunnel_lost(self) -> None:
        self._drop_conn()
        self.down.tunnel_closed(error=True)


class TeleportExchange:
    """An exchange over a teleport link: the whole body first, then one frame
    each way, driven by the teleport client's callback (no greenlet).

    The -outTimeout timer (the downstream's) runs from the moment the body
    is complete; when it fires the request is cancelled on its link (a late
    answer is read and dropped) and answered 504.  An idempotent request that
    failed before any answer goes once more to another upstream."""

    __slots__ = ("proxy", "down", "head", "target", "headers", "client_ip", "peer", "timer",
                 "body", "finished", "upstream_name", "upstream_time", "head_sent", "size",
                 "tried", "lease", "upstream", "call", "t0",
                 "request_id", "started", "received", "tries")   # the access log's

    def __init__(self, proxy: Proxy, down, head, target, headers, client_ip, peer, timer):
        self.proxy = proxy
        self.down = down
        self.head = head
        self.target = target
        self.headers = headers
        self.client_ip = client_ip
        self.peer = peer
        self.timer = timer
        self.body = []
        self.finished = False
        self.upstream_name = ""
        self.upstream_time = 0.0
        self.head_sent = False          # never: the answer is written whole
        self.size = 0
        self.tried = None
        self.lease = None
        self.upstream = None
        self.call = None                # the request in flight on its link
        self.t0 = 0.0
        self.request_id = b""
        self.started = time.monotonic()     # request_time and the duration histogram
        self.received = 0                   # request body bytes
        self.tries = 0

    def start(self, body: list, body_done: bool) -> None:
        self.body = body
        if body_done:
            self._go()

    def body_data(self, data: bytes) -> None:
        if self.body is not None:
            self.body.append(data)

    def body_end(self) -> None:
        if not self.finished and self.body is not None:
            self._go()

    def _go(self) -> None:
        body = self.body
        self.body = b"".join(body) if len(body) != 1 else body[0]
        self.received = len(self.body)
        self.timer.arm(self._timed_out)
        self._try()

    def _try(self) -> None:
        proxy = self.proxy
        self.lease = lease = proxy.balancer.pick(self.tried or ())
        if lease is None:                   # every upstream is down (health checks)
            self._fail(NoUpstreamUp())
            return
        self.upstream = up = proxy.upstreams[lease.index]
        self.t0 = time.monotonic()
        self.tries += 1
        try:
            self.call = up.request_async(self.head.method, self.target, self.headers,
                                         self.body, self._answered)
        except ValueError as e:         # what the codec refuses (begin checks the known cases)
            self.lease.release(True, 0.0)
            self.lease = None
            self._fail(BadRequest(str(e)))

    def _answered(self, result) -> None:
        """The teleport client's callback: a Response or an UpstreamError."""
        self.call = None
        if self.finished:
            return
        proxy = self.proxy
        up = self.upstream
        elapsed = time.monotonic() - self.t0
        lease, self.lease = self.lease, None
        if result.__class__ is Response:
            lease.release(True, elapsed)
            self.finished = True
            self.timer.disarm()
            head = result.head
            self.upstream_name, self.upstream_time = up.name, elapsed
            self.size = 0 if self.head.method == b"HEAD" else len(result.body)
            proxy.succeeded(self, head.status, self.size)
            self.down.response_whole(head, result.body, self)
            return
        too_large = result.__class__ is ResponseTooLarge
        lease.release(too_large, elapsed)       # too large: the upstream did answer
        proxy.upstream_error(up, result)
        if self.tried is None and result.sent_nothing_back and not proxy.single \
                and self.head.method in IDEMPOTENT:
            self.tried = {lease.index}
            self._try()
            return
        err = _answer(result, up, elapsed)
        self._fail(err)

    def _timed_out(self) -> None:
        if self.finished:
            return
        up = self.upstream
        if self.call is not None:
            up.cancel(self.call)
            self.call = None
        elapsed = time.monotonic() - self.t0
        if self.lease is not None:
            self.lease.release(False, elapsed)
            self.lease = None
        self.proxy.upstream_timed_out(up)
        err = _answer(None, up, elapsed)
        self._fail(err)

    def _fail(self, err: ProxyError) -> None:
        self.finished = True
        self.timer.disarm()
        self.proxy.failed(self, err)
        self.down.response_error(err, False)

    def pause_response(self) -> None:
        pass

    resume_response = pause_response

    def abort(self, log: bool = True) -> None:
        """The client went away (``log``: as 499 in the access log): forget
        the request on its link (its answer, if it comes, is dropped)."""
        if self.finished:
            return
        self.finished = True
        self.timer.disarm()
        self.body = None
        up = self.upstream
        if self.call is not None:
            up.cancel(self.call)
            self.call = None
        if self.lease is not None:
            self.lease.release(True, time.monotonic() - self.t0)
            self.lease = None
            if log and self.proxy.access_log is not None:
                self.proxy.log_access(self, 499, 0, up.name, time.monotonic() - self.t0, 0)


class TeleportAnswer:
    """A downstream for teleport in, driven by callbacks: it collects one
    response whole (the exchange enforces -outMaxBodySize) and, once it is
    complete or failed, hands its ``Answer`` to ``respond(req_id, answer,
    head)`` (the teleport connection frames it).  Exactly once."""

    __slots__ = ("proxy", "head", "timer", "respond", "req_id", "resp_head", "parts",
                 "exchange", "gone")

    def __init__(self, proxy: Proxy, head, timer: Timer, respond, req_id: int):
        self.proxy = proxy
        self.head = head
        self.timer = timer
        self.respond = respond
        self.req_id = req_id
        self.resp_head = None
        self.parts = []
        self.exchange = None
        self.gone = False

    def finish(self, answer) -> None:
        """Hand ``answer`` on (None: an internal error, answered 500)."""
        respond = self.respond
        if respond is None:
            return
        self.respond = None
        self.proxy.release_timer(self.timer)
        self.timer = self.exchange = None
        self.parts = None
        if answer is None:
            answer = INTERNAL_ERROR
        respond(self.req_id, answer, self.head)

    def _whole(self, rh, body: bytes) -> None:
        raw = rh.raw            # the forwarded fields as lines, when the parser kept them
        self.finish(Answer(rh.status, rh.reason,
                           policy.forward_response_headers(rh.headers) if raw is None else raw,
                           b"" if self.head.method == b"HEAD" else body))

    def response_whole(self, head, body, exchange) -> None:
        self._whole(head, body)

    def response_head(self, head, exchange) -> None:
        self.resp_head = head

    def response_data(self, data) -> None:
        self.parts.append(data)

    def response_end(self) -> None:
        parts = self.parts
        self._whole(self.resp_head, parts[0] if len(parts) == 1 else b"".join(parts))

    def response_error(self, err, head_sent: bool) -> None:
        if self.respond is not None:
            self.finish(Proxy.answer_error(err))

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def tls_info(self) -> tuple[str, str] | None:
        """Teleport in (teleports): the link's TLS version and SNI name.
        ``respond`` is the connection's bound method (None once answered)."""
        conn = getattr(self.respond, "__self__", None)
        return tls_info(getattr(conn, "transport", None))


def _health_stale_after(config) -> float | None:
    """The balancer's ``health_stale_after``: None when -outHealthCheck is off."""
    if not getattr(config, "out_health_check", ""):
        return None
    from httptp.health import stale_after
    return stale_after(config)


def _answer(err: UpstreamError | None, upstream, elapsed: float,
            detail: str | None = None) -> ProxyError:
    """The one table from upstream outcomes to answers: an ``UpstreamError``
    (refused, reset, malformed, too large...) is a 502, no answer before
    -outTimeout (``err`` None) a 504.  The answer names the upstream and how
    long it took (access log)."""
    answer = BadGateway(str(err)) if err is not None else GatewayTimeout(detail or "")
    answer.upstream, answer.upstream_time = upstream.name, elapsed
    return answer


def _forwarded_proto(config) -> bytes | None:
    """X-Forwarded-Proto's value (-forwardedProto): the scheme of an http or
    https listener; None for unix (the local proxy in front knows the scheme)
    and teleport (the first hop set it)."""
    if not getattr(config, "forwarded_proto", False) or config.in_type not in ("http", "https"):
        return None
    return config.in_type.encode("ascii")
