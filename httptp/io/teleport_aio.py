"""The teleport library for asyncio: ``AsyncClient`` and ``AsyncServer``.

``serve_asgi``, the ASGI adapter on top of ``AsyncServer``, is in
``httptp.io.teleport_asgi``.

Theory of operation
-------------------
The same protocol as the gevent library (``httptp.io.teleport_api``), on the
same sans-IO connection (``httptp.teleport.connection``: handshake, codecs,
frame reader and its limits, request ids and the pending map), driven by
asyncio streams instead of gevent watchers.  It runs on whatever loop is
running: the default one or uvloop (``run(main())`` picks uvloop when it is
installed).  Nothing here imports gevent.

Client: one ``_Link`` per connection, opened lazily by the first request in
a task that dials, exchanges the 15-byte handshakes (then TLS with
``StreamWriter.start_tls`` when an ``ssl`` context is given, as
``-outType=teleports``) and then reads: each read is fed to the connection,
decompressed a slice at a time (the loop gets a turn every ``YIELD_SLICES``
slices, so a peer's compression bomb never holds it), and each answer
resolves its request's future.  Requests are queued as frames and framed
into a batch by a flush that runs once per loop turn (``delay`` 0) or
``delay`` seconds after the first frame of a batch; ``BATCH_BYTES`` of
frames flush at once.  A request still queued when its caller gives up is
never sent.  Any IO, codec or framing error ends the link and fails every
request pending on it with ``UpstreamError``; after a failed dial or
handshake, requests fail fast with the same error for ``connection.STICKY_FOR``
seconds, as the gevent client does.

Server: one task per connection reads the client's handshake (within
``handshake_timeout``), answers it (TLS when both ask: an ``ssl`` server
context), then reads frames; each request runs the handler in a task of its
own and its answer joins the current batch.  Over ``concurrency`` running
handlers a request is answered 429, a Content-Length over
``max_body_size`` 413 (its body is skipped), exactly as the gevent server.

Errors are the gevent library's: ``httptp.errors.UpstreamError`` (and
``ResponseTooLarge``), ``GatewayTimeout``, ``ValueError``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time

from httptp.errors import GatewayTimeout, PayloadTooLarge, ResponseTooLarge, UpstreamError
from httptp.io.teleport_messages import (
    CODECS, Headers, HTTPStatusError, Request, Response, address, answer_parts,
    build_request, codec, default_host, outgoing)
from httptp.teleport import FrameTooLarge, TeleportError
from httptp.teleport.connection import ClientConnection, FailFast, ServerConnection
from httptp.teleport.handshake import HEADER_SIZE

__all__ = ["AsyncClient", "AsyncServer", "run", "Request", "Response", "Headers",
           "HTTPStatusError", "UpstreamError", "GatewayTimeout", "CODECS"]

BATCH_BYTES = 65536     # Go's WriteBufferSize: this much unflushed input flushes at once
YIELD_SLICES = 16       # decompressed slices handled before the loop gets a turn
READ_SIZE = 256 * 1024
HANDSHAKE_TIMEOUT = 3.0
HIGH_WATER = 1 << 20    # unsent bytes over which a link stops flushing until they drain

_TEXT_PLAIN = [(b"Content-Type", b"text/plain; charset=utf-8")]
_TOO_LARGE = PayloadTooLarge()
_INTERNAL = (500, b"Internal Server Error", _TEXT_PLAIN, b"internal error\n")


def run(main, *, debug: bool | None = None):
    """``asyncio.run(main)`` on uvloop when it is installed, else on the
    default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main, debug=debug)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop, debug=debug) as runner:
        return runner.run(main)


def _stderr_log(msg: str) -> None:
    sys.stderr.write(f"httptp.teleport: {msg}\n")
    sys.stderr.flush()


def _error_text(e: BaseException) -> str:
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or e.__class__.__name__


async def _open(addr, limit=READ_SIZE):
    if addr.kind == "unix":
        return await asyncio.open_unix_connection(addr.sockaddr(), limit=limit)
    return await asyncio.open_connection(addr.host, addr.port, limit=limit)


async def _writes_progress(writer, timeout: float) -> bool:
    """Wait until ``writer``'s buffer has drained: True; False once no byte
    of it left for ``timeout`` seconds (a peer that stopped reading)."""
    transport = writer.transport
    while True:
        mark = transport.get_write_buffer_size()
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
            return True
        except TimeoutError:
            if transport.get_write_buffer_size() >= mark:
                return False


# --------------------------------------------------------------------------- client

class _Call:
    __slots__ = ("id", "frame", "future", "sent")

    def __init__(self, req_id: int, frame: bytes, future):
        self.id = req_id
        self.frame = frame      # None once framed into a batch, or cancelled
        self.future = future
        self.sent = False


class _Link:
    """One client connection (see the module doc)."""

    def __init__(self, client: "AsyncClient"):
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.conn = ClientConnection(client.compress, max_header_size=client.max_header_size,
                                     max_body_size=client.max_body_size,
                                     first_id=client._first_id, skip_pending_ids=False)
        self.calls: dict[int, _Call] = {}
        self.queue: list[_Call] = []
        self.queued = 0
        self.open = False
        self.dead = False
        self.error: str | None = None
        self.writer = None
        self._flush_handle = None
        self._drain_task = None
        self._write_check = None
        self.task = self.loop.create_task(self._run())

    # -- life ------------------------------------------------------------------

    async def _run(self) -> None:
        client = self.client
        stage = "cannot connect: "
        try:
            async with asyncio.timeout(client.dial_timeout):
                reader, self.writer = await _open(client.address)
            stage = ""
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await self._handshake(reader)
        except asyncio.CancelledError:
            self.fail("client closed", quiet=True)
            raise
        except (OSError, TimeoutError, TeleportError, EOFError, ValueError) as e:
            if isinstance(e, asyncio.IncompleteReadError):
                text = "connection closed during the handshake"
            elif stage and isinstance(e, OSError) and e.errno:
                text = stage + os.strerror(e.errno)     # not asyncio's "Connect call failed"
            elif not stage and isinstance(e, TimeoutError):
                text = "handshake timed out"
            else:
                text = stage + _error_text(e)
            client.fail_fast.failed(text)
            self.fail(text, sticky=True)
            return
        self.open = True
        if self.queue:
            self._flush()
        try:
            await self._read(reader)
        except asyncio.CancelledError:
            self.fail("client closed", quiet=True)
            raise
        except FrameTooLarge as e:
            self._too_large(e)
        except (OSError, TimeoutError, TeleportError) as e:
            self.fail(_error_text(e))
        except Exception as e:                  # a bug: fail the calls, say what it was
            self.fail(f"internal error: {e.__class__.__name__}: {e}")

    async def _handshake(self, reader) -> None:
        client, conn, writer = self.client, self.conn, self.writer
        tls = client.ssl is not None
        writer.write(conn.handshake(tls))
        hello = await reader.readexactly(HEADER_SIZE)
        _, theirs = conn.receive_handshake(hello)
        if tls and not theirs:
            raise TeleportError("the server refused TLS")
        if theirs and not tls:
            raise TeleportError("the server requires TLS (use -outType=teleports)")
        if tls:
            try:
                await writer.start_tls(client.ssl, server_hostname=client.server_hostname)
            except (OSError, ValueError) as e:      # ssl.SSLError, a certificate refused
                raise TeleportError(f"TLS handshake failed: {_error_text(e)}") from None

    async def _read(self, reader) -> None:
        conn, calls, client = self.conn, self.calls, self.client
        while True:
            try:
                async with asyncio.timeout(client.read_timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if not calls:
                    self.fail("idle for longer than the read timeout", quiet=True)
                    return
                raise
            if not data:
                self.fail("connection closed by the server", quiet=not calls)
                return
            conn.feed(data)
            slices = 0
            while (frames := conn.next_frames()) is not None:
                for req_id, head, body in frames:
                    call = calls.pop(req_id, None)
                    if call is not None and not call.future.done():
                        call.future.set_result(Response._from_wire(head, body))
                slices += 1
                if slices % YIELD_SLICES == 0:
                    await asyncio.sleep(0)
                    if self.dead:
                        return

    # -- requests --------------------------------------------------------------

    def submit(self, method: bytes, target: bytes, headers: list, body: bytes) -> _Call:
        req_id, frame = self.conn.send_request(method, target, headers, body)
        call = _Call(req_id, frame, self.loop.create_future())
        self.calls[req_id] = call
        self.queue.append(call)
        self.queued += len(frame)
        if not self.open:
            return call
        if self.queued >= BATCH_BYTES:
            self._flush()
        elif self._flush_handle is None:
            delay = self.client.delay
            self._flush_handle = (self.loop.call_later(delay, self._flush) if delay > 0
                                  else self.loop.call_soon(self._flush))
        return call

    def cancel(self, call: _Call) -> None:
        """The caller gave up (timeout, cancelled): forget the id; a queued
        frame is never sent, a late answer is read and dropped."""
        if self.calls.pop(call.id, None) is None:
            return
        if call.frame is not None:
            self.queued -= len(call.frame)
            call.frame = None
            self.conn.forget(call.id, sent=False)
        else:
            self.conn.forget(call.id, sent=True)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.dead or not self.open or self._drain_task is not None:
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > HIGH_WATER:
            self._drain_task = self.loop.create_task(self._drained())
            return
        conn, batch = self.conn, []
        try:
            for call in self.queue:
                frame = call.frame
                if frame is None:
                    continue
                call.frame = None
                batch.append(call)
                if conn.write(frame) >= BATCH_BYTES:
                    self._send(batch)
                    batch = []
            self.queue.clear()
            self.queued = 0
            if batch:
                self._send(batch)
        except TeleportError as e:
            self.fail(_error_text(e))

    def _send(self, batch: list) -> None:
        data = self.conn.flush()
        for call in batch:
            call.sent = True
        self.writer.write(data)
        if self._write_check is None and self.writer.transport.get_write_buffer_size():
            self._write_check = self.loop.create_task(self._check_writes())

    async def _drained(self) -> None:
        try:
            await self.writer.drain()
        except (OSError, ConnectionError) as e:
            self.fail(_error_text(e))
            return
        self._drain_task = None
        if self.queue:
            self._flush()

    async def _check_writes(self) -> None:
        """Bytes waiting to go out must make progress: none leaving for
        ``write_timeout`` ends the link."""
        try:
            ok = await _writes_progress(self.writer, self.client.write_timeout)
        except (OSError, ConnectionError) as e:
            self._write_check = None
            self.fail(_error_text(e))
            return
        self._write_check = None
        if not ok:
            self.fail("write timed out")

    # -- ends ------------------------------------------------------------------

    def _too_large(self, e: FrameTooLarge) -> None:
        client = self.client
        text = f"response {e} ({'max_header_size' if e.what == 'header' else 'max_body_size'})"
        call = self.calls.pop(e.req_id, None) if e.req_id is not None else None
        if call is not None and not call.future.done():
            call.future.set_exception(ResponseTooLarge(text))
        self.fail(text, quiet=True)
        if client.log is not None:
            client.log(f"teleport connection to {client.name}: {text}")

    def fail(self, text: str, *, sticky: bool = False, quiet: bool = False) -> None:
        """Close the connection; every call still pending fails."""
        if self.dead:
            return
        self.dead = True
        self.error = text
        client = self.client
        if client._link is self:
            client._link = None
            client._first_id = self.conn.next_id        # ids carry on over the next link
        for handle in (self._flush_handle,):
            if handle is not None:
                handle.cancel()
        for task in (self._drain_task, self._write_check):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self.writer is not None:
            self.writer.transport.abort()
        calls = list(self.calls.values())
        self.calls.clear()
        self.queue.clear()
        msg = f"teleport connection to {client.name} failed: {text}"
        if (calls and not quiet or sticky) and client.log is not None:
            client.log(msg)
        for call in calls:
            if not call.future.done():
                call.future.set_exception(UpstreamError(msg, sent_nothing_back=not call.sent))
        if self.task is not asyncio.current_task() and not self.task.done():
            self.task.cancel()


class AsyncClient:
    """Requests over teleport connections to one server address, for asyncio.

    The arguments are the gevent ``Client``'s (docs/library.md), plus
    ``ssl``: an ``ssl.SSLContext`` to run the connection inside TLS, as
    ``-outType=teleports`` (``server_hostname``: the name the certificate is
    checked against; default the address's host).  Safe to share between
    tasks of one loop."""

    def __init__(self, addr, *, compress="flate", delay: float = 0.0,
                 max_pending: int = 1000, timeout: float = 3.0, conns: int = 1,
                 max_header_size: int = 65536, max_body_size: int = 64 << 20,
                 read_timeout: float = 120.0, write_timeout: float = 5.0, ssl=None,
                 server_hostname: str | None = None, log=None):
        if conns < 1:
            raise ValueError("conns must be at least 1")
        addr = address(addr)
        self._pool = [_OneConn(addr, codec(compress), delay, max_pending, max_header_size,
                               max_body_size, read_timeout, write_timeout,
                               min(3.0, timeout), ssl, server_hostname, log)
                      for _ in range(conns)]
        self.address = addr
        self.timeout = timeout
        self._host = default_host(addr)
        self._closed = False
        self._loop = None               # the loop of the first request

    @property
    def pending(self) -> int:
        """Requests sent or queued and not answered yet, over all connections."""
        return sum(c.pending for c in self._pool)

    async def do(self, method="GET", path="/", headers=None, body=b"", host=None,
                 timeout: float | None = None) -> Response:
        """Send one request and return its response: the arguments and errors
        of the gevent ``Client.do``."""
        if asyncio.get_running_loop() is not self._loop:
            self._bind_loop()
        m, target, hdrs, body = outgoing(method, path, headers, body, host, self._host)
        pool = self._pool
        one = pool[0] if len(pool) == 1 else min(pool, key=lambda c: c.pending)
        return await one.request(m, target, hdrs, body,
                                 self.timeout if timeout is None else timeout)

    def _bind_loop(self) -> None:
        """A client belongs to the loop of its first request; after that loop
        closed (one ``asyncio.run`` after another) it moves to the new one."""
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is not None and not old.is_closed():
            raise RuntimeError(
                "this AsyncClient belongs to another event loop that is still open (the one "
                "of its first request): make one client per loop")
        for one in self._pool:                   # links of a closed loop are gone
            one._link = None
        self._loop = loop

    async def request(self, method: str, url: str = "/", *, params=None, headers=None,
                      json=None, content=None, timeout: float | None = None,
                      host=None) -> Response:
        """httpx's ``request``: ``url`` a path or a full URL (its host becomes
        the Host header; the connection still goes to ``addr``), ``params``
        added to the query, ``json`` or ``content`` as the body."""
        method, path, hdrs, body, host = build_request(method, url, params, headers, json,
                                                       content, host)
        return await self.do(method, path, hdrs, body, host, timeout)

    async def get(self, url="/", **kw) -> Response:
        return await self.request("GET", url, **kw)

    async def head(self, url="/", **kw) -> Response:
        return await self.request("HEAD", url, **kw)

    async def options(self, url="/", **kw) -> Response:
        return await self.request("OPTIONS", url, **kw)

    async def delete(self, url="/", **kw) -> Response:
        return await self.request("DELETE", url, **kw)

    async def post(self, url="/", content=None, **kw) -> Response:
        return await self.request("POST", url, content=content, **kw)

    async def put(self, url="/", content=None, **kw) -> Response:
        return await self.request("PUT", url, content=content, **kw)

    async def patch(self, url="/", content=None, **kw) -> Response:
        return await self.request("PATCH", url, content=content, **kw)

    async def aclose(self) -> None:
        """Close the connections; requests still waiting fail with UpstreamError."""
        self._closed = True
        for c in self._pool:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


class _OneConn:
    """One multiplexed connection slot of an `AsyncClient` (links come and go)."""

    def __init__(self, addr, compress, delay, max_pending, max_header_size, max_body_size,
                 read_timeout, write_timeout, dial_timeout, ssl, server_hostname, log):
        self.address = addr
        self.name = str(addr)
        self.compress = compress
        self.delay = delay
        self.max_pending = max_pending
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.dial_timeout = dial_timeout
        self.ssl = ssl
        self.server_hostname = server_hostname or (addr.host if addr.kind == "tcp" else None)
        self.log = log
        self._link: _Link | None = None
        self._first_id = 1
        self.fail_fast = FailFast(self.name, time.monotonic)

    @property
    def pending(self) -> int:
        link = self._link
        return len(link.calls) if link is not None else 0

    async def request(self, method, target, headers, body, timeout) -> Response:
        why = self.fail_fast.refusal()
        if why is not None:
            raise UpstreamError(why)
        link = self._link
        if link is None:
            link = self._link = _Link(self)
        if len(link.calls) >= self.max_pending:
            raise UpstreamError("teleport: too many pending requests")
        try:
            call = link.submit(method, target, headers, body)
        except TeleportError as e:              # id overflow, or the link failed already
            link.fail(str(e))
            raise UpstreamError(f"teleport connection to {self.name} failed: {link.error}") \
                from None
        try:
            async with asyncio.timeout(timeout if timeout > 0 else 0):
                return await call.future
        except TimeoutError:
            raise GatewayTimeout("teleport: timed out") from None
        finally:
            if not call.future.done() or call.future.cancelled():
                link.cancel(call)

    async def close(self) -> None:
        self.fail_fast.closed = True
        link = self._link
        if link is not None:
            link.fail("client closed", quiet=True)
            try:
                await asyncio.wait_for(asyncio.shield(link.task), 1)
            except (asyncio.CancelledError, TimeoutError, Exception):
                pass


# --------------------------------------------------------------------------- server

class AsyncServer:
    """Answers teleport requests with ``handler(request)``, for asyncio.

    ``handler`` is a coroutine function or a plain function (called on the
    loop, so it must not block, unless ``threads``) taking a ``Request`` and
    returning ``(status, headers, body)`` or an object with ``status``,
    ``headers``, ``body``.  The arguments are the gevent ``Server``'s, plus
    ``ssl``: an ``ssl.SSLContext`` (server side) to accept clients that ask
    for TLS (``-inType=teleports``); ``allow_plaintext`` also accepts those
    that do not.  ``threads``: a plain-function handler runs in a thread
    pool of that many threads instead of on the loop, so it may block (as
    the gevent ``Server``'s ``threads``; ignored for a coroutine function)."""

    def __init__(self, handler, *, compress="flate", delay: float = 0.0,
                 concurrency: int = 10000, max_header_size: int = 65536,
                 max_body_size: int = 64 << 20, read_timeout: float = 120.0,
                 write_timeout: float = 5.0, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 ssl=None, allow_plaintext: bool = False, threads: int = 0,
                 log=_stderr_log):
        if threads < 0:
            raise ValueError("threads must be 0 (plain handlers run on the loop) or more")
        self.handler = handler
        #: a plain-function handler runs in a thread pool of this many threads (0: on the loop)
        self.threads = threads if not inspect.iscoroutinefunction(handler) else 0
        self._pool = None
        c = codec(compress, allow_auto=True)
        self.compress = None if c == "auto" else c
        self.delay = delay
        self.concurrency = concurrency
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.ssl = ssl
        self.allow_plaintext = allow_plaintext
        self.log = log
        self.address: str | None = None
        self._busy = 0
        self._busy_body = (f"concurrency limit of {concurrency} exceeded; raise -concurrency or "
                           "reduce the load\n").encode()
        self._server = None
        self._conns: set[_ServerConn] = set()
        self._tasks: set = set()            # handler tasks running
        self._refusals: dict[str, float] = {}

    @property
    def busy(self) -> int:
        """Handlers running now."""
        return self._busy

    def _log(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def _refuse_log(self, peer: str, msg: str) -> None:
        """One line per peer host a minute, as the gevent server's refusals."""
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        if now >= self._refusals.get(host, 0.0):
            if len(self._refusals) >= 4096:     # bounded: many peers forget sooner
                self._refusals.clear()
            self._refusals[host] = now + 60.0
            self._log(msg)

    async def start(self, addr: str = "127.0.0.1:0") -> str:
        """Listen on ``addr`` (``host:port``, ``:port`` or ``unix:/path``)
        and serve in the background; return the bound address."""
        a = address(addr, listen=True)
        if a.kind == "unix":
            if not a.path.startswith("@") and os.path.exists(a.path):
                os.unlink(a.path)
            self._server = await asyncio.start_unix_server(self._accept, a.sockaddr(),
                                                           limit=READ_SIZE)
            self.address = f"unix:{a.path}"
        else:
            self._server = await asyncio.start_server(self._accept, a.host or None, a.port,
                                                      limit=READ_SIZE, backlog=1024,
                                                      reuse_address=True)
            host, port = self._server.sockets[0].getsockname()[:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    async def serve(self, addr: str) -> None:
        """Listen on ``addr`` and serve until cancelled or ``stop``."""
        await self.start(addr)
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass
        finally:
            await self.stop()

    async def _accept(self, reader, writer) -> None:
        peername = writer.get_extra_info("peername")
        if isinstance(peername, tuple):
            host, port = peername[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            peer = "unix"
        conn = _ServerConn(self, reader, writer, peer)
        self._conns.add(conn)
        try:
            await conn.serve()
        finally:
            self._conns.discard(conn)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let running handlers finish and their answers go
        out (up to ``timeout`` seconds), then close every connection."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.drain()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=timeout)
        for conn in list(self._conns):
            conn.abort()
        if self._pool is not None:
            self._pool.shutdown(wait=False)     # its threads end once their handler returns
            self._pool = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def _call(self, req: Request):
        if self.threads:
            pool = self._pool
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor
                pool = self._pool = ThreadPoolExecutor(self.threads,
                                                       thread_name_prefix="teleport-handler")
            out = await asyncio.get_running_loop().run_in_executor(pool, self.handler, req)
        else:
            out = self.handler(req)
        if inspect.isawaitable(out):
            out = await out
        return answer_parts(out)


class _ServerConn:
    """One server connection (see the module doc)."""

    def __init__(self, server: AsyncServer, reader, writer, peer: str):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.conn = ServerConnection(server.compress, max_header_size=server.max_header_size,
                                     max_body_size=server.max_body_size)
        self.inflight = 0
        self.draining = False
        self.dead = False
        self.closed = self.loop.create_future()
        self._flush_handle = None
        self._write_check = None
        self._reading = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def serve(self) -> None:
        """The connection's life, in the task asyncio made for it; whatever
        happens, the transport is closed on the way out."""
        self._reading = asyncio.current_task()      # drain() cancels it, even mid-handshake
        try:
            await self._serve()
        finally:
            self.abort()

    async def _serve(self) -> None:
        srv = self.server
        opened = False
        try:
            async with asyncio.timeout(srv.handshake_timeout):
                opened = await self._handshake()
            if opened:
                await self._read()
        except asyncio.CancelledError:
            if not self.draining:
                raise
            asyncio.current_task().uncancel()   # drain() stopped the reading: finish below
        except asyncio.IncompleteReadError:
            pass                                # closed before or during its handshake
        except TimeoutError:
            pass                                # said nothing in time: closed silently
        except FrameTooLarge as e:
            srv._refuse_log(self.peer, f"teleport client {self.peer}: request {e} "
                            f"({'max_header_size' if e.what == 'header' else 'max_body_size'})")
        except TeleportError as e:
            srv._log(f"teleport client {self.peer}: {e}")
        except (OSError, ConnectionError):
            pass
        except Exception as e:                  # a bug: one line, never a traceback
            srv._log(f"teleport client {self.peer}: internal error: "
                     f"{e.__class__.__name__}: {e}")
            return
        if opened and self.draining and not self.dead:
            await self._finish()

    async def _handshake(self) -> bool:
        srv, conn, writer = self.server, self.conn, self.writer
        hello = await self.reader.readexactly(HEADER_SIZE)
        _, tls = conn.receive_handshake(hello)
        refuse_plain = not tls and srv.ssl is not None and not srv.allow_plaintext
        writer.write(conn.handshake(srv.ssl is not None and (tls or refuse_plain)))
        if tls and srv.ssl is None:
            srv._log(f"teleport client {self.peer} asked for TLS, which this listener "
                     "does not have: closed")
            await writer.drain()
            return False
        if refuse_plain:
            srv._log(f"teleport client {self.peer} did not ask for TLS, which this "
                     "listener requires: closed")
            await writer.drain()
            return False
        if tls:
            await writer.start_tls(srv.ssl)
        return True

    async def _read(self) -> None:
        srv, conn, reader = self.server, self.conn, self.reader
        while not self.draining:
            try:
                async with asyncio.timeout(srv.read_timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                self.draining = True            # idle: closed in order, once answered
                return
            if not data:
                self.draining = True            # the client is done: answer, then close
                return
            conn.feed(data)
            slices = 0
            while (frames := conn.next_frames()) is not None:
                for req_id, head, body in frames:
                    self._request(req_id, head, body)
                slices += 1
                if slices % YIELD_SLICES == 0:
                    await asyncio.sleep(0)
            if self.writer.transport.get_write_buffer_size() > HIGH_WATER:
                await self.writer.drain()       # answers not leaving: read no more for now

    def _request(self, req_id: int, head, body) -> None:
        srv = self.server
        if body is None:
            srv._refuse_log(self.peer, (
                f"teleport client {self.peer}: {head.method.decode('latin-1')} "
                f"{head.target[:200].decode('latin-1')}: body of {head.content_length} bytes "
                f"is over the limit of {srv.max_body_size} (max_body_size); answered 413"))
            err = _TOO_LARGE
            self._queue(self.conn.send_response(req_id, err.status, err.reason.encode(),
                                                _TEXT_PLAIN, err.payload))
            return
        if srv._busy >= srv.concurrency:
            self._queue(self.conn.send_response(req_id, 429, b"Too Many Requests", _TEXT_PLAIN,
                                                srv._busy_body))
            return
        srv._busy += 1
        self.inflight += 1
        self._idle.clear()
        task = self.loop.create_task(self._handle(req_id, head, body))
        tasks = self.server._tasks          # asyncio keeps only weak references to tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _handle(self, req_id: int, head, body: bytes) -> None:
        srv = self.server
        try:
            status, reason, headers, rbody = await srv._call(
                Request._from_wire(head, body, self.peer))
        except asyncio.CancelledError:
            self._done()
            raise
        except Exception as e:
            srv._log(f"teleport handler failed for {head.method.decode('latin-1')} "
                     f"{head.target.decode('latin-1')}: {e.__class__.__name__}: {e}")
            status, reason, headers, rbody = _INTERNAL
        self._done()
        if self.dead:
            return
        try:
            frame = self.conn.send_response(req_id, status, reason, headers, rbody)
        except ValueError as e:
            srv._log(f"teleport handler failed for {head.method.decode('latin-1')} "
                     f"{head.target.decode('latin-1')}: {e}")
            frame = self.conn.send_response(req_id, *_INTERNAL)
        self._queue(frame)

    def _done(self) -> None:
        self.server._busy -= 1
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    def _queue(self, frame: bytes) -> None:
        if self.dead or not frame:
            return
        try:
            n = self.conn.write(frame)
        except TeleportError:
            self.abort()
            return
        if n >= BATCH_BYTES:
            self._flush()
        elif self._flush_handle is None:
            delay = self.server.delay
            self._flush_handle = (self.loop.call_later(delay, self._flush) if delay > 0
                                  else self.loop.call_soon(self._flush))

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.dead:
            return
        try:
            data = self.conn.flush()
        except TeleportError:
            self.abort()
            return
        if data:
            self.writer.write(data)
            if self._write_check is None and self.writer.transport.get_write_buffer_size():
                self._write_check = self.loop.create_task(self._check_writes())

    async def _check_writes(self) -> None:
        """A client of which nothing left for ``write_timeout`` is cut."""
        try:
            ok = await _writes_progress(self.writer, self.server.write_timeout)
        except (OSError, ConnectionError, RuntimeError):
            ok = False
        self._write_check = None
        if not ok:
            self.abort()

    def drain(self) -> None:
        """Read no more requests; close once the ones in flight are answered."""
        if self.draining:
            return
        self.draining = True
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()

    async def _finish(self) -> None:
        """Answer what is running, flush, end our side in order."""
        try:
            await self._idle.wait()
            self._flush()
            writer = self.writer
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(self.server.write_timeout):
                await writer.drain()
        except (TimeoutError, OSError, ConnectionError, RuntimeError):
            pass                                # gone already (uvloop: RuntimeError)

    def abort(self) -> None:
        if self.dead:
            return
        self.dead = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._write_check is not None and self._write_check is not asyncio.current_task():
            self._write_check.cancel()
        self.writer.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)
