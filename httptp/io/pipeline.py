"""The in → out wiring: one request in, one upstream exchange out, one response.

``Proxy.forward`` is the whole request path after parsing (DESIGN.md §4):
request policy → balancer pick → upstream exchange (bounded by ``-outTimeout``)
→ balancer release → response policy → encoded bytes.  It never raises for an
expected failure: upstream errors become 502, timeouts 504, each counted.
"""

from __future__ import annotations

import math
import sys
import time

import gevent

from httptp import stats as S
from httptp.balancer import Balancer
from httptp.errors import BadGateway, GatewayTimeout, ProxyError, UpstreamError
from httptp.http import policy, writer
from httptp.io.http_client import HTTPUpstream

# RFC 9110 §9.2.2: safe to send twice.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))
_KEEP_ALIVE = (b"Connection", b"keep-alive")


class _UpstreamTimeout(Exception):
    """Raised by gevent.Timeout inside an exchange: -outTimeout passed."""


class Proxy:
    def __init__(self, config, stats, block: int, upstream_ids: list[int], parser_module, log):
        self.config = config
        self.log = log
        self._q = stats.q
        self._base = stats.block_base(block)
        self.timeout = config.out_timeout
        n_out = len(config.upstreams)
        # -concurrency bounds upstream connections as the original does
        # (MaxConns per address = ceil(concurrency / len(out))), shared out
        # between the workers.
        per_addr = math.ceil(config.concurrency / n_out)
        per_worker = max(1, math.ceil(per_addr / max(1, config.workers)))
        self.upstreams = [
            HTTPUpstream(addr, parser_module=parser_module,
                         max_header_size=config.out_max_header_size, max_conns=per_worker,
                         idle_timeout=config.out_idle_timeout, stats=stats, block=block)
            for addr in config.upstreams
        ]
        self.balancer = Balancer(stats, block, list(upstream_ids),
                                 max_fails=config.out_max_fails,
                                 fail_timeout=config.out_fail_timeout)
        self.client_ip_header = config.client_ip_header.encode("latin-1") or None
        self._single = len(self.upstreams) == 1
        self._log_errors = config.log_all_errors

    def forward(self, head, body: bytes, client_ip: bytes | None, keep_alive: bool) -> tuple[bytes, bool]:
        """Proxy one request; return (response bytes, keep the client connection)."""
        q, b = self._q, self._base
        headers = policy.forward_request_headers(head.headers, self.client_ip_header, client_ip)
        request = writer.request_head(head.method, head.target, headers, len(body))
        if body:
            request += body
        try:
            resp = self._exchange(request, head.method)
        except ProxyError as err:
            if err.status == 504:
                q[b + S.IN_REQUEST_TIMEOUT_ERROR] += 1
            else:
                q[b + S.IN_REQUEST_OTHER_ERROR] += 1
            keep_alive = keep_alive and head.version != b"1.0"  # the cached answers say no keep-alive
            return writer.error_response(err, keep_alive), keep_alive
        rh = resp.head
        q[b + S.IN_REQUEST_SUCCESS] += 1
        if rh.status != 200:
            q[b + S.IN_REQUEST_NON200] += 1
        out_headers = policy.forward_response_headers(rh.headers)
        if keep_alive and head.version == b"1.0":
            out_headers.append(_KEEP_ALIVE)   # HTTP/1.0 keeps a connection only when told
        if head.method == b"HEAD":
            data = writer.response(rh.status, rh.reason, out_headers, b"", keep_alive,
                                   content_length=rh.content_length)
        else:
            data = writer.response(rh.status, rh.reason, out_headers, resp.body, keep_alive)
        return data, keep_alive

    def _exchange(self, request: bytes, method: bytes):
        """Pick, exchange, release; retry an idempotent request once elsewhere."""
        deadline = time.monotonic() + self.timeout
        idempotent = method in IDEMPOTENT
        tried = set()
        timer = gevent.Timeout(self.timeout, _UpstreamTimeout)
        timer.start()
        try:
            while True:
                lease = self.balancer.pick(tried)
                upstream = self.upstreams[lease.index]
                t0 = time.monotonic()
                try:
                    resp = upstream.exchange(request, method, deadline, idempotent)
                except UpstreamError as e:
                    lease.release(False, time.monotonic() - t0)
                    tried.add(lease.index)
                    if self._log_errors:
                        self.log(f"upstream {upstream.name}: {e}")
                    if (idempotent and e.sent_nothing_back and len(tried) == 1
                            and not self._single):
                        continue
                    raise BadGateway(str(e)) from None
                except (_UpstreamTimeout, GatewayTimeout):
                    lease.release(False, time.monotonic() - t0)
                    if self._log_errors:
                        self.log(f"upstream {upstream.name}: timed out after {self.timeout}s")
                    raise GatewayTimeout() from None
                except BaseException:
                    lease.release(False, time.monotonic() - t0)
                    raise
                lease.release(True, time.monotonic() - t0)
                return resp
        finally:
            timer.close()

    def close(self) -> None:
        for u in self.upstreams:
            u.close()


def stderr_log(prefix: str):
    def log(msg: str) -> None:
        sys.stderr.write(f"{prefix}{msg}\n")
        sys.stderr.flush()
    return log
