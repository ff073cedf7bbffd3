"""A teleport ``-out`` address as the pipeline sees it: like ``HTTPUpstream``.

``-outConnsPerAddr N`` opens N real teleport connections to the address (the
Go original appended the same client N times and so still opened one).  The
balancer picks the address, by its health and load; inside the address the
connection with the fewest pending requests takes the request.

``request_async`` is what ``pipeline.TeleportExchange`` calls, from the hub
or a greenlet: ``callback(Response | UpstreamError)`` runs later, in the hub.
The exchange's -outTimeout timer ends the wait with ``cancel``: the teleport
client starts no timer of its own per request.  ``exchange`` is the blocking
form (``httptp.upstream.Upstream``), for greenlets.
"""

from __future__ import annotations

from httptp.io.teleport_client import TeleportClient, least_pending

_LIMIT_NAMES = {"header": "-outMaxHeaderSize", "body": "-outMaxBodySize"}


class TeleportUpstream:
    def __init__(self, address, *, conns: int, compress: int, delay: float, max_pending: int,
                 max_header_size: int, max_body_size: int, stats, block: int, log,
                 tls_context=None, server_hostname: str | None = None, level=None):
        self.address = address
        self.name = str(address)
        self.clients = [
            TeleportClient(address, compress=compress, level=level, delay=delay,
                           max_pending=max_pending,
                           max_header_size=max_header_size, max_body_size=max_body_size,
                           stats=stats, block=block, log=log, tls_context=tls_context,
                           server_hostname=server_hostname, limit_names=_LIMIT_NAMES)
            for _ in range(conns)
        ]
        self._single = self.clients[0] if conns == 1 else None

    def request_async(self, method: bytes, target: bytes, headers: list, body: bytes,
                      callback):
        """Send one request on the least busy connection; returns the call
        for ``cancel``.  ``callback(Response | UpstreamError)`` runs once, in
        the hub, unless cancelled first.  Raises ValueError for a request the
        protocol cannot carry."""
        client = self._single or least_pending(self.clients)
        return client.request_async(method, target, headers, body, callback)

    #: ``cancel(call)``: the caller's -outTimeout passed, stop waiting for ``call``
    cancel = staticmethod(TeleportClient.cancel)

    @property
    def pending(self) -> int:
        return sum(c.pending for c in self.clients)

    @property
    def idle_count(self) -> int:
        return 0

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def retire(self) -> None:
        """This address left the -out set: nothing new is sent; the pipeline
        closes it once ``busy`` is false (or after a deadline)."""

    @property
    def busy(self) -> bool:
        return self.pending > 0
