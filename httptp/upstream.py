"""What the proxy needs from an upstream: one protocol per kind of upstream.

Theory of operation
-------------------
One upstream address is one upstream object per worker, whatever its
``-outType`` (a ``-out`` name is one per address it resolves to:
``httptp.discovery``).  ``Proxy`` in ``httptp.io.pipeline`` holds them in a
list indexed like the balancer's stats slots: the balancer picks an index, the
exchange asks that object for a connection or sends on it, and the outcome
goes back to the balancer's lease.  Everything runs in callbacks on the hub's
loop: no call here blocks.

There are two kinds, because the wire protocols differ:

* ``PooledUpstream`` (http, https, unix: ``httptp.io.http_client.HTTPUpstream``),
  a keep-alive pool.  The exchange ``acquire``\\ s a connection, streams its
  request and the response through it, and gives it back with ``done``.
* ``MultiplexedUpstream`` (teleport, teleports:
  ``httptp.io.teleport_upstream.TeleportUpstream``), N pipelined
  connections.  The exchange hands a whole request to ``request_async`` and
  gets the whole response in a callback (teleport frames are whole messages).

Error vocabulary: an upstream reports only ``httptp.errors.UpstreamError``
(its ``sent_nothing_back`` says whether an idempotent request may be retried on
another upstream; ``ResponseTooLarge`` is one that must not be: the upstream
did answer).  Timeouts are the exchange's own timer (``-outTimeout``), never
the upstream's.  The exchange alone turns these into 502 and 504.

This module only declares types: it imports neither gevent nor ``httptp.io``.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from httptp.netaddr import Address


@runtime_checkable
class PooledUpstream(Protocol):
    """An http-kind upstream (a pool of keep-alive connections), as an exchange uses it."""

    address: Address
    """The address dialled (TCP host and port, or a unix path)."""

    name: str
    """``str(address)``: how logs, errors and the access log name it."""

    host: bytes
    """The ``Host`` the proxy adds to a request that came without one (an
    HTTP/1.0 client): the address itself for TCP, ``localhost`` for a unix
    socket, as nginx's ``$proxy_host``."""

    def acquire(self, exchange) -> None:
        """Call back ``exchange.got_conn(conn, reused)`` or
        ``exchange.conn_failed(UpstreamError)``, now or later.  Over the
        connection limit (``-concurrency`` per upstream) the exchange waits
        its turn (``exchange.waiting_for`` is set to this upstream)."""
        ...

    def cancel(self, exchange) -> None:
        """``exchange`` gave up waiting for a connection (its timeout)."""
        ...

    def done(self, conn, keep: bool, orderly: bool = False) -> None:
        """The exchange is over with ``conn``: pool it (``keep``) or close it
        (``orderly``: a whole response came, so TLS gets a close_notify); the
        next waiting exchange gets its turn."""
        ...

    def retire(self) -> None:
        """This address left the upstream set: no new request; pooled
        connections close, busy ones finish (the proxy closes the upstream
        once ``busy`` is false)."""
        ...

    @property
    def busy(self) -> bool:
        """Connections are in use or being dialled."""
        ...

    @property
    def idle_count(self) -> int:
        """Open connections waiting in the pool for a request."""
        ...

    def close(self) -> None:
        """Close every connection (idle ones in an orderly way).  Called once,
        when the worker stops or the upstream was retired and is no longer busy."""
        ...


@runtime_checkable
class MultiplexedUpstream(Protocol):
    """A teleport upstream (pipelined connections, whole messages), as an exchange uses it."""

    address: Address
    name: str

    def request_async(self, method: bytes, target: bytes, headers: list, body: bytes,
                      callback: Callable) -> object:
        """Send one whole request (headers without hop-by-hop and framing ones,
        origin-form ``target``) and return a handle for ``cancel``.
        ``callback(response | UpstreamError)`` runs once, in the hub, unless
        cancelled first; the response has ``head`` and the whole ``body``.
        Raises ValueError for a request the protocol cannot carry."""
        ...

    def cancel(self, call) -> None:
        """The exchange's ``-outTimeout`` passed: stop waiting for ``call``."""
        ...

    def retire(self) -> None:
        """As ``PooledUpstream.retire``."""
        ...

    @property
    def busy(self) -> bool:
        """Requests are in flight."""
        ...

    @property
    def pending(self) -> int:
        """Requests sent (or queued to be sent) and not yet answered."""
        ...

    def close(self) -> None:
        """Close every connection.  Called once; no request follows."""
        ...
