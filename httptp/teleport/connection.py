"""One teleport connection as bytes in, bytes out, in the style of h11's ``Connection``.

Theory of operation
-------------------
A `ClientConnection` or `ServerConnection` holds everything one side of one
teleport connection knows, and nothing about sockets, clocks or greenlets:

* the 15-byte handshake (``handshake`` gives ours, ``receive_handshake``
  reads the peer's and picks the decompressor; PROTOCOL.md §1.2);
* one compression stream per direction (``codecs``, §1.3);
* the frame reader with its limits (``framing.FrameReader``, §1.4);
* on the client: request-id allocation with wrap-around and the pending map
  (id -> method, because an answer to HEAD has no body whatever its
  Content-Length says); on the server: which ids in flight are HEADs, so
  their answers go out without a body (§1.9).

The driver owns the IO and the timing.  Sending is two steps so that batching
(-outDelay/-inDelay, §1.6) stays the driver's choice::

    req_id, frame = conn.send_request(b"GET", b"/", [(b"Host", b"a")], b"")
    conn.write(frame)            # into the current batch, uncompressed
    sock.sendall(conn.flush())   # the batch, compressed, ending in a flush

The driver may hold a frame between the two steps and drop it (a request
whose deadline passed while queued is never sent; then ``forget(req_id,
sent=False)``).  Receiving is ``receive_data(data) -> [(id, head, body)]``,
or, for a driver that yields to other work between decompressed slices (a
peer's compression bomb must not hold the loop), ``feed(data)`` then
``next_frames()`` until it returns None: each call decompresses one slice
(``codecs.MAX_SLICE`` at most) and returns the frames it completed.

End of stream is not an event here: the driver sees EOF and fails whatever
is pending; a partial frame in the reader is simply dropped with the
connection.

Errors: every `TeleportError` (a bad handshake, a corrupt stream, a frame
that does not parse or is over a limit, a request-id overflow) is sticky.
The connection remembers it and every later call to ``receive_handshake``,
``feed``, ``next_frames``, ``receive_data``, ``send_request``, ``write`` and
``flush`` raises it again; ``forget`` and ``send_response`` never do (they
are clean-up and answer paths).  A ValueError from encoding (a GET with a
body, no Host, a body on a 204) is the caller's mistake and changes nothing.
"""

from __future__ import annotations

from httptp.teleport import TeleportError, handshake
from httptp.teleport.autolevel import AutoLevel
from httptp.teleport.codecs import AUTO, check_level, codec, compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request, encode_response
from httptp.teleport.handshake import Compress

MAX_ID = 0xFFFFFFFF


class RequestIdOverflow(TeleportError):
    """The request ids wrapped onto one still pending and the connection was
    told not to skip it (``skip_pending_ids=False``, the Go original's rule)."""


class _Connection:
    """What both sides share: handshake, the two codec streams, the batch, the
    frame reader and the sticky error."""

    __slots__ = ("compress", "peer_compress", "error", "plain_sent", "plain_received",
                 "level", "auto", "_clock", "_cpu", "_spent",
                 "_comp", "_decomp", "_reader", "_batch", "_buffered")

    def __init__(self, kind: str, compress: int | None, max_header_size: int,
                 max_body_size: int | None, is_head=None, level=None, clock=None, cpu=None,
                 spent=None):
        #: the codec we write with (None until the handshake: a server in auto)
        self.compress: Compress | None = None if compress is None else Compress(compress)
        #: the codec the peer writes with (None until ``receive_handshake``)
        self.peer_compress: Compress | None = None
        #: the sticky error, once there is one
        self.error: TeleportError | None = None
        self.plain_sent = 0             # frame bytes flushed so far (before compression)
        self.plain_received = 0         # decompressed bytes read so far
        #: our compression level: None (the codec's default), an int, or "auto"
        self.level = level
        #: the AutoLevel that moves it (level "auto", once the codec is known)
        self.auto: AutoLevel | None = None
        self._clock, self._cpu, self._spent = clock, cpu, spent
        if level is not None:
            if compress is not None:
                check_level(compress, level)
            elif level != AUTO:
                raise ValueError("a numeric compression level needs a fixed codec "
                                 "(not compress='auto')")
            if level == AUTO and (clock is None or cpu is None):
                raise ValueError("level 'auto' needs a clock and a CPU meter")
        self._comp = None               # made by the first flush (a zlib one is ~256 KiB)
        self._decomp = None
        self._reader = FrameReader(kind, max_header_size, is_head, max_body_size)
        self._batch: list[bytes] = []
        self._buffered = 0

    def _check(self) -> None:
        if self.error is not None:
            raise self.error.with_traceback(None)

    # -- handshake -------------------------------------------------------------
    def handshake(self, tls: bool = False) -> bytes:
        """Our 15-byte header, announcing our codec and the TLS flag ``tls``."""
        if self.compress is None:
            raise RuntimeError("compress='auto': our codec is the peer's, "
                               "call receive_handshake first")
        return handshake.encode(self.compress, tls)

    def receive_handshake(self, data: bytes) -> tuple[Compress, bool]:
        """Read the peer's 15-byte header: return ``(its codec, its TLS
        flag)`` and get ready to decompress its stream.  Raises
        HandshakeError (sticky)."""
        self._check()
        try:
            theirs, tls = handshake.decode(data)
        except TeleportError as e:
            self.error = e
            raise
        self.peer_compress = theirs
        self._decomp = decompressor(theirs)
        if self.compress is None:           # auto: answer in the peer's codec
            self.compress = theirs
        return theirs, tls

    # -- sending ---------------------------------------------------------------
    def write(self, frame: bytes) -> int:
        """Add one frame (from ``send_request``/``send_response``) to the
        current batch; return the frame bytes now waiting for ``flush``."""
        if self.error is not None:
            self._check()
        self._batch.append(frame)
        self._buffered += len(frame)
        return self._buffered

    @property
    def compress_level(self) -> int | None:
        """The level our stream compresses at now (None: a codec without
        levels, or nothing sent yet with the codec unknown)."""
        comp = self._comp
        if comp is not None:
            return comp.level
        if self.compress is None:
            return None
        entry = codec(self.compress)
        if entry.levels is None:
            return None
        return self.level if isinstance(self.level, int) else entry.default_level

    def _new_compressor(self):
        entry = codec(self.compress)
        if self.level != AUTO:
            return compressor(self.compress, self.level)
        if entry.auto_levels is None:       # brotli: fixed per link; none, snappy: no levels
            return compressor(self.compress)
        low, high = entry.auto_levels
        self.auto = AutoLevel(low, high, entry.default_level, clock=self._clock, cpu=self._cpu,
                              spent=self._spent)
        return compressor(self.compress, self.auto.level, history=True)

    @property
    def buffered(self) -> int:
        """Frame bytes written since the last ``flush``."""
        return self._buffered

    def flush(self, behind: bool = False) -> bytes:
        """End the batch: return its bytes compressed, ending in the codec's
        flush, so the peer can decode every frame written so far.  ``b""``
        when nothing was written.  ``behind``: the driver's socket still
        holds bytes of earlier batches (level ``auto`` goes down when that
        lasts); a level change happens here, after the flush."""
        self._check()
        batch = self._batch
        if not batch:
            return b""
        comp = self._comp
        if comp is None:
            if self.compress is None:
                raise RuntimeError("compress='auto': call receive_handshake first")
            comp = self._comp = self._new_compressor()
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        self._batch = []
        self.plain_sent += self._buffered
        self._buffered = 0
        try:
            auto = self.auto
            if auto is None:
                return comp.compress(data) + comp.flush()
            t0 = self._clock()
            out = comp.compress(data) + comp.flush()
            level = auto.batch(self._clock() - t0, behind)
            return out + comp.set_level(level) if level != comp.level else out
        except TeleportError as e:
            self.error = e
            raise

    # -- receiving -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Add bytes of the peer's compressed stream (after its handshake);
        then call ``next_frames`` until it returns None."""
        self._check()
        decomp = self._decomp
        if decomp is None:
            raise RuntimeError("receive_handshake first")
        try:
            decomp.feed(data)
        except TeleportError as e:
            self.error = e
            raise

    def next_frames(self) -> list | None:
        """Decompress the next slice of what was fed and return the frames it
        completed (maybe ``[]``), or None when everything fed is consumed.
        Each frame is ``(req_id, head, body)``; see the subclasses for which
        frames come out.  Raises CodecError, FramingError or FrameTooLarge
        (sticky)."""
        if self.error is not None:
            self._check()
        decomp = self._decomp
        if decomp is None:
            return None
        try:
            plain = decomp.read()
            if not plain:
                return None
            self.plain_received += len(plain)
            return self._frames(self._reader.feed(plain))
        except TeleportError as e:
            self.error = e
            raise

    def receive_data(self, data: bytes) -> list:
        """``feed(data)``, then every frame it completes, in order."""
        self.feed(data)
        out: list = []
        while (frames := self.next_frames()) is not None:
            out += frames
        return out

    def _frames(self, frames: list) -> list:
        return frames


STICKY_FOR = 1.0        # after a failed dial or handshake, fail fast this long


class FailFast:
    """Whether a client refuses requests at once, and why: once it is
    closed, and for ``STICKY_FOR`` seconds after its dial or handshake
    failed (``failed``), so that a dead peer is not dialled again for each
    request.  What the gevent and asyncio drivers keep across their links;
    ``clock()`` gives monotonic seconds (as everywhere here, nothing reads a
    clock of its own)."""

    __slots__ = ("name", "closed", "_text", "_until", "_clock")

    def __init__(self, name: str, clock):
        self.name = name
        self.closed = False
        self._text: str | None = None
        self._until = 0.0
        self._clock = clock

    def failed(self, text: str) -> None:
        """The dial or handshake failed with ``text``."""
        self._text = f"teleport connection to {self.name} failed: {text}"
        self._until = self._clock() + STICKY_FOR

    @property
    def last(self) -> str | None:
        """The text of the failure being remembered, if any."""
        return self._text

    def refusal(self) -> str | None:
        """Why a request must fail now, or None when it may go."""
        if self.closed:
            return f"teleport client for {self.name} is closed"
        text = self._text
        if text is not None:
            if self._clock() < self._until:
                return text
            self._text = None
        return None


class ClientConnection(_Connection):
    """The client side: sends requests, receives their responses.

    ``compress``: the codec of our requests; ``level`` its level (None:
    the codec's default; ``"auto"`` with ``clock`` and ``cpu``, and
    ``spent`` shared by the process's connections, see ``autolevel``;
    ValueError for one the codec does not take).
    ``max_header_size`` and
    ``max_body_size`` bound one response (over them: FrameTooLarge, whose
    ``req_id`` says whose answer it was).  Ids go 1, 2, 3, … and wrap from
    0xFFFFFFFF to 1, never 0 (id 0 asks the server for no answer, §1.5),
    starting at ``first_id``.  An id still pending is never given out again:
    it is skipped, or with ``skip_pending_ids=False`` (the Go original's
    rule) ``send_request`` raises RequestIdOverflow and the connection is
    done.

    ``receive_data``/``next_frames`` return the responses to pending
    requests only: the answer to a forgotten request (one that timed out) is
    read completely and thrown away.
    """

    __slots__ = ("pending", "next_id", "skip_pending_ids", "_late_heads")

    def __init__(self, compress: int = Compress.FLATE, *, max_header_size: int = 4096,
                 max_body_size: int | None = None, first_id: int = 1,
                 skip_pending_ids: bool = True, level=None, clock=None, cpu=None,
                 spent=None):
        if not 1 <= first_id <= MAX_ID:
            raise ValueError(f"first_id must be in 1..{MAX_ID}")
        #: id -> method of every request sent or about to be, not answered yet
        self.pending: dict[int, bytes] = {}
        #: the id the next request gets (if it is not pending)
        self.next_id = first_id
        self.skip_pending_ids = skip_pending_ids
        # HEAD ids forgotten after they were sent: their answer may still
        # come, and must still be read without a body
        self._late_heads: set[int] = set()
        super().__init__("response", compress, max_header_size, max_body_size, self._is_head,
                         level, clock, cpu, spent)

    def send_request(self, method: bytes, target: bytes, headers: list | bytes,
                     body: bytes = b"") -> tuple[int, bytes]:
        """Give a request an id and return ``(id, frame)``; the request is
        pending from now on.  ``headers`` as ``framing.encode_request`` wants
        them (no hop-by-hop or framing headers; a Host).  Raises ValueError
        for a request the protocol cannot carry (nothing changes then) and
        RequestIdOverflow (sticky) as the class docstring says."""
        if self.error is not None:
            self._check()
        pending = self.pending
        req_id = self.next_id
        if req_id in pending:
            req_id = self._free_id(req_id)
        frame = encode_request(req_id, method, target, headers, body)
        pending[req_id] = method
        if self._late_heads:
            self._late_heads.discard(req_id)
        self.next_id = req_id + 1 if req_id < MAX_ID else 1
        return req_id, frame

    def _free_id(self, req_id: int) -> int:
        pending = self.pending
        if not self.skip_pending_ids or len(pending) >= MAX_ID:
            self.error = RequestIdOverflow("request ID overflow")
            raise self.error
        while req_id in pending:
            req_id = req_id + 1 if req_id < MAX_ID else 1
        return req_id

    def forget(self, req_id: int, *, sent: bool = True) -> None:
        """Stop waiting for ``req_id`` (it timed out, or its caller gave up).
        ``sent``: its frame may have reached the peer, so an answer may still
        come; it is then read and thrown away (for a HEAD, without a body).
        Pass ``sent=False`` for a frame that was never written."""
        method = self.pending.pop(req_id, None)
        if method == b"HEAD" and sent:
            self._late_heads.add(req_id)

    def _is_head(self, req_id: int) -> bool:
        method = self.pending.get(req_id)
        if method is not None:
            return method == b"HEAD"
        return req_id in self._late_heads

    def _frames(self, frames: list) -> list:
        pending = self.pending
        out = frames
        for i, frame in enumerate(frames):
            req_id = frame[0]
            if pending.pop(req_id, None) is None:
                self._late_heads.discard(req_id)
                if out is frames:
                    out = frames[:i]
            elif out is not frames:
                out.append(frame)
        return out


class ServerConnection(_Connection):
    """The server side: receives requests, sends their responses.

    ``compress``: the codec of our responses, or None to answer in the
    client's codec (``-inCompress=auto``; known after ``receive_handshake``).
    ``level``, ``clock``, ``cpu``: as for `ClientConnection` (with codec
    None, only None or ``"auto"``).
    ``max_header_size``, ``max_body_size``: bound one request; a request
    whose Content-Length is over ``max_body_size`` comes out with body None
    (answer it 413: its body is skipped as it arrives), anything else over a
    limit raises FrameTooLarge (sticky).

    ``receive_data``/``next_frames`` return every request, id 0 included
    (fire-and-forget: run it, answer nothing).  ``send_response`` knows
    which ids are HEADs still unanswered, so a HEAD answer never carries a
    body, nor does a 1xx, 204 or 304.
    """

    __slots__ = ("_heads",)

    def __init__(self, compress: int | None = Compress.FLATE, *, max_header_size: int = 4096,
                 max_body_size: int | None = None, level=None, clock=None, cpu=None,
                 spent=None):
        # ids of HEAD requests not answered yet -> how many (a client may
        # reuse an id in flight; ours never does)
        self._heads: dict[int, int] = {}
        super().__init__("request", compress, max_header_size, max_body_size, None,
                         level, clock, cpu, spent)

    def _frames(self, frames: list) -> list:
        heads = self._heads
        for req_id, head, _ in frames:
            if req_id and head.method == b"HEAD":
                heads[req_id] = heads.get(req_id, 0) + 1
        return frames

    def send_response(self, req_id: int, status: int, reason: bytes, headers: list | bytes,
                      body: bytes = b"") -> bytes:
        """The frame answering ``req_id`` (``b""`` for id 0: no answer is
        sent); pass it to ``write``.  ``headers`` as
        ``framing.encode_response`` wants them (no hop-by-hop headers, no
        Content-Length: it is computed).  The body is dropped for a HEAD and
        for 1xx/204/304.  An empty ``reason`` is the status's standard one.
        Raises ValueError for a status outside 100..999 (nothing changes
        then: the driver can still answer 500)."""
        if not req_id:
            return b""
        if not 100 <= status <= 999:
            raise ValueError(f"status {status} is not three digits")
        heads = self._heads
        is_head = req_id in heads if heads else False
        if is_head or status < 200 or status == 204 or status == 304:
            body = b""
        frame = encode_response(req_id, status, reason, headers, body)
        if is_head:
            n = heads[req_id]
            if n == 1:
                del heads[req_id]
            else:
                heads[req_id] = n - 1
        return frame
