"""A teleport ``-out`` address as the pipeline sees it: like ``HTTPUpstream``.

``-outConnsPerAddr N`` opens N real teleport connections to the address (the
Go original appended the same client N times and so still opened one).  The
balancer picks the address, by its health and load; inside the address the
connection with the fewest pending requests takes the request.

``exchange`` is called by ``Proxy._exchange`` with its -outTimeout
``Deadline`` armed for the same ``deadline``, which interrupts the waiting
greenlet: the teleport client starts no timer of its own per request.
"""

from __future__ import annotations

from httptp.io.teleport_client import TeleportClient, least_pending

_LIMIT_NAMES = {"header": "-outMaxHeaderSize", "body": "-outMaxBodySize"}


class TeleportUpstream:
    def __init__(self, address, *, conns: int, compress: int, delay: float, max_pending: int,
                 max_header_size: int, max_body_size: int, stats, block: int, log,
                 tls_context=None, server_hostname: str | None = None):
        self.address = address
        self.name = str(address)
        self.clients = [
            TeleportClient(address, compress=compress, delay=delay, max_pending=max_pending,
                           max_header_size=max_header_size, max_body_size=max_body_size,
                           stats=stats, block=block, log=log, tls_context=tls_context,
                           server_hostname=server_hostname, limit_names=_LIMIT_NAMES)
            for _ in range(conns)
        ]

    def exchange(self, method: bytes, target: bytes, headers: list, body: bytes, deadline: float,
                 retry_stale: bool):
        return least_pending(self.clients).request(method, target, headers, body, deadline,
                                                   interrupted_at_deadline=True)

    @property
    def pending(self) -> int:
        return sum(c.pending for c in self.clients)

    def close(self) -> None:
        for c in self.clients:
            c.close()
