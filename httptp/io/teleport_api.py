"""The teleport protocol as a small library for gevent programs.

``Client`` sends HTTP requests over one (or a few) multiplexed teleport
connections; ``Server`` answers them with a plain function.  Both speak the Go
``httpteleport`` wire format byte for byte with the flate, none and snappy
codecs, so either side can be the original (PROTOCOL.md §1, §4).  Nothing here
needs the rest of httptp: no shared memory, no configuration, no monkey-patching
(sockets come from ``gevent.socket``).  See docs/library.md.

Users import these names from ``httptp.teleport`` (which loads this module
lazily, keeping that package sans-IO); this module is where they live, next
to the drivers they wrap.

Example::

    from httptp.teleport import Client, Server

    def hello(req):
        return 200, {"Content-Type": "text/plain"}, b"hello " + req.body

    srv = Server(hello, compress="zstd")
    addr = srv.start("127.0.0.1:0")         # serves in the background
    c = Client(addr, compress="zstd")
    r = c.do("POST", "/greet", body=b"you")
    assert r.status == 200 and r.body == b"hello you"
    c.close(); srv.stop()

Errors raised by ``Client.do`` (and ``request``, ``get``...):
``UpstreamError`` (connection, dial or handshake failed, too many pending
requests, client closed), ``GatewayTimeout`` (no answer before the timeout),
``ValueError`` (a request the protocol cannot carry: a GET or HEAD with a
body), ``WrongThread`` (called from a thread other than the client's).
"""

from __future__ import annotations

import sys
import threading
import time

import gevent
from gevent import socket
from gevent.threadpool import ThreadPool

from httptp.errors import GatewayTimeout, UpstreamError
from httptp.io.teleport_client import TeleportClient, least_pending
from httptp.io.teleport_messages import CODECS as _CODECS
from httptp.io.teleport_messages import (Headers, HTTPStatusError, Request, Response,
                                         address, answer_parts, build_request, codec,
                                         default_host, outgoing)
from httptp.io.teleport_server import Answer, TeleportServer

__all__ = ["Client", "Server", "Request", "Response", "Headers", "HTTPStatusError",
           "UpstreamError", "GatewayTimeout", "WrongThread", "CODECS"]

#: Codec names accepted by ``compress=``; flate, none and snappy are the Go
#: original's, zstd and brotli only work between httptp peers.
CODECS = _CODECS


class WrongThread(RuntimeError):
    """A gevent ``Client`` was called from a thread other than its own."""


def _stderr_log(msg: str) -> None:
    sys.stderr.write(f"httptp.teleport: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- client

class Client:
    """Requests over teleport connections to one server address.

    ``addr``: ``"host:port"``, ``"[v6]:port"`` or ``"unix:/path"``.
    ``compress``: the codec of the requests we send (the server picks its own
    for responses; every codec is understood).  ``delay``: batch requests for
    up to this many seconds to compress better (0 sends at once).
    ``max_pending``: requests in flight before ``do`` fails at once.
    ``max_header_size``, ``max_body_size``: bytes of one response's header
    block and body; a response over them fails its request with
    ``UpstreamError`` (``httptp.errors.ResponseTooLarge``) and the connection
    is closed and reopened.
    ``timeout``: default per-request timeout in seconds.  ``conns``: open this
    many connections and send each request on the least busy one (one
    connection is one CPU's worth of compression on the server).

    Connections open lazily on the first request and reopen after a failure
    (after a failed dial or handshake, requests fail fast for 1 s).  Safe to
    share between greenlets of one thread: the thread of its first request
    (its hub's); a call from another thread raises ``WrongThread``.
    """

    def __init__(self, addr: str, *, compress="flate", delay: float = 0.0,
                 max_pending: int = 1000, timeout: float = 3.0, conns: int = 1,
                 max_header_size: int = 65536, max_body_size: int = 64 << 20,
                 read_timeout: float = 120.0, write_timeout: float = 5.0, log=None):
        if conns < 1:
            raise ValueError("conns must be at least 1")
        self.address = address(addr)
        self.timeout = timeout
        self._host = default_host(self.address)
        compress = codec(compress)
        self._clients = [
            TeleportClient(self.address, compress=compress, delay=delay, max_pending=max_pending,
                           max_header_size=max_header_size, max_body_size=max_body_size,
                           read_timeout=read_timeout,
                           write_timeout=write_timeout, dial_timeout=min(3.0, timeout), log=log)
            for _ in range(conns)
        ]
        self._thread: int | None = None     # the thread of the first request (its hub)

    def _check_thread(self) -> None:
        """A Client belongs to the thread of its first request (its hub's)."""
        me = threading.get_ident()
        owner = self._thread
        if owner == me:
            return
        if owner is None:
            self._thread = me
            self._thread_name = threading.current_thread().name
            return
        raise WrongThread(
            f"this httptp.teleport.Client belongs to thread {self._thread_name} (its first "
            f"request ran there) and was called from thread "
            f"{threading.current_thread().name}: gevent connections cannot cross threads. "
            "Make one Client per thread, or use httptp.teleport.aio.AsyncClient in asyncio "
            "code; a blocking handler that needs a client can use one of its own")

    def do(self, method="GET", path="/", headers=None, body=b"", host=None,
           timeout: float | None = None) -> Response:
        """Send one request and return its response.

        ``headers``: a dict or a list of pairs (str or bytes); Content-Length,
        Transfer-Encoding and the other hop-by-hop headers are dropped (the
        protocol frames the body itself).  ``host``: the Host header; default
        a Host from ``headers``, else ``addr``.  ``timeout``: seconds, default
        the client's.  Raises ``UpstreamError``, ``GatewayTimeout``,
        ``ValueError`` (see the module docstring) or ``WrongThread``.
        """
        if self._thread != threading.get_ident():
            self._check_thread()
        aio = sys.modules.get("asyncio")
        if aio is not None and aio.events._get_running_loop() is not None:
            raise RuntimeError(
                "httptp.teleport.Client would block the running asyncio event loop: in "
                "asyncio code use httptp.teleport.aio.AsyncClient (await c.get(...))")
        method, target, hdrs, body = outgoing(method, path, headers, body, host, self._host)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        c = least_pending(self._clients)
        resp = c.request(method, target, hdrs, body, deadline)
        return Response._from_wire(resp.head, resp.body)

    def request(self, method: str, url: str = "/", *, params=None, headers=None, json=None,
                content=None, timeout: float | None = None, host=None) -> Response:
        """httpx's ``request``: ``url`` a path or a full URL (its host becomes
        the Host header; the connection still goes to ``addr``), ``params``
        added to the query, ``json`` (serialised, Content-Type
        application/json) or ``content`` (bytes or str) as the body."""
        method, path, hdrs, body, host = build_request(method, url, params, headers, json,
                                                       content, host)
        return self.do(method, path, hdrs, body, host, timeout)

    def get(self, url="/", **kw) -> Response:
        return self.request("GET", url, **kw)

    def head(self, url="/", **kw) -> Response:
        return self.request("HEAD", url, **kw)

    def options(self, url="/", **kw) -> Response:
        return self.request("OPTIONS", url, **kw)

    def delete(self, url="/", **kw) -> Response:
        return self.request("DELETE", url, **kw)

    def post(self, url="/", content=None, **kw) -> Response:
        return self.request("POST", url, content=content, **kw)

    def put(self, url="/", content=None, **kw) -> Response:
        return self.request("PUT", url, content=content, **kw)

    def patch(self, url="/", content=None, **kw) -> Response:
        return self.request("PATCH", url, content=content, **kw)

    @property
    def pending(self) -> int:
        """Requests sent or queued and not answered yet, over all connections."""
        return sum(c.pending for c in self._clients)

    def close(self) -> None:
        """Close the connections; requests still waiting fail with UpstreamError."""
        for c in self._clients:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- server

class Server:
    """Answers teleport requests with ``handler(request)``.

    ``handler`` gets a ``Request`` and returns ``(status, headers, body)``
    (headers a dict or list of pairs, body bytes or str) or any object with
    ``status``, ``headers``, ``body`` and optionally ``reason`` (a
    ``Response`` works).  It runs in a greenlet of its own per request, so it
    may block cooperatively (or in a thread: ``threads``); an exception
    becomes a 500 and one log line.
    Content-Length is always computed; a HEAD answer's body is dropped.

    ``compress``: the codec of our responses, or ``"auto"`` to answer each
    client in the codec it writes with.  ``delay``: batch responses for up to
    this many seconds.  ``max_header_size``, ``max_body_size``: bytes of one
    request's header block and body; a request whose Content-Length is over
    ``max_body_size`` is answered 413 without calling the handler (its body is
    skipped), anything else over a limit closes the connection.  Either is
    logged once per peer a minute.  ``concurrency``: handlers running at once, over all
    connections; beyond it requests are answered 429 without calling the
    handler.  ``threads``: run each handler in a gevent thread pool of that
    many OS threads, so it may block the ordinary way (``time.sleep``,
    ``requests``, a DB driver) without monkey-patching; at most ``threads``
    run at once, the others wait their turn.  ``log``: a callable taking
    one line (default: stderr).
    """

    def __init__(self, handler, *, compress="flate", delay: float = 0.0,
                 concurrency: int = 10000, max_header_size: int = 65536,
                 max_body_size: int = 64 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, threads: int = 0, log=_stderr_log):
        if threads < 0:
            raise ValueError("threads must be 0 (handlers run in greenlets) or more")
        self.handler = handler
        #: handlers run in a gevent thread pool of this many threads (0: in greenlets)
        self.threads = threads
        self._pool = None
        self._ts = TeleportServer(self._answer, compress=codec(compress, allow_auto=True),
                                  delay=delay, concurrency=concurrency,
                                  max_header_size=max_header_size,
                                  max_body_size=max_body_size, read_timeout=read_timeout,
                                  write_timeout=write_timeout, log=log)
        self.log = log
        self.address: str | None = None
        self._listener = None
        self._accepting = None
        self._stopping = False

    @property
    def busy(self) -> int:
        """Handlers running now."""
        return self._ts.busy

    def _answer(self, head, body: bytes, peer: str) -> Answer:
        req = Request._from_wire(head, body, peer)
        if self.threads:
            pool = self._pool
            if pool is None:            # made in the serving thread, after any fork
                pool = self._pool = ThreadPool(self.threads)
            out = pool.apply(self.handler, (req,))
        else:
            out = self.handler(req)
        return Answer(*answer_parts(out))

    # -- listening -------------------------------------------------------------

    def _listen(self, addr: str):
        a = address(addr, listen=True)
        if a.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET6 if a.is_ipv6 else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(a.sockaddr())
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return sock

    def serve(self, addr: str) -> None:
        """Listen on ``addr`` (``host:port``, ``:port`` or ``unix:/path``) and
        serve until ``stop``."""
        self.serve_socket(self._listen(addr))

    def serve_socket(self, listener) -> None:
        """Serve connections accepted on ``listener`` (a listening
        ``gevent.socket`` socket) until ``stop`` closes it."""
        self._listener = listener
        self.address = _name(listener)
        is_tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        backoff = 0.0
        while not self._stopping:
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if self._stopping:
                    return
                self.log(f"accept failed: {e}")
                backoff = min(1.0, backoff * 2 or 0.005)
                gevent.sleep(backoff)
                continue
            backoff = 0.0
            if is_tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}"
            else:
                peer = "unix"
            self._ts.start(sock, peer)      # served by callbacks from now on

    def start(self, addr: str = "127.0.0.1:0") -> str:
        """Listen on ``addr`` and serve in a background greenlet; return the
        bound address (``host:port`` with the real port, or the path)."""
        listener = self._listener = self._listen(addr)
        self.address = _name(listener)
        self._accepting = gevent.spawn(self.serve_socket, listener)
        return self.address

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let running handlers finish and their answers go out
        (up to ``timeout`` seconds), then close every connection."""
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self._ts.drain()
        if not self._ts.wait_closed(timeout):
            self._ts.abort()
        if self._accepting is not None:
            self._accepting.join(1)
        if self._pool is not None:
            self._pool.kill()               # its threads end once their handler returns
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _name(listener) -> str:
    name = listener.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix:" + (name.decode() if isinstance(name, bytes) else name)
