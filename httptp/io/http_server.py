"""One client connection: read → parse → proxy → write, until it ends.

Theory of operation
-------------------
A greenlet per accepted connection runs ``ClientConnection.serve``.  Requests are
handled one at a time in arrival order, so pipelined requests are answered in
order without any reordering buffer; events the parser produced for later
requests wait in ``_events``.

Timeouts (``-inHeaderTimeout``, ``-inIdleTimeout``):

* waiting for the first byte of a request on a kept-alive connection: the idle
  timeout; the connection is closed silently when it passes (nothing was asked);
* from the first byte of a request until its header block is complete: the
  header deadline; when it passes the client gets 408 and the connection closes
  (slowloris is cut here however slowly it drips bytes);
* each read of a request body: the idle timeout, 408 on expiry.

Every failure the client caused is answered from the error table
(``httptp.errors``) and closes the connection, so a pipelined request behind a
bad one is never answered.

``orderly`` tells the worker how the connection ended: true when it may close
with a TLS close_notify (``sockio.close_tls``): after the last response, after
the idle timeout, after an error answer that went out, or when the client
closed first; false on a read or write error.
"""

from __future__ import annotations

import time
from collections import deque

from gevent import get_hub, socket

from httptp import stats as S
from httptp.errors import ProtocolError, ProxyError, RequestTimeout, MethodNotAllowed
from httptp.http import writer
from httptp.http.events import Data, EndOfMessage, RequestHead
from httptp.io.sockio import is_plain, recv_after_wait, send_all
from httptp.io.timers import Deadline

_RECV_SIZE = 65536


class _Closed(Exception):
    """The client went away (EOF or reset); nothing more to say to it."""


class _Idle(Exception):
    """The keep-alive idle timeout passed before a new request started."""


class ClientConnection:
    __slots__ = ("sock", "worker", "proxy", "client_ip", "parser", "_events", "idle",
                 "_q", "_base", "_first", "_plain", "_idle_timer", "_out_timer", "_hold",
                 "orderly")

    def __init__(self, sock, client_ip: bytes | None, worker):
        self.sock = sock
        self.worker = worker
        self.proxy = worker.proxy
        self.client_ip = client_ip
        cfg = worker.config
        self.parser = worker.parser_module.RequestParser(cfg.in_max_header_size, cfg.in_max_body_size)
        self._events = deque()
        self.idle = True          # waiting for a request: safe to close when draining
        self._q = worker.stats.q
        self._base = worker.base
        self._first = True
        self._plain = False       # set by serve(): https swaps in the TLS socket first
        self._idle_timer = None
        self._out_timer = None
        self._hold = None
        self.orderly = False      # set when the connection ends without an IO error

    # -- reading ---------------------------------------------------------------

    def _recv(self, timeout: float) -> bytes:
        sock = self.sock
        sock.settimeout(timeout)
        q, b = self._q, self._base
        try:
            data = sock.recv(_RECV_SIZE)
        except socket.timeout:
            raise
        except OSError:
            q[b + S.IN_READ_ERROR] += 1
            raise _Closed() from None
        q[b + S.IN_READ_CALLS] += 1
        q[b + S.IN_BYTES_READ] += len(data)
        return data

    def _wait_request(self) -> bytes:
        """The first bytes of the next request on a kept-alive plain connection.

        The client sends it only after reading our last response, so it is
        not there yet: wait for it (``recv_after_wait``) under the idle
        timeout, which raises _Idle."""
        timer = self._idle_timer
        timer.arm()
        try:
            data = recv_after_wait(self.sock, _RECV_SIZE)
        except OSError:
            self._q[self._base + S.IN_READ_ERROR] += 1
            raise _Closed() from None
        finally:
            timer.disarm()
        q, b = self._q, self._base
        q[b + S.IN_READ_CALLS] += 1
        q[b + S.IN_BYTES_READ] += len(data)
        return data

    def _next_head(self) -> RequestHead | None:
        """The next request head, or None when the client closed cleanly."""
        events = self._events
        cfg = self.worker.config
        started = None
        while not events:
            if started is None and not self._first and self._plain:
                data = self._wait_request()
            else:
                if started is None:
                    timeout = cfg.in_header_timeout if self._first else cfg.in_idle_timeout
                else:
                    timeout = started + cfg.in_header_timeout - time.monotonic()
                    if timeout <= 0:
                        raise RequestTimeout()
                try:
                    data = self._recv(timeout)
                except socket.timeout:
                    if started is None:
                        raise _Idle() from None
                    raise RequestTimeout() from None
            if started is None:
                started = time.monotonic()
                self.idle = False
            events.extend(self.parser.feed(data))
            if not data and not events:
                return None
        ev = events.popleft()
        if ev.__class__ is not RequestHead:  # cannot happen with a sane parser
            raise ProtocolError("unexpected event before request head")
        self.idle = False
        return ev

    def _read_body(self, head: RequestHead) -> bytes:
        events = self._events
        chunks = []
        idle_timeout = self.worker.config.in_idle_timeout
        while True:
            while events:
                ev = events.popleft()
                cls = ev.__class__
                if cls is Data:
                    chunks.append(ev.data)
                elif cls is EndOfMessage:
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                data = self._recv(idle_timeout)
            except socket.timeout:
                raise RequestTimeout("request body timeout") from None
            events.extend(self.parser.feed(data))

    # -- writing ---------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        q, b = self._q, self._base
        try:
            send_all(self.sock, data)
        except OSError:
            q[b + S.IN_WRITE_ERROR] += 1
            raise _Closed() from None
        q[b + S.IN_WRITE_CALLS] += 1
        q[b + S.IN_BYTES_WRITTEN] += len(data)

    # -- the loop --------------------------------------------------------------

    def serve(self) -> None:
        worker = self.worker
        q, b = self._q, self._base
        self._plain = is_plain(self.sock)
        # re-armed for every request of this connection (httptp.io.timers)
        if self._plain:
            self._idle_timer = Deadline(worker.config.in_idle_timeout, _Idle)
            # While the upstream answers, nothing reads this socket; libev then
            # drops its interest in the fd, and re-adding it for the next
            # request costs an epoll_ctl per request.  A watcher held over the
            # exchange keeps the interest (it stops itself if it fires).
            self._hold = get_hub().loop.io(self.sock.fileno(), 1)
        self._out_timer = self.proxy.exchange_timer()
        hold = self._hold
        head = None
        try:
            while True:
                head = None          # an error before the next head has no request line
                head = self._next_head()
                if head is None:
                    self.orderly = True
                    return
                q[b + S.IN_REQUEST_START] += 1
                keep_alive = head.keep_alive and not worker.draining
                if worker.get_only and head.method != b"GET":
                    raise MethodNotAllowed()
                if head.expect_continue and (head.content_length or head.chunked) and not self._events:
                    self._send(writer.CONTINUE_100)
                body = self._read_body(head)
                if hold is not None:
                    hold.start(hold.stop)
                data, keep_alive = self.proxy.forward(head, body, self.client_ip, keep_alive,
                                                      self._out_timer)
                if hold is not None:
                    hold.stop()
                if worker.draining:
                    keep_alive = False  # the response was built before the drain began
                    data = _force_close(data)
                self._send(data)
                self._first = False
                self.idle = True
                if not keep_alive:
                    self.orderly = True
                    return
        except ProxyError as err:
            self.orderly = self._answer_error(err, head)
        except _Idle:
            self.orderly = True
        except (_Closed, socket.timeout):
            pass
        finally:
            self._out_timer.close()
            if self._idle_timer is not None:
                self._idle_timer.close()
                hold.stop()
                hold.close()

    def _answer_error(self, err: ProxyError, head) -> bool:
        """Answer a request httptp refuses itself (4xx), then the connection
        closes.  ``head``: the request being served, if any; else the error
        may know the one it refuses (a 413 or 431 raised by the parser).
        False when the answer could not be written."""
        if head is None:
            head = err.request
        q, b = self._q, self._base
        q[b + S.IN_REQUEST_BAD_REQUEST] += 1
        worker = self.worker
        if worker.log_all_errors:
            worker.log(f"client {self.client_ip.decode() if self.client_ip else 'unix'}: "
                       f"{err.status} {err.detail or err.body}")
        data = writer.error_response(err, False)
        if worker.access_log is not None:
            worker.access_log.log(self.client_ip, head, err.status, len(err.payload), "", 0.0)
        try:
            self._send(data)
        except _Closed:
            return False
        return True


def _force_close(response: bytes) -> bytes:
    """Add ``Connection: close`` to an encoded response that lacks it (drain only)."""
    end = response.find(b"\r\n\r\n")
    head = response[:end]
    if b"\r\nConnection: close" in head:
        return response
    return head + b"\r\nConnection: close" + response[end:]
