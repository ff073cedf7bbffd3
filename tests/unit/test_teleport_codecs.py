"""Compression streams (PROTOCOL.md §1.3): round trips, wire structure,
interop with independent implementations, corrupt input."""

import os
import random
import zlib

import pytest
import snappy

from httptp.teleport import CodecError
from httptp.teleport.codecs import SNAPPY_STREAM_ID, compressor, decompressor
from httptp.teleport.handshake import Compress
from tests.helpers import decompress_all

ALL = list(Compress)


# --- an independent CRC-32C (Castagnoli), to check snappy chunks by hand ----

def _table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_reference_values():
    assert crc32c(b"123456789") == 0xE3069283          # the standard check value
    assert crc32c(b"") == 0


def snappy_chunks(stream: bytes):
    """Split a snappy framed stream into (type, body) chunks."""
    out, i = [], 0
    while i < len(stream):
        kind, size = stream[i], int.from_bytes(stream[i + 1:i + 4], "little")
        assert i + 4 + size <= len(stream), "truncated chunk"
        out.append((kind, stream[i + 4:i + 4 + size]))
        i += 4 + size
    return out


def check_snappy_stream(stream: bytes, pieces: list):
    """Assert the golang/snappy Writer structure: identifier once, first; one
    chunk per piece; stored iff compressing saves < 1/8; masked CRC-32C."""
    chunks = snappy_chunks(stream)
    assert stream.startswith(SNAPPY_STREAM_ID) and chunks[0] == (0xFF, b"sNaPpY")
    chunks = chunks[1:]
    assert len(chunks) == len(pieces)
    for (kind, body), piece in zip(chunks, pieces):
        assert int.from_bytes(body[:4], "little") == masked_crc32c(piece)
        raw = snappy.compress(piece)
        if len(raw) < len(piece) - len(piece) // 8:
            assert kind == 0x00 and snappy.uncompress(body[4:]) == piece
        else:
            assert kind == 0x01 and body[4:] == piece


# --- helpers ---------------------------------------------------------------

def run(c, batches, step=None, level=None):
    """Compress ``batches`` (a list of lists of writes, one flush per batch)
    and decode the stream fed in pieces of ``step`` (or per flush)."""
    comp, dec = compressor(c, level), decompressor(c)
    flushes = []
    for batch in batches:
        out = b"".join(comp.compress(w) for w in batch)
        flushes.append(out + comp.flush())
    stream = b"".join(flushes)
    feeds = flushes if step is None else [stream[i:i + step] for i in range(0, len(stream), step)]
    got = b"".join(decompress_all(dec, f) for f in feeds)
    assert got == b"".join(b"".join(b) for b in batches)
    return stream, flushes


def message(i: int) -> bytes:
    return (b'\x01\x00\x00\x00POST /openrtb2/auction HTTP/1.1\r\nHost: bidder.example\r\n'
            b'Content-Length: 60\r\n\r\n{"id":"%06d","imp":[{"id":"1","banner":{"w":300}}]}' % i)


# --- round trips -----------------------------------------------------------

@pytest.mark.parametrize("c", ALL)
@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_batches_of_many_frames(c, step):
    batches = [[message(i) for i in range(j, j + 10)] for j in range(0, 60, 10)]
    run(c, batches, step)


@pytest.mark.parametrize("c", ALL)
def test_a_frame_split_across_flushes(c):
    m = b"".join(message(i) for i in range(5))
    batches = [[m[:10]], [m[10:11]], [m[11:200], m[200:201]], [m[201:]]]
    run(c, batches)


@pytest.mark.parametrize("c", ALL)
@pytest.mark.parametrize("size", [1, 100, 65535, 65536, 65537, 4 << 20])
def test_body_sizes(c, size):
    rnd = random.Random(size)
    body = bytes(rnd.getrandbits(8) for _ in range(min(size, 5000))) * (size // 5000 + 1)
    run(c, [[body[:size]], [b"tail"]], step=None)
    if size <= 65537:
        run(c, [[body[:size]]], step=4096)


@pytest.mark.parametrize("c", ALL)
def test_incompressible_4mib_in_one_feed(c):
    run(c, [[os.urandom(4 << 20)]])


@pytest.mark.parametrize("c", ALL)
def test_flush_without_data_writes_nothing(c):
    comp = compressor(c)
    assert comp.compress(b"") == b""
    assert comp.flush() == b""
    out = comp.compress(b"x")
    assert out + comp.flush() != b""
    assert comp.flush() == b""


@pytest.mark.parametrize("c", ALL)
def test_levels(c):
    if c in (Compress.FLATE, Compress.ZSTD, Compress.BROTLI):
        run(c, [[message(i) for i in range(20)]], level=1)


def test_none_is_identity():
    comp, dec = compressor(Compress.NONE), decompressor(Compress.NONE)
    assert comp.compress(b"abc") == b"abc" and comp.flush() == b""
    assert decompress_all(dec, b"abc") == b"abc"


# --- flate wire structure and interop ---------------------------------------

def test_flate_sync_flush_and_no_final_block():
    stream, flushes = run(Compress.FLATE, [[message(1)], [message(2)]])
    assert all(f.endswith(b"\x00\x00\xff\xff") for f in flushes)
    d = zlib.decompressobj(-15)
    assert d.decompress(stream) == message(1) + message(2)
    assert not d.eof                            # the stream never ends


def test_flate_history_carries_across_batches():
    _, flushes = run(Compress.FLATE, [[message(1)], [message(1)]])
    assert len(flushes[1]) < len(flushes[0]) // 3


def test_flate_reads_a_stream_zlib_wrote():
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [message(i) for i in range(20)]
    stream = b"".join(z.compress(p) + z.flush(zlib.Z_SYNC_FLUSH) for p in parts)
    dec = decompressor(Compress.FLATE)
    assert b"".join(decompress_all(dec, stream[i:i + 3]) for i in range(0, len(stream), 3)) == b"".join(parts)


def test_flate_final_block_is_an_error():
    stream = zlib.compress(b"hello", 6, )[2:-4]         # strip the zlib wrapper: final block
    with pytest.raises(CodecError):
        decompress_all(decompressor(Compress.FLATE), stream)


# --- snappy wire structure and interop --------------------------------------

@pytest.mark.parametrize("size", [1, 65535, 65536, 65537, 2 * 65536 + 1])
def test_snappy_chunks_follow_the_go_writer(size):
    rnd = random.Random(size)
    data = bytes(rnd.choice(b"abcdefgh ") for _ in range(size))
    comp = compressor(Compress.SNAPPY)
    assert comp.compress(data[:size // 2]) == b""          # buffered until flush
    comp.compress(data[size // 2:])
    stream = comp.flush()
    pieces = [data[i:i + 65536] for i in range(0, size, 65536)]
    check_snappy_stream(stream, pieces)


def test_snappy_stored_chunks_for_random_data():
    data = os.urandom(70000)
    comp = compressor(Compress.SNAPPY)
    comp.compress(data)
    stream = comp.flush()
    check_snappy_stream(stream, [data[:65536], data[65536:]])
    assert [k for k, _ in snappy_chunks(stream)] == [0xFF, 0x01, 0x01]


def test_snappy_identifier_written_once_and_lazily():
    comp = compressor(Compress.SNAPPY)
    assert comp.flush() == b""
    comp.compress(b"a" * 100)
    first = comp.flush()
    comp.compress(b"b" * 100)
    second = comp.flush()
    assert first.startswith(SNAPPY_STREAM_ID) and not second.startswith(SNAPPY_STREAM_ID)
    check_snappy_stream(first + second, [b"a" * 100, b"b" * 100])


def test_snappy_stream_read_by_python_snappy():
    data = [message(i) for i in range(30)] + [os.urandom(200000), b"x" * 150000]
    stream, _ = run(Compress.SNAPPY, [[m] for m in data])
    assert snappy.StreamDecompressor().decompress(stream) == b"".join(data)


def test_snappy_reads_what_python_snappy_wrote():
    c = snappy.StreamCompressor()
    data = [message(i) for i in range(30)] + [os.urandom(100000)]
    stream = b"".join(c.compress(m) for m in data)
    dec = decompressor(Compress.SNAPPY)
    got = b"".join(decompress_all(dec, stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert got == b"".join(data)


def test_snappy_skips_padding_and_skippable_chunks():
    comp = compressor(Compress.SNAPPY)
    comp.compress(b"x" * 50)
    stream = comp.flush()
    stream = (stream[:10] + b"\xfe\x03\x00\x00pad" + stream[10:] + b"\x80\x01\x00\x00?"
              + SNAPPY_STREAM_ID + stream[10:])
    dec = decompressor(Compress.SNAPPY)
    assert b"".join(decompress_all(dec, stream[i:i + 1]) for i in range(len(stream))) == b"x" * 100


def _snappy_stream(data: bytes) -> bytes:
    comp = compressor(Compress.SNAPPY)
    comp.compress(data)
    return comp.flush()


def test_snappy_refuses_an_oversized_chunk_before_buffering_it():
    dec = decompressor(Compress.SNAPPY)
    with pytest.raises(CodecError, match="too long"):
        decompress_all(dec, SNAPPY_STREAM_ID + b"\x01\xff\xff\x0f")     # announces ~1 MiB


@pytest.mark.parametrize("damage", ["crc", "payload", "noid", "reserved", "badid", "truncated_block"])
def test_snappy_corrupt(damage):
    stream = bytearray(_snappy_stream(b"hello world " * 100))
    if damage == "crc":
        stream[15] ^= 0x01                          # a byte of the first chunk's CRC
    elif damage == "payload":
        stream[-1] ^= 0xFF
    elif damage == "noid":
        stream = stream[10:]
    elif damage == "reserved":
        stream = stream + b"\x02\x01\x00\x00x"
    elif damage == "badid":
        stream[4] = ord("X")
    else:
        stream = stream + b"\x00\x05\x00\x00\x00\x00\x00\x00\xff"    # compressed chunk, garbage
    dec = decompressor(Compress.SNAPPY)
    with pytest.raises(CodecError):
        decompress_all(dec, bytes(stream))


def test_snappy_crc_error_in_a_later_chunk():
    dec = decompressor(Compress.SNAPPY)
    comp = compressor(Compress.SNAPPY)
    comp.compress(b"first")
    assert decompress_all(dec, comp.flush()) == b"first"
    comp.compress(b"second")
    bad = bytearray(comp.flush())
    bad[5] ^= 0x10
    with pytest.raises(CodecError):
        decompress_all(dec, bytes(bad))


# --- other corrupt streams --------------------------------------------------

@pytest.mark.parametrize("c", [Compress.FLATE, Compress.ZSTD, Compress.BROTLI])
def test_garbage_is_a_codec_error(c):
    with pytest.raises(CodecError):
        dec = decompressor(c)
        for _ in range(4):
            decompress_all(dec, b"\xff\xfe garbage, not a stream \x00\x07" * 8)


@pytest.mark.parametrize("c", [Compress.FLATE, Compress.ZSTD, Compress.BROTLI])
def test_garbage_after_good_data(c):
    comp, dec = compressor(c), decompressor(c)
    comp.compress(message(1))
    assert decompress_all(dec, comp.flush()) == message(1)
    with pytest.raises(CodecError):
        for _ in range(4):
            decompress_all(dec, b"\xff\xfe\xfd garbage \x00\x07" * 8)


# --- bounded output: a bomb comes out a slice at a time ---------------------

def _bomb(c, plain: int, block: int = 1 << 20) -> bytes:
    """``plain`` zero bytes, flushed a ``block`` at a time, as a peer would."""
    comp = compressor(c, 1 if c in (Compress.FLATE, Compress.ZSTD, Compress.BROTLI) else None)
    zeros = bytes(block)
    return b"".join(comp.compress(zeros) + comp.flush() for _ in range(plain // block))


@pytest.mark.parametrize("c", ALL)
def test_a_bomb_comes_out_in_slices(c):
    """64 MiB of zeros in one feed: no read gives more than a slice (brotli
    may give up to twice its ask, which is half a slice), and what is held
    besides the slice stays small."""
    from httptp.teleport.codecs import MAX_SLICE
    plain = 64 << 20
    stream = _bomb(c, plain)
    dec = decompressor(c)
    dec.feed(stream)
    total = reads = 0
    while out := dec.read():
        assert len(out) <= MAX_SLICE
        total += len(out)
        reads += 1
    assert total == plain
    assert reads >= plain // MAX_SLICE


@pytest.mark.parametrize("c", ALL)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_slices_fed_in_pieces_join_to_the_whole(c, step):
    data = [message(i) for i in range(20)] + [bytes(300000), os.urandom(70000)]
    comp = compressor(c)
    stream = b"".join(comp.compress(d) + comp.flush() for d in data)
    whole = b"".join(data)
    if step == 1:
        stream = stream[:5000]      # a byte at a time: the front is enough
    dec = decompressor(c)
    got = b"".join(decompress_all(dec, stream[i:i + step]) for i in range(0, len(stream), step))
    if step == 1:
        assert got and whole.startswith(got)
    else:
        assert got == whole


# --- zstd: the block walk ---------------------------------------------------

def _zstd_head() -> bytes:
    comp = compressor(Compress.ZSTD)
    comp.compress(b"x")
    return comp.flush()[:6]          # magic, descriptor 0x00, window descriptor


@pytest.mark.parametrize("bad, match", [
    (b"\x28\xb5\x2f\xfe\x00\x58", "zstd frame"),                  # wrong magic
    (b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd", "zstd frame"),      # a skippable frame
    (b"\x28\xb5\x2f\xfd\x08\x58", "reserved bit"),
    # a frame may end (a level change): what follows must be a frame again
    (b"\x28\xb5\x2f\xfd\x00\x58" + b"\x01\x00\x00" + b"junk!", "zstd frame"),
    (b"\x28\xb5\x2f\xfd\x00\x58" + b"\x06\x00\x00", "reserved block"),       # type 3
    (b"\x28\xb5\x2f\xfd\x00\x58" + (((128 * 1024 + 1) << 3) | 2).to_bytes(3, "little"),
     "too long"),
])
def test_zstd_walk_refuses(bad, match):
    with pytest.raises(CodecError, match=match):
        decompress_all(decompressor(Compress.ZSTD), bad)


def test_zstd_refuses_a_window_over_the_cap():
    import zstandard
    from httptp.teleport.codecs import ZSTD_MAX_WINDOW
    params = zstandard.ZstdCompressionParameters(window_log=ZSTD_MAX_WINDOW.bit_length())
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    stream = c.compress(b"y" * 1000) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(CodecError, match="too much memory"):
        decompress_all(decompressor(Compress.ZSTD), stream)


def test_zstd_rle_blocks_are_sliced_by_their_size():
    """RLE blocks: 4 bytes each on the wire, 128 KiB out: a slice takes two."""
    rle = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"z"
    dec = decompressor(Compress.ZSTD)
    dec.feed(_zstd_head() + rle * 10)
    sizes = []
    while out := dec.read():
        assert set(out) == {ord("z")}
        sizes.append(len(out))
    assert sizes == [256 * 1024] * 5
