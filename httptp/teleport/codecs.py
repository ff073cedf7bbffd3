"""Compression streams: one continuous stream per direction per connection.

Theory of operation
-------------------
A `Compressor` lives as long as its connection: ``compress(data)`` may buffer
and return ``b""``; ``flush()`` ends a batch, after which everything given so
far is decodable by the peer (PROTOCOL.md §1.3, §1.6).  A `Decompressor` takes
the peer's stream in arbitrary pieces (``feed``) and hands the plain bytes out
in slices of at most about ``MAX_SLICE`` (``read``, until it returns ``b""``);
corrupt input raises `CodecError` and the connection is dropped.  Compression
boundaries are unrelated to frame boundaries.

Bounded output
--------------
A peer controls the ratio: 64 KiB of flate expand to 64 MiB, of zstd or
brotli to gigabytes.  So no call ever turns one wire read into more than one
slice: the caller checks its limits on each slice before it asks for the next
(and may yield to other work between slices), and a decompressor holds at most
one read of input plus its codec's window.  How each codec is sliced:

- flate: zlib's ``max_length``; the rest waits in ``unconsumed_tail``.
- zstd: python-zstandard has no output bound, but the format does: a block
  decodes to at most 128 KiB, and its 3-byte header tells its type and size.
  We walk the frame and block headers and hand zstd whole blocks, no more
  than fill a slice (RLE and raw blocks by their exact size, compressed ones
  at 128 KiB).  The window is capped at ``ZSTD_MAX_WINDOW`` (a frame that
  asks for more is refused: it would make us allocate it).
- brotli: ``process(..., output_buffer_limit=...)``, then ``process(b"")``
  until it gives nothing more (brotli 1.2 keeps undelivered output).
- snappy: whole chunks (64 KiB of plain bytes at most each), up to a slice.
- none: the input itself, cut into slices.

Codecs (`REGISTRY`, at the end of this module, gives each one's name,
handshake byte and factories; ``handshake.Compress`` is derived from it):

- none: identity.
- flate: raw DEFLATE (no zlib header), level 6, ``Z_SYNC_FLUSH`` per batch (the
  stream ends each batch with ``00 00 ff ff``), never a final block; exactly
  Go's ``compress/flate`` Writer + Flush.  History carries across batches.
- snappy: the snappy framing format as golang/snappy's unbuffered ``Writer``:
  the ``sNaPpY`` identifier chunk once, in front of the first data; each flush
  cuts the batch into pieces of at most 65536 bytes, one chunk each (0x00
  compressed, or 0x01 stored when compressing saves less than 1/8), with a
  masked CRC-32C of the plain piece.  Chunks are independent.
  Both directions go through cramjam's framing functions (the Rust ``snap``
  crate, which python-snappy 0.7 is built on), so CRC-32C runs in native code.
  Measured on one core: cramjam frames a 64 KiB piece (compress + CRC) at
  ~1.6 GB/s for JSON and ~4 GB/s for random (stored) data, and checks plus
  decodes at ~2.7 GB/s; a pure-Python CRC-32C table loop manages 11 MB/s,
  and neither ``crc32c`` nor ``google_crc32c`` is a dependency.  snap
  uses Go's rules (65536-byte pieces, the same 1/8 test, the same mask), which
  tests/unit/test_teleport_codecs.py checks chunk by chunk with an independent
  CRC.  The decoder walks chunk headers itself (identifier first, reserved
  types 0x02-0x7f refused, chunks split across feeds) and hands complete
  chunks to cramjam, which checks each CRC and skips 0x80-0xfe.
- zstd (ours): zstandard frames, level 6 (see ``ZSTD_LEVEL``), a
  ``COMPRESSOBJ_FLUSH_BLOCK`` per batch; ``decompressobj`` reads it in pieces.
  A writer keeps one frame open for the connection's life unless its level
  changes; the reader accepts a stream of frames, one after another.
- brotli (ours): one brotli stream that never ends, quality 5 (see
  ``BROTLI_QUALITY``), ``flush()`` per batch.

Levels (``-inCompressLevel``/``-outCompressLevel``): a sender-side choice
that changes nothing on the wire; each codec's range is in `REGISTRY`.  A
compressor may change its level at a flush boundary (``set_level``, for
``auto``, httptp.teleport.autolevel):

- flate: a fresh deflater after the sync flush, primed with the last 32 KiB
  of plain bytes as its dictionary.  Raw deflate has no dictionary id: the
  new deflater's back-references land in the window every inflater (Go's
  too) already holds, so the stream stays one valid deflate stream and keeps
  its history.
- zstd: the frame ends (an empty last block) and the next batch opens a new
  frame at the new level; the history starts again (once per change).
- brotli: one stream is one encoder, and the python binding cannot change
  its quality; rather than reopen the link (a new handshake and an empty
  history) brotli keeps its level for the link's life (``auto`` stays at
  the codec's default).
"""

from __future__ import annotations

import enum
import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from httptp.teleport import CodecError

SNAPPY_MAX_BLOCK = 65536
SNAPPY_STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
FLATE_LEVEL = 6
FLATE_WINDOW = 32768        # raw deflate's window: what a new deflater is primed with
# zstd level 6, not the usual 3: the flush at every batch ends a zstd block,
# and small blocks cost zstd more than deflate (tables per block), so at
# level 3 flate out-packed zstd on RTB-like responses.  Measured on the bench's
# replay (ratio at µs per batch, requests / responses): flate-6 6.57@83 /
# 7.16@30; zstd-3 7.11@20 / 6.50@8; zstd-6 8.02@49 / 7.31@18.  Level 6 beats
# flate on ratio and CPU both ways (docs/benchmarks.md).
ZSTD_LEVEL = 6
# Measured on ~1.45 KB JSON POST frames, one stream, a flush per message
# (ratio, compress MB/s): flate-6 7.6 / 70; brotli q4 7.1 / 75, q5 8.0 / 55,
# q6 8.2 / 46.  q4 packs worse than flate, which defeats choosing brotli; q6
# buys 3% for 16% more CPU.  zstd-3 is the fast one (5.8 / 290).
BROTLI_QUALITY = 5
# golang/snappy's reader refuses any chunk longer than its buffer:
# maxEncodedLen(65536) + 4-byte checksum.
SNAPPY_MAX_CHUNK = 32 + SNAPPY_MAX_BLOCK + SNAPPY_MAX_BLOCK // 6 + 4
# Plain bytes one ``read`` returns, at most (brotli may return up to twice
# its ask, so it asks for half).  Big enough that a normal wire read (64 KiB
# of input, one recv) is one slice at the usual ratios.
MAX_SLICE = 256 * 1024
# The largest zstd window we accept (8 MiB: zstd levels up to 19 use at most
# that; our level 6 uses 2 MiB).  zstd's own default, 128 MiB, would let a
# peer make us allocate that much for its connection.
ZSTD_MAX_WINDOW = 1 << 23
ZSTD_BLOCK_MAX = 128 * 1024
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Compressor:
    """One direction's outgoing stream (identity: the ``none`` codec)."""

    #: the level it compresses at now (None: a codec without levels)
    level: int | None = None

    def compress(self, data: bytes) -> bytes:
        """Feed plain bytes; return compressed bytes ready now (maybe b"")."""
        return data

    def flush(self) -> bytes:
        """End a batch: return what makes everything so far decodable."""
        return b""

    def set_level(self, level: int) -> bytes:
        """Compress at ``level`` from the next batch on; call right after a
        ``flush``.  Returns bytes to send after that flush's (zstd: the end
        of the frame).  NotImplementedError for a codec that cannot change
        its level in a stream."""
        raise NotImplementedError


class _StreamCompressor(Compressor):
    """A library stream compressor: ``compress`` feeds ``self._compress``; a
    batch flush calls ``self._flush`` only when something was fed since the
    last one (an empty flush would still cost the peer a block)."""

    _compress = _flush = None     # bound methods, set by the subclass

    def __init__(self):
        self._dirty = False

    def compress(self, data: bytes) -> bytes:
        if not data:
            return b""
        self._dirty = True
        return self._compress(data)

    def flush(self) -> bytes:
        if not self._dirty:
            return b""
        self._dirty = False
        return self._flush()


class Decompressor:
    """One direction's incoming stream (identity: the ``none`` codec).

    ``feed(data)`` adds compressed bytes; ``read()`` returns the next slice of
    plain bytes (at most about ``MAX_SLICE``), ``b""`` once everything fed so
    far is out.  Read until ``b""`` before the next feed: that is what keeps
    the input held to one feed.  Raises CodecError on corrupt input; the
    stream is then unusable.
    """

    __slots__ = ("_in",)

    def __init__(self):
        self._in = b""

    def feed(self, data: bytes) -> None:
        self._in = self._in + data if self._in else data

    def read(self) -> bytes:
        data = self._in
        if len(data) <= MAX_SLICE:
            self._in = b""
            return data
        self._in = data[MAX_SLICE:]
        return data[:MAX_SLICE]


class _FlateCompressor(_StreamCompressor):
    """``history``: keep the last ``FLATE_WINDOW`` plain bytes, so that
    ``set_level`` can prime the new deflater with them (``auto`` only: it
    costs a copy per batch)."""

    def __init__(self, level: int | None, history: bool = False):
        super().__init__()
        self.level = FLATE_LEVEL if level is None else level
        self._history = b"" if history else None
        self._new(b"")

    def _new(self, zdict: bytes) -> None:
        z = (zlib.compressobj(self.level, zlib.DEFLATED, -15, zdict=zdict) if zdict
             else zlib.compressobj(self.level, zlib.DEFLATED, -15))
        self._compress = z.compress if self._history is None else self._remember
        self._z_compress = z.compress
        self._flush = functools.partial(z.flush, zlib.Z_SYNC_FLUSH)

    def _remember(self, data: bytes) -> bytes:
        h = self._history + data
        self._history = h[-FLATE_WINDOW:] if len(h) > FLATE_WINDOW else h
        return self._z_compress(data)

    def set_level(self, level: int) -> bytes:
        if level != self.level:
            self.level = level
            self._new(self._history or b"")
        return b""


class _FlateDecompressor(Decompressor):
    __slots__ = ("_z", "_more")

    def __init__(self):
        super().__init__()
        self._z = zlib.decompressobj(-15)
        self._more = False

    def feed(self, data: bytes) -> None:
        if data:
            self._in = self._in + data if self._in else data
            self._more = True

    def read(self) -> bytes:
        z = self._z
        while self._more:
            try:
                out = z.decompress(self._in, MAX_SLICE)
            except zlib.error as e:
                raise CodecError(f"flate: {e}") from None
            if z.eof:
                # Go never writes a final block: a peer that does is not a teleport.
                raise CodecError("flate: unexpected end of stream")
            self._in = z.unconsumed_tail
            # a full slice may leave output inside zlib even with no input left
            self._more = bool(self._in) or len(out) == MAX_SLICE
            if out:
                return out
        return b""


class _SnappyCompressor(Compressor):
    def __init__(self):
        import cramjam
        self._frame = cramjam.snappy.compress
        self._pending: list[bytes] = []
        self._started = False

    def compress(self, data: bytes) -> bytes:
        if data:
            self._pending.append(data)
        return b""

    def flush(self) -> bytes:
        if not self._pending:
            return b""
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        # cramjam writes the identifier then one chunk per 64 KiB piece.
        skip = len(SNAPPY_STREAM_ID) if self._started else 0
        self._started = True
        with memoryview(self._frame(data)) as framed, framed[skip:] as chunks:
            return bytes(chunks)


class _UnitDecompressor(Decompressor):
    """A codec fed whole units (snappy chunks, zstd blocks), a slice's worth
    at a time: ``_cut()`` says where the units that fit end (0: none is
    complete), ``_decode(units)`` decodes them, ``_drop(end)`` forgets them."""

    __slots__ = ("_buf",)

    def __init__(self):
        super().__init__()
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def read(self) -> bytes:
        while True:
            end = self._cut()
            if not end:
                return b""
            with memoryview(self._buf) as view, view[:end] as units:
                out = self._decode(units)
            self._drop(end)
            if out:
                return out


class _SnappyDecompressor(_UnitDecompressor):
    """Once the identifier is seen it stays at the front of the buffer, so the
    complete chunks can go to cramjam as one valid stream without a copy."""

    __slots__ = ("_unframe", "_error", "_base")

    def __init__(self):
        import cramjam
        super().__init__()
        self._unframe = cramjam.snappy.decompress
        self._error = cramjam.DecompressionError
        self._base = 0                  # 10 once the identifier is at buf[:10]

    def _decode(self, chunks) -> bytes:
        try:
            return bytes(self._unframe(chunks))
        except self._error as e:
            raise CodecError(str(e)) from None

    def _drop(self, end: int) -> None:
        self._buf[:end] = SNAPPY_STREAM_ID
        self._base = len(SNAPPY_STREAM_ID)

    def _cut(self) -> int:
        """The end offset of the complete chunks at the front of the buffer
        that decode to one slice at most (at least one chunk); 0 for none."""
        buf, pos, n = self._buf, self._base, len(self._buf)
        if pos == 0 and n >= 4 and buf[:4] != SNAPPY_STREAM_ID[:4]:
            raise CodecError("snappy: stream does not start with the stream identifier")
        budget = 0
        while pos + 4 <= n:
            kind = buf[pos]
            if 0x02 <= kind <= 0x7F:
                raise CodecError(f"snappy: unsupported chunk type {kind:#04x}")
            size = buf[pos + 1] | buf[pos + 2] << 8 | buf[pos + 3] << 16
            if size > SNAPPY_MAX_CHUNK:
                raise CodecError(f"snappy: chunk of {size} bytes is too long")
            if pos + 4 + size > n:
                break
            # plain bytes it may give: 0x00 at most a block, 0x01 its data
            out = SNAPPY_MAX_BLOCK if kind == 0x00 else size - 4 if kind == 0x01 else 0
            if budget and budget + out > MAX_SLICE:
                break
            budget += out
            pos += 4 + size
        return pos if pos != self._base else 0


class _ZstdCompressor(_StreamCompressor):
    def __init__(self, level: int | None, history: bool = False):
        super().__init__()
        self.level = ZSTD_LEVEL if level is None else level
        self._new()

    def _new(self) -> None:
        import zstandard
        z = self._z = zstandard.ZstdCompressor(level=self.level).compressobj()
        self._compress = z.compress
        self._flush = functools.partial(z.flush, zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def set_level(self, level: int) -> bytes:
        """End the frame; the next batch opens a new one at ``level``."""
        if level == self.level:
            return b""
        import zstandard
        end = self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        self.level = level
        self._new()
        return end


class _ZstdDecompressor(_UnitDecompressor):
    """Whole blocks to zstd, a slice's worth at a time (module docstring).

    The buffer always starts at a unit boundary: a frame header, then block
    after block.  A frame's last block (and its checksum, if the header
    announces one) ends a cut of its own; the next frame gets a fresh
    ``decompressobj`` (a level change, see ``_ZstdCompressor.set_level``).
    The walk only decides where to cut; zstd itself checks everything it is
    given."""

    __slots__ = ("_z", "_error", "_in_frame", "_checksum", "_frame_ends", "_new")

    def __init__(self):
        import zstandard
        super().__init__()
        self._new = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj
        self._z = self._new()
        self._error = zstandard.ZstdError
        self._in_frame = False
        self._checksum = 0              # 4 when the open frame ends with a checksum
        self._frame_ends = False        # the cut being decoded ends the frame

    def _decode(self, units) -> bytes:
        try:
            return self._z.decompress(units)
        except self._error as e:
            raise CodecError(f"zstd: {e}") from None

    def _drop(self, end: int) -> None:
        del self._buf[:end]
        if self._frame_ends:
            self._frame_ends = self._in_frame = False
            self._z = self._new()

    def _cut(self) -> int:
        """Where to cut: after the frame header (if not given yet) and the
        whole blocks that decode to one slice at most (at least one), or
        the frame's last block."""
        buf = self._buf
        n = len(buf)
        pos = 0
        if not self._in_frame:
            pos = self._frame_header(buf, n)
            if not pos:
                return 0
            self._in_frame = True
        budget = 0
        while pos + 3 <= n:
            header = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            kind = header >> 1 & 3
            size = header >> 3
            if kind == 3:
                raise CodecError("zstd: reserved block type")
            if size > ZSTD_BLOCK_MAX:
                raise CodecError(f"zstd: block of {size} bytes is too long")
            last = header & 1
            end = pos + 3 + (1 if kind == 1 else size) + (self._checksum if last else 0)
            if end > n:
                break
            out = ZSTD_BLOCK_MAX if kind == 2 else size     # RLE and raw: exactly size
            if budget and budget + out > MAX_SLICE:
                break
            budget += out
            pos = end
            if last:
                self._frame_ends = True
                break
        return pos

    def _frame_header(self, buf, n: int) -> int:
        """The size of the frame header at the front (0: not all here yet)."""
        if n < 5:
            return 0
        if buf[:4] != _ZSTD_MAGIC:
            raise CodecError("zstd: stream does not continue with a zstd frame")
        fhd = buf[4]
        if fhd & 0x08:
            raise CodecError("zstd: reserved bit set in the frame header")
        single = fhd & 0x20
        self._checksum = 4 if fhd & 0x04 else 0
        size = (5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
                + ((1 if single else 0), 2, 4, 8)[fhd >> 6])
        return size if n >= size else 0


class _BrotliCompressor(_StreamCompressor):
    def __init__(self, level: int | None, history: bool = False):
        import brotli
        super().__init__()
        self.level = BROTLI_QUALITY if level is None else level
        z = brotli.Compressor(quality=self.level)
        self._compress = z.process
        self._flush = z.flush


class _BrotliDecompressor(Decompressor):
    """brotli 1.2 hands out what ``output_buffer_limit`` allows (it may go
    up to twice that) and keeps the rest: ``process(b"")`` drains it, and new
    input may be given only once ``can_accept_more_data()``."""

    __slots__ = ("_z", "_error")

    def __init__(self):
        import brotli
        super().__init__()
        self._z = brotli.Decompressor()
        self._error = brotli.error

    def read(self) -> bytes:
        z = self._z
        while True:
            data = b""
            if self._in and z.can_accept_more_data():
                data, self._in = self._in, b""
            try:
                out = z.process(data, output_buffer_limit=MAX_SLICE // 2)
            except self._error as e:
                raise CodecError(f"brotli: {e}") from None
            if z.is_finished():
                raise CodecError("brotli: unexpected end of stream")
            if out:
                return out
            if not data:
                if self._in and not z.can_accept_more_data():
                    # nothing out, and it still will not take input: never
                    # seen; refuse rather than spin
                    raise CodecError("brotli: decoder stalled")
                if not self._in:
                    return b""


# --- the registry ------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    """One teleport codec: everything the rest of httptp knows about it.

    ``name`` is its ``-inCompress``/``-outCompress`` value (and the library's
    ``compress=``), ``byte`` the value in the handshake header (PROTOCOL.md
    §1.2), ``go`` whether the Go original speaks it (a Go peer drops the
    connection after a handshake that announces anything else).
    ``compressor(level, history)`` returns a fresh outgoing stream (``level``
    None: the codec's default; ignored by codecs without levels; ``history``:
    it will be asked to ``set_level``), ``decompressor()`` a fresh incoming
    one.  ``levels``: the lowest and highest level (None: no levels),
    ``default_level`` the level when none is given, ``auto_levels`` the
    bounds of ``auto`` (None: the level cannot change in a stream).
    """

    name: str
    byte: int
    go: bool
    compressor: Callable[..., Compressor]
    decompressor: Callable[[], Decompressor]
    levels: tuple[int, int] | None = None
    default_level: int | None = None
    auto_levels: tuple[int, int] | None = None


def _without_level(cls) -> Callable[..., Compressor]:
    """The factory of a compressor that has no level (none, snappy)."""
    return lambda level=None, history=False: cls()


REGISTRY: tuple[Codec, ...] = (
    # in the order the -help text lists them
    Codec("none", 1, True, _without_level(Compressor), Decompressor),       # Go: raw bytes
    # Go: raw DEFLATE, level 6, sync flush per batch.  Flate is 0, the Go
    # zero value, hence the Go original's default.  Any level is plain
    # DEFLATE: Go's reader (and ours) decodes every one.
    Codec("flate", 0, True, _FlateCompressor, _FlateDecompressor,
          (1, 9), FLATE_LEVEL, (1, 9)),
    # Go: snappy framing format (golang/snappy NewWriter)
    Codec("snappy", 2, True, _without_level(_SnappyCompressor), _SnappyDecompressor),
    # ours only (PROTOCOL.md §8): zstandard frames.  Negative (fast) levels
    # are not offered: on RTB-like batches level 1 is already ~6-11 us/msg at
    # x6-7 (bench/levels.py), more than snappy packs at any speed.  auto
    # spans 1-12: level 1 costs a third of level 3's CPU for ~3% more bytes
    # (what a saturated worker wants), and above 12 the CPU per message
    # grows ~20x for ~14% fewer bytes (docs/teleport.md).
    Codec("zstd", 3, False, _ZstdCompressor, _ZstdDecompressor,
          (1, 19), ZSTD_LEVEL, (1, 12)),
    # ours only: one brotli stream that never ends (its level is fixed per link)
    Codec("brotli", 4, False, _BrotliCompressor, _BrotliDecompressor,
          (0, 11), BROTLI_QUALITY, None),
)
"""Every codec, once: the handshake byte (`Compress`, `BY_NAME`), the
settings' choices (`NAMES`), the level ranges and the factories
(`compressor`, `decompressor`) are all read from here."""

NAMES: tuple[str, ...] = tuple(c.name for c in REGISTRY)
"""Codec names in the registry's (the -help text's) order."""

Compress = enum.IntEnum("Compress", [(c.name.upper(), c.byte)
                                     for c in sorted(REGISTRY, key=lambda c: c.byte)],
                        module=__name__)
Compress.__doc__ = """A codec by its handshake byte (``Compress.FLATE == 0``), from `REGISTRY`."""

BY_NAME: dict[str, Compress] = {c.name.lower(): c for c in Compress}
"""Codec name -> `Compress`, in byte order."""

_BY_BYTE: dict[int, Codec] = {c.byte: c for c in REGISTRY}

AUTO = "auto"
"""The level that follows the link (httptp.teleport.autolevel)."""


def codec(c: int) -> Codec:
    """The registry entry of codec ``c`` (a `Compress` or its byte value);
    ValueError for an unknown one."""
    return _BY_BYTE[Compress(c)]


def check_level(c: int, level: int | str | None) -> int | str | None:
    """``level`` if codec ``c`` takes it (None: the default; ``"auto"``;
    an int in the codec's range); ValueError with a message for an
    operator otherwise."""
    if level is None:
        return None
    entry = codec(c)
    if entry.levels is None:
        raise ValueError(f"{entry.name} has no compression levels (leave the level unset)")
    if level == AUTO:
        return level
    low, high = entry.levels
    if not isinstance(level, int) or not low <= level <= high:
        raise ValueError(f"{entry.name} levels are {low} to {high}, not {level}")
    return level


def level_ranges() -> str:
    """"flate 1-9, zstd 1-19, brotli 0-11": for help texts and errors."""
    return ", ".join(f"{c.name} {c.levels[0]}-{c.levels[1]}" for c in REGISTRY if c.levels)


def compressor(c: int, level: int | None = None, history: bool = False) -> Compressor:
    """A fresh outgoing stream for codec ``c`` (``level`` overrides the default;
    snappy and none have no level; ``history``: ``set_level`` will be used)."""
    return codec(c).compressor(level, history)


def decompressor(c: int) -> Decompressor:
    """A fresh incoming stream for codec ``c``."""
    return codec(c).decompressor()
