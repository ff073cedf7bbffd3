"""What the proxy needs from an upstream: the `Upstream` protocol.

Theory of operation
-------------------
One ``-out`` address is one upstream object per worker, whatever its
``-outType``: ``httptp.io.http_client.HTTPUpstream`` (http, https, unix: a
keep-alive pool) or ``httptp.io.teleport_upstream.TeleportUpstream``
(teleport, teleports: N multiplexed connections).  ``Proxy`` in
``httptp.io.pipeline`` holds them in a list indexed like the balancer's
stats slots, and knows them only through this protocol: the balancer picks an
index, the proxy calls `Upstream.exchange` on that object, and the outcome
goes back to the balancer's lease.  So a new kind of upstream is a class
with these members, and no ``if out_type == ...`` in the proxy.

Error vocabulary: an exchange raises ``httptp.errors.UpstreamError`` (its
``sent_nothing_back`` says whether an idempotent request may be retried on
another upstream; ``ResponseTooLarge`` is one that must not be, the upstream
did answer) or ``GatewayTimeout`` (the deadline passed first).  The proxy
maps them to 502 and 504 in one place.

This module only declares types: it imports neither gevent nor ``httptp.io``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from httptp.http.events import ResponseHead
from httptp.netaddr import Address


class UpstreamResponse(Protocol):
    """A complete upstream response, as `Upstream.exchange` returns it."""

    head: ResponseHead
    """The status line and headers (hop-by-hop ones still in: the proxy
    strips them with ``httptp.http.policy``)."""
    body: bytes
    """The whole body, de-chunked; ``b""`` when the response has none
    (``httptp.http.rules.status_has_body``)."""
    upstream: str
    """Set by the proxy once the exchange returns: the `Upstream.name` that
    answered (access log)."""
    upstream_time: float
    """Set by the proxy: seconds the exchange took (access log, balancer)."""


@runtime_checkable
class Upstream(Protocol):
    """One ``-out`` address of one worker, as the proxy uses it.

    Only ``name``, ``exchange``, ``close`` and (for http kinds) ``host`` are
    on the request path; the counts are for load reports and tests.
    """

    address: Address
    """The parsed ``-out`` address (TCP host and port, or a unix path)."""

    name: str
    """``str(address)``: how logs, errors and the access log name it."""

    host: bytes
    """The ``Host`` the proxy adds to a request that came without one (an
    HTTP/1.0 client): the address itself for TCP, ``localhost`` for a unix
    socket, as nginx's ``$proxy_host``.  Used only for http-kind upstreams;
    a teleport upstream refuses such requests before the exchange."""

    def exchange(self, method: bytes, target: bytes, headers: list, body: bytes,
                 deadline: float, retry_stale: bool) -> UpstreamResponse:
        """Send one request and return its complete response.

        ``headers`` come without hop-by-hop and framing headers (the upstream
        writes its own framing); ``target`` is origin-form.  ``deadline`` is
        ``time.monotonic()`` seconds: the caller has armed its ``-outTimeout``
        timer for the same instant and may interrupt the exchange there, so
        an implementation needs no timer of its own per request, and must
        leave nothing half-read for the next exchange when interrupted.
        ``retry_stale``: the request is idempotent, so a reused connection
        that fails before any response byte may be retried once on a fresh
        one (a keep-alive race with the upstream closing it).

        Raises ``UpstreamError`` (``ResponseTooLarge`` over
        ``-outMaxHeaderSize``/``-outMaxBodySize``) or ``GatewayTimeout``
        (no free connection, or no answer, before ``deadline``).
        """
        ...

    def close(self) -> None:
        """Close every connection (idle ones in an orderly way).  Called once,
        when the worker stops; no exchange follows."""
        ...

    @property
    def pending(self) -> int:
        """Requests sent (or queued to be sent) and not yet answered."""
        ...

    @property
    def idle_count(self) -> int:
        """Open connections waiting in the pool for a request (0 for a
        multiplexed upstream, whose connections are never idle)."""
        ...
