"""A non-blocking socket driven by callbacks on gevent's loop (hot path).

Theory of operation
-------------------
This is asyncio's Transport/Protocol pair, built on the libev watchers gevent
already runs (``loop.io``), so that a request costs no greenlet switch: the
hub calls ``_on_read`` when the socket is readable, we ``recv`` once and hand
the bytes to the protocol (``data_received``), all inside the hub.  Nothing
here may block: the protocol's callbacks run in the hub too.

Writing: ``write`` tries the socket at once (nearly always the kernel takes
everything); what it does not take is queued and a write watcher sends it as
room appears.  When the queue passes ``HIGH_WATER`` the protocol's
``pause_writing`` is called, and ``resume_writing`` once it is back under
``LOW_WATER``: the protocol then stops and restarts reading its *source*
(asyncio's flow control, nginx's proxy_buffers), so memory per connection is
bounded however slow the reader is.

The protocol is any object with::

    data_received(data)     bytes arrived
    eof_received()          the peer closed its side (reading stops)
    connection_lost(text)   a read or write failed (the transport is closed)
    pause_writing()         our queue passed HIGH_WATER
    resume_writing()        it fell under LOW_WATER

``connection_lost`` is never called from inside ``write`` (it is deferred to
the next loop turn, as asyncio does), so a protocol may write freely.  It is
not called at all when the protocol closes the transport itself.

Counters: each transport counts its reads, writes, bytes and errors in this
worker's shared-memory block; ``Side`` names the fields (in or out).

TLS (https, teleports): ``TLSTransport`` runs an ``ssl.SSLObject`` over two
``MemoryBIO``s, as asyncio's sslproto does: the same watchers and the same
protocol interface, ciphertext on the socket, plaintext to the protocol.
"""

from __future__ import annotations

import errno
import socket as _socket
import ssl
import struct
import weakref
from collections import deque
from fcntl import ioctl
from termios import TIOCOUTQ

from gevent import get_hub

from httptp import stats as S

RECV_SIZE = 65536
HIGH_WATER = 256 * 1024      # queued bytes that pause the source
LOW_WATER = 64 * 1024        # ... and that resume it
CLOSE_TIMEOUT = 1.0          # seconds a peer that does not read can hold our last bytes


class Side:
    """Which counters a transport adds to (the in or the out side)."""

    __slots__ = ("read_calls", "bytes_read", "read_error", "write_calls", "bytes_written",
                 "write_error")

    def __init__(self, read_calls, bytes_read, read_error, write_calls, bytes_written,
                 write_error):
        self.read_calls, self.bytes_read, self.read_error = read_calls, bytes_read, read_error
        self.write_calls, self.bytes_written = write_calls, bytes_written
        self.write_error = write_error


IN = Side(S.IN_READ_CALLS, S.IN_BYTES_READ, S.IN_READ_ERROR, S.IN_WRITE_CALLS,
          S.IN_BYTES_WRITTEN, S.IN_WRITE_ERROR)
OUT = Side(S.OUT_READ_CALLS, S.OUT_BYTES_READ, S.OUT_READ_ERROR, S.OUT_WRITE_CALLS,
           S.OUT_BYTES_WRITTEN, S.OUT_WRITE_ERROR)


IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EAGAIN))   # connect: wait for writability


def connect(family: int, sockaddr):
    """A non-blocking stream socket connecting to ``sockaddr`` (TCP_NODELAY
    unless a unix socket) and what ``connect_ex`` said: 0 (connected), an
    errno in IN_PROGRESS (wait until it is writable, then read SO_ERROR), or a
    failure (``os.strerror``).  Raises OSError, the socket closed."""
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family != _socket.AF_UNIX:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        return sock, sock.connect_ex(sockaddr)
    except BaseException:
        sock.close()
        raise


def os_error_text(e: BaseException) -> str:
    """Short text for a socket error, for logs and 502 bodies."""
    if isinstance(e, (TimeoutError, _socket.timeout)):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return e.reason or e.strerror or str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e) or e.__class__.__name__


class Transport:
    """One non-blocking stream socket on the hub's loop (see the module doc)."""

    __slots__ = ("sock", "protocol", "loop", "_q", "_b", "_side", "_rw", "_ww", "_queue",
                 "_queued", "_reading", "write_paused", "_closing", "closed", "_eof_after",
                 "_close_timer", "write_timeout", "_stall", "__weakref__")

    def __init__(self, sock, protocol, q, base: int, side: Side):
        sock.setblocking(False)
        self.sock = sock
        self.protocol = protocol
        self.loop = loop = get_hub().loop
        self._q, self._b, self._side = q, base, side
        fd = sock.fileno()
        self._rw = loop.io(fd, 1)
        self._ww = loop.io(fd, 2)
        self._queue = deque()
        self._queued = 0
        self._reading = False
        self.write_paused = False          # pause_writing was called on the protocol
        self._closing = False         # close() once the queue is sent
        self.closed = False
        self._eof_after = False       # shutdown(SHUT_WR) once the queue is sent
        self._close_timer = None
        # a peer that takes none of what is queued for this long is cut
        # (nginx's send_timeout); None: only close() bounds it
        self.write_timeout = None
        self._stall = None

    # -- reading ---------------------------------------------------------------

    def start(self) -> None:
        """Start reading (``data_received`` from the next loop turn on)."""
        if not self.closed and not self._reading:
            self._reading = True
            self._rw.start(self._on_read)

    resume_reading = start

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._rw.stop()

    @property
    def reading(self) -> bool:
        return self._reading

    def _on_read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._q[self._b + self._side.read_error] += 1
            self._lost(e)
            return
        q, b = self._q, self._b
        q[b + self._side.read_calls] += 1
        if data:
            q[b + self._side.bytes_read] += len(data)
            self.protocol.data_received(data)
        else:
            self.pause_reading()
            self.protocol.eof_received()

    # -- writing ---------------------------------------------------------------

    def write(self, data) -> None:
        """Send ``data`` (bytes-like), now if the socket takes it, else queued."""
        if self.closed or self._closing or not data:
            return
        if self._queue:
            self._enqueue(data)
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._write_failed(e)
            return
        q, b = self._q, self._b
        q[b + self._side.write_calls] += 1
        q[b + self._side.bytes_written] += n
        if n < len(data):
            self._enqueue(memoryview(data)[n:])
            self._ww.start(self._on_write)
            if self.write_timeout is not None:
                self._arm_stall()

    def _arm_stall(self) -> None:
        stall = self._stall
        if stall is None:
            stall = self._stall = self.loop.timer(self.write_timeout, self.write_timeout)
        stall.again(self._stalled)

    def _stalled(self) -> None:
        """Nothing of the queue went out for write_timeout seconds."""
        self._stall.stop()
        self._q[self._b + self._side.write_error] += 1
        self._lost(TimeoutError("write timed out"))

    def _enqueue(self, data) -> None:
        self._queue.append(data)
        self._queued += len(data)
        if not self.write_paused and self._queued > HIGH_WATER:
            self.write_paused = True
            self.protocol.pause_writing()

    def _on_write(self) -> None:
        queue = self._queue
        q, b, side = self._q, self._b, self._side
        while queue:
            data = queue[0]
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._write_failed(e)
                return
            q[b + side.write_calls] += 1
            q[b + side.bytes_written] += n
            self._queued -= n
            if n < len(data):
                queue[0] = memoryview(data)[n:]
                break
            queue.popleft()
        if self._stall is not None:
            if queue:
                self._stall.again(self._stalled)     # progress: the full period again
            else:
                self._stall.stop()
        if not queue:
            self._ww.stop()
            if self._closing:
                self._close_now()
                return
            if self._eof_after:
                self._shutdown_write()
        if self.write_paused and self._queued <= LOW_WATER:
            self.write_paused = False
            self.protocol.resume_writing()

    @property
    def write_buffer_size(self) -> int:
        return self._queued

    def unsent(self) -> int:
        """What the peer has not taken yet: our queue and the kernel's send
        queue (SIOCOUTQ), to tell a slow peer from a stuck one (a syscall:
        not for every write)."""
        n = self._queued
        if self.sock is not None and not self.closed:
            try:
                n += struct.unpack("i", ioctl(self.sock.fileno(), TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return n


    half_close = True            # write_eof keeps the other way open

    def detach(self):
        """Stop watching the socket and hand it over (not closed)."""
        self.closed = True
        self._reading = False
        for w in (self._rw, self._ww):
            w.stop()
            w.close()
        sock, self.sock = self.sock, None
        return sock

    def write_eof(self) -> None:
        """Half-close: shutdown(SHUT_WR) once everything queued is sent."""
        if self.closed:
            return
        if self._queue:
            self._eof_after = True
        else:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._eof_after = False
        try:
            self.sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    def _write_failed(self, e: OSError) -> None:
        self._q[self._b + self._side.write_error] += 1
        self._lost(e, defer=True)

    # -- closing ---------------------------------------------------------------


    def close(self) -> None:
        """Close once what is queued is sent (at most CLOSE_TIMEOUT later)."""
        if self.closed or self._closing:
            return
        self.pause_reading()
        if not self._queue:
            self._close_now()
            return
        self._closing = True
        if self._stall is None:       # else the write timeout bounds the flush
            self._close_timer = timer = self.loop.timer(CLOSE_TIMEOUT)
            timer.start(self.abort)

    def abort(self) -> None:
        """Close now, dropping anything queued."""
        if not self.closed:
            self._close_now()

    def _close_now(self) -> None:
        self.closed = True
        self._reading = False
        self._rw.stop()
        self._rw.close()
        self._ww.stop()
        self._ww.close()
        if self._close_timer is not None:
            self._close_timer.stop()
            self._close_timer.close()
            self._close_timer = None
        if self._stall is not None:
            self._stall.stop()
            self._stall.close()
            self._stall = None
        self._queue.clear()
        self._queued = 0
        try:
            self.sock.close()
        except OSError:
            pass

    def _lost(self, e: BaseException, defer: bool = False) -> None:
        if self.closed:
            return
        self._close_now()
        text = os_error_text(e)
        if defer:
            self.loop.run_callback(self.protocol.connection_lost, text)
        else:
            self.protocol.connection_lost(text)


def tls_info(transport) -> tuple[str, str] | None:
    """(TLS version, SNI name or "") of a server-side TLSTransport, else None
    (the access log; the name is what ``httptp.tls``'s SNI callback saw)."""
    tls = getattr(transport, "ssl", None)
    if tls is None:
        return None
    return tls.version() or "", getattr(tls, "sni_name", None) or ""


class TLSTransport(Transport):
    """A Transport whose bytes go through ``ssl.SSLObject`` and two MemoryBIOs.

    ``handshake_done(error_or_None)`` is called on the protocol once the
    handshake ends; only then does ``data_received`` start.  Writes before it
    are queued.  ``close()`` sends our close_notify first (sockio.close_tls's
    rule: an orderly end gets one, an error path does not).

    ``sniff(data)`` (server side): called once with the first bytes, peeked
    (still in the kernel); it returns True to go on with the handshake, or
    False when it took the connection over (plain HTTP on an https port, an
    ACME TLS-ALPN validation).  ``greenlet_handshake``: run the handshake's
    steps in a greenlet, for SNI callbacks that may wait (autocert)."""

    __slots__ = ("ssl", "_in", "_out", "_shaking", "_pending", "_notify", "_sniff",
                 "_in_greenlet", "_hs_running", "_eof")

    half_close = False           # TLS has no half-close: close_notify ends both ways

    def __init__(self, sock, protocol, q, base: int, side: Side, context: ssl.SSLContext,
                 server_side: bool, server_hostname: str | None = None, sniff=None,
                 greenlet_handshake: bool = False):
        super().__init__(sock, protocol, q, base, side)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        # A gevent.ssl.SSLContext (httptp.tls.cooperative) wraps its SNI
        # callback to pass ``conn._sslsock()``, which only its sockets have:
        # give our SSLObject one (a weakref: no cycle) so such a context works
        # here too instead of failing every handshake that sends SNI.
        self.ssl._sslsock = weakref.ref(self.ssl)
        self._shaking = True
        self._pending = []         # plaintext written during the handshake
        self._notify = True        # send close_notify on close()
        self._sniff = sniff
        self._in_greenlet = greenlet_handshake
        self._hs_running = False
        self._eof = False

    @property
    def shaking(self) -> bool:
        return self._shaking and not self.closed

    def start(self) -> None:
        first = not self._reading and self._shaking
        super().start()
        if first and not self.ssl.server_side:
            self._process()        # the client speaks first

    resume_reading = start

    def _on_read(self) -> None:
        sock = self.sock
        try:
            if self._sniff is not None:
                data = sock.recv(4096, _socket.MSG_PEEK)
                if data:
                    sniff, self._sniff = self._sniff, None
                    if not sniff(data):
                        return
                    data = sock.recv(RECV_SIZE)
            else:
                data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._q[self._b + self._side.read_error] += 1
            self._notify = False
            self._lost(e)
            return
        q, b = self._q, self._b
        q[b + self._side.read_calls] += 1
        if not data:
            self.pause_reading()
            if self._shaking:
                self._notify = False
                if self._sniff is not None:           # connected and left: not an error
                    self._close_now()
                    self.protocol.connection_lost("closed before the TLS handshake")
                    return
                self._close_now()
                self.protocol.handshake_done(
                    ConnectionResetError("connection closed during the TLS handshake"))
                return
            self._in.write_eof()
            self._process()
            return
        q[b + self._side.bytes_read] += len(data)
        self._in.write(data)
        self._process()

    def _process(self) -> None:
        if self._shaking:
            if self._in_greenlet:
                if not self._hs_running:
                    self._hs_running = True
                    import gevent
                    gevent.spawn(self._greenlet_handshake)
                return
            if not self._handshake():
                return
        sslobj = self.ssl
        chunks = []
        eof = False
        try:
            while True:
                chunk = sslobj.read(RECV_SIZE)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            eof = True
        except ssl.SSLWantWriteError:   # renegotiation is off: not expected
            pass
        except (ssl.SSLError, ValueError) as e:
            self._notify = False
            self._flush_out()
            self._lost(e)
            return
        self._flush_out()
        for chunk in chunks:
            if self.closed:
                return
            self.protocol.data_received(chunk)
        if eof and not self._eof and not self.closed:
            self._eof = True
            self.pause_reading()
            self.protocol.eof_received()

    def _greenlet_handshake(self) -> None:
        try:
            while not self.closed:
                if not self._handshake():
                    if self._in.pending and self._shaking and not self.closed:
                        continue            # more came while we waited
                    return
                break
        finally:
            self._hs_running = False
        if not self.closed:
            self._process()

    def _handshake(self) -> bool:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_out()
            return False
        except (ssl.SSLError, ValueError, OSError) as e:
            self._flush_out()        # our alert, if any
            self._notify = False
            if not self.closed:
                self._closing = False
                self._close_soon()
                self.protocol.handshake_done(e)
            return False
        self._shaking = False
        self._flush_out()
        pending, self._pending = self._pending, []
        self.protocol.handshake_done(None)
        for data in pending:
            self.write(data)
        return True

    def _close_soon(self) -> None:
        """Close once our alert is sent (bounded), without close_notify."""
        self.pause_reading()
        if not self._queue:
            self._close_now()
            return
        self._closing = True
        self._close_timer = timer = self.loop.timer(CLOSE_TIMEOUT)
        timer.start(self.abort)

    def _flush_out(self) -> None:
        out = self._out.read()
        if out:
            Transport.write(self, out)

    def write(self, data) -> None:
        if self.closed or self._closing or not data:
            return
        if self._shaking:
            self._pending.append(bytes(data))
            return
        try:
            self.ssl.write(data)
        except (ssl.SSLError, ValueError) as e:
            self._notify = False
            self._write_failed(OSError(0, os_error_text(e)))
            return
        self._flush_out()

    def write_eof(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed or self._closing:
            return
        if self._notify and not self._shaking:
            try:
                self.ssl.unwrap()
            except (ssl.SSLError, ValueError, OSError):
                pass
            self._flush_out()
        super().close()

    def abort(self) -> None:
        self._notify = False
        super().abort()

    def _write_failed(self, e: OSError) -> None:
        self._notify = False
        super()._write_failed(e)
