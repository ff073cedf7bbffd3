"""The IO pieces the teleport client and server drivers share.

* `Closed` and `TimedOut`: how the drivers' socket loops say "the peer
  closed" and "a write or the handshake took too long"; `error_text` turns
  those and OSErrors into the short text that goes into logs and errors.
* `read_exactly`: the handshake's fixed-size reads.
* `BatchWriter`: the writer loop of PROTOCOL.md §1.6 (-outDelay/-inDelay)
  around a sans-IO ``httptp.teleport.connection`` connection, which turns
  the frames of one batch into compressed bytes.
* `counters`: the worker's shared-memory counters, or a scratch array.
"""

from __future__ import annotations

import socket as _stdsocket
import time
from collections import deque

import gevent.event

from httptp import stats as S
from httptp.io.sockio import send_all
from httptp.io.timers import Deadline
from httptp.teleport.autolevel import Spent

BATCH_BYTES = 65536         # Go's WriteBufferSize: this much unflushed input forces a flush
RECV_SIZE = 65536
# Decompressed slices handled before a reader lets other greenlets run
# (16 x 256 KiB: a few ms of work at most).
YIELD_SLICES = 16


class TimedOut(Exception):
    """A write or the handshake did not finish in time."""


class Closed(Exception):
    """The peer closed the connection."""


def error_text(e: BaseException) -> str:
    """A short text for a connection's end: ``timed out``, the OSError's
    strerror, or the exception's own message."""
    if isinstance(e, (_stdsocket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, TimedOut):
        return str(e) or "timed out"
    if isinstance(e, OSError):
        return e.strerror or str(e) or e.__class__.__name__
    return str(e) or e.__class__.__name__


def read_exactly(sock, n: int) -> bytes:
    """Exactly ``n`` bytes (never more: what follows belongs to the codec or
    to TLS).  Raises Closed on EOF."""
    parts = []
    while n:
        data = sock.recv(n)
        if not data:
            raise Closed("connection closed during the handshake")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


class NullStats:
    """Stand-in counters when no shared-memory block is given: ``q[base + F] += n``
    works and goes nowhere useful."""

    def __init__(self):
        self.q = [0] * S.BLOCK_HEADER_WORDS

    def block_base(self, block) -> int:
        return 0


#: seconds spent compressing by every teleport connection of this process at
#: level auto (httptp.teleport.autolevel: the compressors' share of the worker)
COMPRESS_SPENT = Spent()


def counters(stats, block):
    """``(q, base)`` for this worker's block, or a private scratch array."""
    if stats is None:
        return NullStats().q, 0
    return stats.q, stats.block_base(block or 0)


class BatchWriter:
    """The writer loop of PROTOCOL.md §1.6, shared by client and server.

    Items are taken from ``queue`` and turned into frame bytes by ``frame``
    (``None`` skips the item); each frame goes into the connection's batch
    (``conn.write``).  A flush (``conn.flush()``: the batch compressed, then
    one ``send`` of it) is taken

    * at once when the queue is empty and ``delay`` is 0;
    * otherwise when the queue is empty and ``delay`` has passed since the first
      unflushed frame (arming happens once per batch: later frames never push
      the flush back), or at the next item boundary after that moment;
    * whenever ``BATCH_BYTES`` of frame input are unflushed (Go's full buffer).

    While a batch waits for its delay, ``put`` only queues: the writer is not
    woken per item (a switch and a timed wait per request) but once, by the
    timer, and then frames the whole backlog into that batch; ``put`` wakes it
    early only when the backlog would fill ``BATCH_BYTES`` (``size`` tells an
    item's frame bytes) or on ``stop``.

    ``run`` returns when ``stop`` was called and everything queued is flushed;
    it raises on a write error or a write timeout (TimedOut), and with the
    connection's sticky error if its other direction failed (the owner closes
    the link).  In a cooperative hub the queue only grows while this greenlet
    yields, i.e. during a write or the wait, so a drained queue really is empty.
    """

    __slots__ = ("sock", "conn", "delay", "write_timeout", "queue", "wake", "q", "base",
                 "in_calls", "stopping", "_fields", "_timer", "_room")

    def __init__(self, sock, conn, *, delay: float, write_timeout: float, q, base: int,
                 in_calls: bool):
        self.sock = sock
        self.conn = conn                   # a teleport.connection Client/ServerConnection
        self.delay = delay
        self.write_timeout = write_timeout
        self.queue: deque = deque()
        self.wake = gevent.event.Event()
        self.q, self.base = q, base
        self.in_calls = in_calls           # counters: IN_* (server) or OUT_* (client)
        self.stopping = False
        self._fields = ((S.IN_WRITE_ERROR, S.IN_WRITE_CALLS, S.IN_BYTES_WRITTEN) if in_calls else
                        (S.OUT_WRITE_ERROR, S.OUT_WRITE_CALLS, S.OUT_BYTES_WRITTEN))
        self._timer: Deadline | None = None     # write_timeout, armed around each write
        self._room: int | None = None   # sleeping on the delay: frame bytes before a full batch

    def put(self, item) -> None:
        self.queue.append(item)
        room = self._room
        if room is not None:
            room = self._room = room - self.size(item)
            if room > 0:
                return                  # the delay timer takes it with its batch
        self.wake.set()

    def stop(self) -> None:
        """Flush what is queued, then let ``run`` return."""
        self.stopping = True
        self.wake.set()

    # hooks ------------------------------------------------------------------
    def frame(self, item):
        return item

    def size(self, item) -> int:
        """The frame bytes ``item`` will add (for the full-batch rule)."""
        return len(item)

    def flushing(self) -> None:
        """Called just before a batch goes to the socket."""

    # the loop ---------------------------------------------------------------
    def run(self) -> None:
        # One timer for the life of the loop, re-armed (full period) per write:
        # a gevent.Timeout per flush costs an allocation and ~2 us.
        self._timer = Deadline(self.write_timeout, TimedOut("write timed out"))
        try:
            self._run()
        finally:
            self._timer.close()

    def _run(self) -> None:
        queue, wake = self.queue, self.wake
        write = self.conn.write
        frame = self.frame
        delay = self.delay
        unflushed = 0          # frame bytes in the connection's batch
        flush_at = 0.0
        backlog = 0            # items queued while the batch slept: they belong to it
        while True:
            while queue:
                data = frame(queue.popleft())
                if backlog:
                    backlog -= 1
                if data is None:
                    continue
                if not unflushed:
                    flush_at = time.monotonic() + delay if delay > 0 else 0.0
                unflushed = write(data)
                if unflushed >= BATCH_BYTES or (
                        not backlog and flush_at and time.monotonic() >= flush_at):
                    self._flush()
                    unflushed = 0
            if unflushed:
                if delay <= 0:
                    self._flush()
                    unflushed = 0
                    continue
                left = flush_at - time.monotonic()
                if left <= 0 or self.stopping:
                    self._flush()
                    unflushed = 0
                    continue
                self._room = BATCH_BYTES - unflushed
                wake.clear()
                wake.wait(left)
                self._room = None
                backlog = len(queue)
                continue
            if self.stopping:
                return
            wake.clear()
            wake.wait()

    def _flush(self) -> None:
        """End a batch: compress it and send it."""
        conn = self.conn
        plain = conn.buffered
        data = conn.flush()
        self.flushing()
        if not data:
            return
        q, b = self.q, self.base
        size = len(data)
        q[b + S.TELEPORT_SENT_PLAIN] += plain
        q[b + S.TELEPORT_SENT_COMPRESSED] += size
        f_err, f_calls, f_bytes = self._fields
        timer = self._timer
        timer.arm()
        try:
            send_all(self.sock, data)
        except (OSError, TimedOut):
            q[b + f_err] += 1
            raise
        finally:
            timer.disarm()
        q[b + f_calls] += 1
        q[b + f_bytes] += size
