"""One client connection (http, unix, https): a protocol on gevent's loop.

Theory of operation
-------------------
``ClientConn`` is the protocol of a ``Transport`` (``httptp.io.transport``):
the hub calls ``data_received`` with each read, which goes to the sans-IO
``RequestParser``; its events queue in ``_events`` and ``_pump`` hands them on.
A request head starts an ``Exchange`` (``httptp.io.pipeline``), its body
flows to the exchange as it arrives, and the exchange calls back with the
response (the *downstream* interface: ``response_whole``, ``response_head``
... ``response_end``, ``response_error``), which is written as it comes.  No
greenlet runs per connection or per request.

Pipelined requests are answered in order: the events of a request behind the
one in flight wait in ``_events`` until its response is done, and reading
pauses when they pass ``HIGH_WATER`` bytes.

Timers (``httptp.io.timers.Timer``, one of each per connection, re-armed):

* ``-inHeaderTimeout``: from the accept (or the TLS handshake's start) and
  then from the first byte of each request until its head is complete; 408
  (slowloris is cut here however slowly it drips bytes);
* ``-inIdleTimeout``: between requests on a kept-alive connection (closed
  silently: nothing was asked), and between reads of a request body (408);
* ``-outTimeout``: the exchange's (``pipeline``).

Flow control, both ways: when the upstream cannot take the body as fast as
the client sends it, the exchange pauses our reading; when the client reads
the response slower than the upstream sends it, our transport's queue passes
its high-water mark and we pause the exchange's upstream reading.  Memory per
connection stays bounded whatever the body size.

Every failure the client caused is answered from the error table
(``httptp.errors``) and closes the connection, so a pipelined request behind a
bad one is never answered.  Once a response head went out, a failure can only
cut the connection.

Upgrade: a ``101`` from the upstream (``Exchange.upgraded``) turns the
connection into a tunnel: bytes flow both ways with the same flow control,
under the idle timeout.
"""

from __future__ import annotations

from collections import deque

from httptp import stats as S
from httptp.errors import (MethodNotAllowed, ProtocolError, ProxyError,
                           RequestTimeout)
from httptp.http import policy, writer
from httptp.http.events import END, Data, EndOfMessage, RequestHead
from httptp.http.rules import status_has_body
from httptp.io.transport import HIGH_WATER, tls_info

_KEEP_ALIVE = (b"Connection", b"keep-alive")
_UPGRADE_HEADERS = [(b"Connection", b"upgrade")]
_MAX_QUEUED = 64                # parser events read ahead of the request in flight


class Listener:
    """What a client connection needs from its worker: a small frozen context."""

    __slots__ = ("config", "proxy", "parser_module", "q", "base", "get_only", "log",
                 "log_all_errors", "access_log", "worker")

    def __init__(self, worker):
        self.worker = worker            # conns (the set), draining
        self.config = worker.config
        self.proxy = worker.proxy
        self.parser_module = worker.parser_module
        self.q = worker.stats.q
        self.base = worker.base
        self.get_only = worker.get_only
        self.log = worker.log
        self.log_all_errors = worker.log_all_errors
        self.access_log = worker.access_log


class ClientConn:
    __slots__ = ("ctx", "transport", "client_ip", "parser", "_events", "cur",
                 "_body_done", "_keep", "_chunked", "_close_after", "_head_timer",
                 "_idle_timer", "out_timer", "_first", "_eof", "gone", "_tunnel", "_finished",
                 "_paused_by", "_head", "_busy", "_partial", "__weakref__")

    def __init__(self, ctx: Listener, client_ip: bytes | None):
        self.ctx = ctx
        self.transport = None           # set by the worker before start()
        self.client_ip = client_ip
        cfg = ctx.config
        self.parser = ctx.parser_module.RequestParser(cfg.in_max_header_size,
                                                      cfg.in_max_body_size)
        self._events = deque()
        self.cur = None                 # the exchange in flight
        self._head = None               # its request head
        self._body_done = True
        self._keep = False
        self._chunked = False           # the response in flight goes out chunked
        self._close_after = False       # the response in flight ends the connection
        self._head_timer = None
        self._idle_timer = None
        self.out_timer = None
        self._first = True
        self._eof = False               # the client closed its side
        self.gone = False               # the connection is closed
        self._tunnel = None             # the exchange of an upgraded connection
        self._finished = False
        self._paused_by = 0             # bit 1: the upstream is full, 2: queued requests
        self._busy = False              # inside _pump
        self._partial = False           # bytes of a request whose head is not complete

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        from httptp.io.timers import Timer
        cfg = self.ctx.config
        self._head_timer = Timer(cfg.in_header_timeout)
        self._idle_timer = Timer(cfg.in_idle_timeout)
        self.out_timer = self.ctx.proxy.exchange_timer()
        self._head_timer.arm(self._header_timeout)
        # a client that reads none of its answer for -inIdleTimeout is cut
        self.transport.write_timeout = cfg.in_idle_timeout
        self.transport.start()

    def tls_info(self) -> tuple[str, str] | None:
        """(TLS version, SNI name or "") on an https connection, else None (access log)."""
        return tls_info(self.transport)

    @property
    def idle(self) -> bool:
        """Between requests, nothing of the next one read: safe to close (drain)."""
        return (self.cur is None and not self._events and not self._partial
                and self._tunnel is None)

    def close(self, orderly: bool = True) -> None:
        """Close now (orderly: after what is queued, TLS with close_notify)."""
        if self.gone:
            return
        if orderly:
            self.transport.close()
        else:
            self.transport.abort()
        self._closed()

    def _closed(self) -> None:
        if self.gone:
            return
        self.gone = True
        self._head_timer.close()
        self._idle_timer.close()
        self.out_timer.close()
        ex = self.cur or self._tunnel
        self.cur = self._tunnel = None
        if ex is not None:
            ex.abort()
        self._events.clear()
        self.ctx.worker.conn_closed(self)

    # -- transport callbacks ------------------------------------------------------------------------

    def handshake_done(self, error) -> None:
        """https: the TLS handshake ended (the worker counts a failure)."""
        if error is not None:
            self.ctx.worker.tls_failed(self.client_ip, error)
            self._closed()
            return
        self._head_timer.arm(self._header_timeout)   # the first request's own deadline

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._idle_timer.arm(self._tunnel_idle)
            self._tunnel.tunnel_send(data)
            return
        if self._idle_timer.armed:
            self._idle_timer.disarm()
        if self.cur is None:
            self._partial = True            # a request begins (or goes on)
        try:
            events = self.parser.feed(data)
        except ProtocolError as e:
            self._bad_input(e)
            return
        if events:
            n = len(events)
            if (n <= 3 and events[-1] is END and self.cur is None and not self._events
                    and not self._busy and not self._paused_by and not self._close_after
                    and events[0].__class__ is RequestHead
                    and (n == 2 or events[1].__class__ is Data)):
                # nearly always: one whole request (and its body), so no queue
                self._request(events[0], None if n == 2 else [events[1].data], True)
                events = None
            elif events[-1].__class__ is not Data and isinstance(events[-1], ProtocolError):
                # whole requests, then bad bytes: those are answered first, then
                # the error (the parser is dead: nothing more to read)
                self.transport.pause_reading()
            if events is not None:
                self._events.extend(events)
                self._pump()
        if self.gone:
            return
        if self.cur is None:
            # a head still incomplete: -inHeaderTimeout runs from its first
            # byte (armed here, after the feed, so that a request that came
            # whole, nearly every one, never arms it)
            if self._partial and not self._head_timer.armed:
                self._head_timer.arm(self._header_timeout)
        elif not self._body_done:
            self._idle_timer.arm(self._body_timeout)     # the body's next read

    def eof_received(self) -> None:
        self._eof = True
        if self._tunnel is not None:
            self._tunnel.tunnel_send_eof()
            return
        try:
            events = self.parser.feed(b"")
        except ProtocolError as e:
            self._bad_input(e)
            return
        self._events.extend(events)
        self._pump()
        if self.cur is None and not self._events and not self.gone:
            self.close()                  # the client closed first, between requests

    def connection_lost(self, text: str) -> None:
        self._closed()

    def pause_writing(self) -> None:
        ex = self.cur or self._tunnel
        if ex is not None:
            ex.pause_response()

    def resume_writing(self) -> None:
        ex = self.cur or self._tunnel
        if ex is not None:
            ex.resume_response()

    # -- flow control from the exchange -----------------------------------------------------------

    def pause_reading(self) -> None:
        self._pause(1)

    def resume_reading(self) -> None:
        self._resume(1)

    def _pause(self, why: int) -> None:
        if not self._paused_by:
            self.transport.pause_reading()
            if self.cur is not None and not self._body_done:
                self._idle_timer.disarm()       # not the client's delay
        self._paused_by |= why

    def _resume(self, why: int) -> None:
        if not self._paused_by & why:
            return
        self._paused_by &= ~why
        if not self._paused_by and not self.gone and not self._eof:
            self.transport.resume_reading()
            if self.cur is not None and not self._body_done:
                self._idle_timer.arm(self._body_timeout)

    # -- requests ---------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand queued events on: start the next request when none is in flight."""
        if self._busy:
            return
        self._busy = True
        try:
            events = self._events
            while events and not self.gone:
                if self.cur is None:
                    if self._close_after:
                        break
                    ev = events.popleft()
                    if isinstance(ev, ProxyError):
                        self._answer_error(ev, None)
                        break
                    # what of the body is here already
                    body = []
                    done = False
                    while events:
                        cls = events[0].__class__
                        if cls is Data:
                            body.append(events.popleft().data)
                        elif cls is EndOfMessage:
                            events.popleft()
                            done = True
                            break
                        else:
                            break
                    self._request(ev, body, done)
                    continue
                if self._body_done:
                    break           # a pipelined request waits for this response
                ev = events.popleft()
                if ev.__class__ is Data:
                    self.cur.body_data(ev.data)
                else:
                    self._body_done = True
                    self._idle_timer.disarm()
                    self.cur.body_end()
            if events:     # pipelined requests wait: bound what is read ahead
                if len(events) > _MAX_QUEUED or sum(
                        len(ev.data) for ev in events if ev.__class__ is Data) > HIGH_WATER:
                    self._pause(2)
            elif self._paused_by & 2:
                self._resume(2)
        finally:
            self._busy = False

    def _request(self, head, body: list | None, done: bool) -> None:
        """Start ``head``'s exchange: ``body`` is what of its body is here
        (None: nothing), ``done`` whether that is all of it."""
        ctx = self.ctx
        if head.__class__ is not RequestHead:           # cannot happen with a sane parser
            self._answer_error(ProtocolError("unexpected event before request head"), None)
            return
        if self._head_timer.armed:
            self._head_timer.disarm()
        self._partial = False
        ctx.q[ctx.base + S.IN_REQUEST_START] += 1
        self._head = head
        self._keep = head.keep_alive and not ctx.worker.draining
        if ctx.get_only and head.method != b"GET":
            self._answer_error(MethodNotAllowed(), head)
            return
        if body is None:
            body = []
        if head.expect_continue and not done and not body:
            self.transport.write(writer.CONTINUE_100)
        self._body_done = done
        ex = ctx.proxy.begin(head, self.client_ip, self, self.out_timer, body_done=done)
        if isinstance(ex, ProxyError):
            if done:
                self._answer(ex, head)
            else:
                self._answer_error(ex, head)          # the body cannot be skipped safely
            return
        self.cur = ex
        self._body_done = done
        self._chunked = False
        self._close_after = not self._keep
        ex.start(body, done)
        if self.cur is ex and self.transport.write_paused:
            # the client is still behind on an earlier response: this one
            # waits too (the transport's resume_writing resumes it)
            ex.pause_response()
        if not done and self.cur is ex and not self.gone:
            self._idle_timer.arm(self._body_timeout)

    def _bad_input(self, err: ProtocolError) -> None:
        """The parser refused what came (it stays dead): answer in turn."""
        self.transport.pause_reading()
        if self.cur is not None and not self._body_done:
            # the request in flight is the bad one
            ex = self.cur
            self.cur = None
            ex.abort(log=False)
            if ex.head_sent:
                self.close(orderly=False)
                return
            self._answer_error(err, self._head)
            return
        self._events.append(err)
        self._pump()

    # -- timers ------------------------------------------------------------------------------------------

    def _header_timeout(self) -> None:
        if self.gone:
            return
        if getattr(self.transport, "shaking", False):
            self.ctx.worker.tls_failed(self.client_ip, TimeoutError("handshake timed out"))
            self.close(orderly=False)
            return
        if not self._partial:
            self.close()          # connected and never spoke: nothing to answer
            return
        self._answer_error(RequestTimeout(), None)

    def _idle_expired(self) -> None:
        self.close()

    def _body_timeout(self) -> None:
        if self.gone or self.cur is None:
            return
        ex = self.cur
        self.cur = None
        ex.abort(log=False)
        if ex.head_sent:
            self.close(orderly=False)
        else:
            self._answer_error(RequestTimeout("request body timeout"), self._head)

    def _tunnel_idle(self) -> None:
        self.close()

    # -- answers (the downstream interface) -------------------------------------------------------------

    def _response_headers(self, rh) -> list:
        headers = policy.forward_response_headers(rh.headers)
        if self._keep and self._head.version == b"1.0":
            headers.append(_KEEP_ALIVE)   # HTTP/1.0 keeps a connection only when told
        return headers

    def _keep_now(self) -> bool:
        keep = self._keep and not self.ctx.worker.draining
        self._close_after = not keep
        return keep

    def response_whole(self, rh, body: bytes, ex) -> None:
        keep = self._keep and not self.ctx.worker.draining      # _keep_now, inline
        self._close_after = not keep
        if rh.raw is not None and self._head.version != b"1.0":
            if self._head.method == b"HEAD":
                data = writer.response_lines(rh.status, rh.reason, rh.raw, b"", keep,
                                             rh.content_length)
            else:
                data = writer.response_lines(rh.status, rh.reason, rh.raw, body, keep)
            self.transport.write(data)
            self._response_done()
            return
        headers = self._response_headers(rh)
        if self._head.method == b"HEAD":
            data = writer.response(rh.status, rh.reason, headers, b"", keep,
                                   content_length=rh.content_length)
        else:
            data = writer.response(rh.status, rh.reason, headers, body, keep)
        self.transport.write(data)
        self._response_done()

    def response_head(self, rh, ex) -> None:
        keep = self._keep_now()
        headers = self._response_headers(rh)
        status = rh.status
        if self._head.method == b"HEAD":
            framing = (None if rh.content_length is None
                       else b"Content-Length: %d\r\n" % rh.content_length)
        elif not status_has_body(status):
            framing = None
        elif rh.content_length is not None:
            framing = b"Content-Length: %d\r\n" % rh.content_length
        elif self._head.version != b"1.0":
            framing = writer.CHUNKED
            self._chunked = True
        else:
            framing = None                  # an HTTP/1.0 client: the close ends the body
            keep = False
            self._close_after = True
        self.transport.write(writer.response_head(status, rh.reason, headers, framing, keep))

    def response_data(self, data: bytes) -> None:
        if self._chunked:
            self.transport.write(writer.chunk(data))
        else:
            self.transport.write(data)

    def response_end(self) -> None:
        if self._chunked:
            self.transport.write(writer.LAST_CHUNK)
            self._chunked = False
        self._response_done()

    def response_error(self, err: ProxyError, head_sent: bool) -> None:
        if self.gone:
            return
        if head_sent:
            self.cur = None
            self.close(orderly=False)       # the client sees a cut response
            return
        keep = self._keep_now() and not err.close and self._head.version != b"1.0"
        self._close_after = not keep
        self.transport.write(writer.error_response(err, keep))
        self._response_done()

    def _response_done(self) -> None:
        """The response in flight is written: the next request, or the end."""
        self.cur = None
        self._first = False
        if self.gone:
            return
        if not self._body_done:
            self._close_after = True        # an unread body: the stream cannot go on
        if self._close_after:
            self.close()
            return
        if self._events:
            self._pump()
        if self.cur is None and not self.gone:
            if self._eof:
                self.close()
            elif not self._events:
                self._idle_timer.arm(self._idle_expired)
                if self._paused_by & 1:
                    self._resume(1)

    def _answer(self, err: ProxyError, head) -> None:
        """An answer of ours to a well-formed request (the connection may go on)."""
        keep = self._keep and not err.close and head.version != b"1.0" \
            and not self.ctx.worker.draining
        self._close_after = not keep
        self.cur = None
        if self.ctx.access_log is not None:
            self.ctx.access_log.log(self.client_ip, head, err.status, len(err.payload), "", 0.0,
                                    tls=self.tls_info())
        self.transport.write(writer.error_response(err, keep))
        self._response_done()

    def _answer_error(self, err: ProxyError, head) -> None:
        """Answer a request httptp refuses itself (4xx), then close.  ``head``:
        the request being served, if any; else the error may know the one it
        refuses (a 413 or 431 raised by the parser)."""
        if head is None:
            head = err.request
        ctx = self.ctx
        ctx.q[ctx.base + S.IN_REQUEST_BAD_REQUEST] += 1
        if ctx.log_all_errors:
            ctx.log(f"client {self.client_ip.decode() if self.client_ip else 'unix'}: "
                    f"{err.status} {err.detail or err.body}")
        if ctx.access_log is not None:
            ctx.access_log.log(self.client_ip, head, err.status, len(err.payload), "", 0.0,
                               tls=self.tls_info())
        self.cur = None
        self._events.clear()
        self.transport.write(writer.error_response(err, False))
        self.close()

    # -- upgrade: a tunnel ------------------------------------------------------------------------------

    def response_upgraded(self, rh, rest: bytes, ex) -> None:
        headers = policy.forward_response_headers(rh.headers)
        for name, value in rh.headers:
            if name.lower() == b"upgrade":
                headers.append((b"Upgrade", value))
        headers += _UPGRADE_HEADERS
        self.transport.write(writer.response_head(101, rh.reason or b"Switching Protocols",
                                                  headers, None, True))
        self.cur = None
        self._tunnel = ex
        self._head_timer.disarm()
        self._idle_timer.arm(self._tunnel_idle)
        if rest:
            self.transport.write(rest)
        # bytes the client sent after its upgrade request belong to the tunnel
        # (the parser read them as HTTP: a client that waits for the 101, as
        # WebSocket clients do, sends none)
        self._events.clear()
        self._paused_by = 0
        if not self._eof:
            self.transport.resume_reading()

    def tunnel_data(self, data: bytes) -> None:
        self._idle_timer.arm(self._tunnel_idle)
        self.transport.write(data)

    def tunnel_eof(self) -> None:
        if self.transport.half_close:
            self.transport.write_eof()
            return
        ex, self._tunnel = self._tunnel, None     # TLS: close_notify ends both ways
        ex.abort()
        self.close()

    def tunnel_closed(self, error: bool = False) -> None:
        self._tunnel = None
        self.close(orderly=not error)

