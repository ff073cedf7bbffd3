"""Property and fuzz tests of the teleport layers (docs/fuzzing.md): the
15-byte handshake, every decompressor, and the frame reader of both kinds.

Properties:

- only the layer's own error escapes: HandshakeError, CodecError,
  FramingError (FrameTooLarge included), all TeleportError;
- encode then decode gives back what was encoded: handshake headers,
  compressed batches (every codec, random batches and feed cuts, everything
  flushed so far decodable), request and response frames;
- bounded memory: a decompressor's ``read`` returns at most MAX_SLICE and,
  once drained, holds at most one codec unit of input; a frame reader holds
  at most one header block and one body;
- a stream cut anywhere reads like the same stream fed byte by byte (the
  same frames, or the same error after a prefix of them), and a reader that
  remembers header blocks reads like a fresh one per frame.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from httptp.http.events import RequestHead, ResponseHead
from httptp.teleport import CodecError, FramingError, FrameTooLarge, HandshakeError
from httptp.teleport import codecs, framing, handshake
from httptp.teleport.codecs import MAX_SLICE, compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request, encode_response
from httptp.teleport.handshake import HEADER_SIZE, MAGIC, Compress
from tests.fuzz.http_messages import (byte_mutations, damaged_pipelines, damaged_responses,
                                      field_values, hosts, origin_forms, tokens)
from tests.fuzz.support import bytewise, cuts

ALL = list(Compress)


# -- handshake ----------------------------------------------------------------------

@given(st.sampled_from(ALL), st.booleans())
def test_handshake_round_trip(codec, tls):
    data = handshake.encode(codec, tls)
    assert len(data) == HEADER_SIZE and handshake.decode(data) == (codec, tls)


@given(st.one_of(st.binary(max_size=40),
                 st.builds(lambda c, t: handshake.encode(c, t), st.sampled_from(ALL),
                           st.booleans()).flatmap(byte_mutations),
                 st.binary(min_size=3, max_size=3).map(lambda tail: MAGIC + tail)))
def test_handshake_decode_only_raises_handshake_error(data):
    try:
        codec, tls = handshake.decode(data)
    except HandshakeError:
        return
    assert len(data) == HEADER_SIZE and data[:12] == MAGIC and data[12] == 0
    assert codec == data[13] and tls == (data[14] != 0)


# -- codecs -------------------------------------------------------------------------

# Plain data: random bytes, text-like, and long repeats that compress a lot (so
# one feed decodes to several slices).
plain = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.builds(lambda unit, n: unit * n, st.binary(min_size=1, max_size=16),
              st.integers(1, 40_000)),
)
batches = st.lists(st.lists(plain, min_size=1, max_size=4), min_size=1, max_size=4)

# What a drained decompressor may still hold: part of one codec unit.
_UNIT = {
    Compress.NONE: 0,
    Compress.FLATE: 0,
    Compress.BROTLI: 0,
    Compress.SNAPPY: len(codecs.SNAPPY_STREAM_ID) + 4 + codecs.SNAPPY_MAX_CHUNK,
    Compress.ZSTD: 18 + 3 + codecs.ZSTD_BLOCK_MAX,
}


def held_input(dec) -> int:
    return len(dec._buf) if hasattr(dec, "_buf") else len(dec._in)


def drain(codec, dec, data: bytes) -> bytes:
    """Feed ``data`` and read until ``b""``, checking every slice and what is
    held afterwards; CodecError escapes."""
    dec.feed(data)
    out = []
    for _ in range(100_000):
        piece = dec.read()
        assert len(piece) <= MAX_SLICE, len(piece)
        if not piece:
            break
        out.append(piece)
    else:
        raise AssertionError("read() never returned b''")
    assert held_input(dec) <= _UNIT[codec], (held_input(dec), _UNIT[codec])
    return b"".join(out)


def _stream(codec, batches_) -> tuple[bytes, list]:
    """The compressed stream and the offsets where each flush ends."""
    comp = compressor(codec)
    parts, ends = [], []
    for batch in batches_:
        parts += [comp.compress(w) for w in batch]
        parts.append(comp.flush())
        ends.append(sum(map(len, parts)))
    return b"".join(parts), ends


@given(st.sampled_from(ALL), batches, st.data())
def test_codec_round_trip(codec, batches_, data):
    stream, ends = _stream(codec, batches_)
    pieces = data.draw(cuts(stream, max_cuts=6))
    dec = decompressor(codec)
    got, fed = [], 0
    flushed = {end: b"".join(b"".join(b) for b in batches_[:i + 1]) for i, end in enumerate(ends)}
    for piece in pieces:
        got.append(drain(codec, dec, piece))
        fed += len(piece)
        if fed in flushed:          # everything flushed so far is decodable
            assert b"".join(got) == flushed[fed]
    assert b"".join(got) == b"".join(b"".join(b) for b in batches_)


def _damaged_stream(codec):
    return batches.map(lambda b: _stream(codec, b)[0]).flatmap(byte_mutations)


def _garbage(codec):
    """Random bytes, random bytes behind a valid stream start, or a damaged
    valid stream."""
    start = {Compress.SNAPPY: codecs.SNAPPY_STREAM_ID, Compress.ZSTD: b"\x28\xb5\x2f\xfd"}
    prefix = start.get(codec, b"")
    return st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: prefix + b),
                     _damaged_stream(codec))


@given(st.sampled_from(ALL).flatmap(lambda c: st.tuples(st.just(c), _garbage(c))), st.data())
def test_damaged_streams_only_raise_codec_error(case, data):
    codec, stream = case
    pieces = data.draw(cuts(stream, max_cuts=6))
    dec = decompressor(codec)
    try:
        for piece in pieces:
            drain(codec, dec, piece)
    except CodecError:
        pass


@given(st.sampled_from(ALL).flatmap(lambda c: st.tuples(st.just(c), _damaged_stream(c))),
       st.data())
def test_damaged_streams_decode_the_same_split_anywhere(case, data):
    codec, stream = case
    pieces = data.draw(cuts(stream, max_cuts=6))

    def decode(feeds):
        dec, out = decompressor(codec), []
        try:
            for piece in feeds:
                out.append(drain(codec, dec, piece))
        except CodecError:
            return b"".join(out), True
        return b"".join(out), False

    whole, whole_err = decode([stream])
    split, split_err = decode(pieces)
    assert split_err == whole_err
    if not whole_err:
        assert split == whole
    else:       # a feed that raises loses its output: one is a prefix of the other
        assert whole.startswith(split) or split.startswith(whole)


# -- frames ---------------------------------------------------------------------------

_FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"expect"}
frame_headers = st.lists(
    st.tuples(tokens.filter(lambda n: n.lower() not in _FRAMING_NAMES | {b"host"}),
              field_values(max_size=30)),
    max_size=5)
methods = st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH"]),
                    tokens)
ids = st.integers(0, 2**32 - 1)


@st.composite
def request_frames(draw):
    """``(wire bytes, expected frame)`` of one encode_request frame."""
    req_id, method, target = draw(ids), draw(methods), draw(origin_forms())
    headers = draw(frame_headers)
    # a valid host[:port], as the HTTP parsers require (framing._check_hosts)
    headers.insert(draw(st.integers(0, len(headers))), (b"Host", draw(hosts)))
    body = b"" if method in (b"GET", b"HEAD") else draw(st.binary(max_size=200))
    raw = encode_request(req_id, method, target, headers, body)
    if method in (b"GET", b"HEAD"):
        head = RequestHead(method, target, b"1.1", headers, True, None, False, False)
    else:
        head = RequestHead(method, target, b"1.1",
                           headers + [(b"Content-Length", b"%d" % len(body))],
                           True, len(body), False, False)
    return raw, (req_id, head, body)


@st.composite
def response_frames(draw, heads: dict):
    """``(wire bytes, expected frame)`` of one encode_response frame, or of
    a response to HEAD (a Content-Length and no body, as Go sends it).
    ``heads`` maps the ids drawn so far to "answers a HEAD"."""
    req_id = draw(ids.filter(lambda i: i not in heads))
    status = draw(st.integers(100, 599))
    reason = draw(st.one_of(st.just(b""), field_values(max_size=20)))
    headers = draw(frame_headers)
    no_body = status < 200 or status in (204, 304)
    if not no_body and draw(st.integers(0, 4)) == 0:       # a HEAD response
        heads[req_id] = True
        length = draw(st.integers(0, 10**9))
        raw = encode_response(req_id, status, reason, headers, b"")
        raw = raw.replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: %d\r\n\r\n" % length)
        body = b""
    else:
        heads[req_id] = False
        body = b"" if no_body else draw(st.binary(max_size=200))
        length = None if no_body else len(body)
        raw = encode_response(req_id, status, reason, headers, body)
    if not reason:
        reason = raw[4:].split(b"\r\n", 1)[0].split(b" ", 2)[2]
    if length is not None:
        headers = headers + [(b"Content-Length", b"%d" % length)]
    return raw, (req_id, ResponseHead(status, reason, b"1.1", headers, True, length, False), body)


@st.composite
def response_streams(draw, max_frames=6):
    """``(frames, heads)``: 1-``max_frames`` response frames with distinct
    ids, and which of them answer a HEAD."""
    heads: dict = {}
    frames = [draw(response_frames(heads)) for _ in range(draw(st.integers(1, max_frames)))]
    return frames, heads


def read_frames(kind, pieces, max_header=1 << 16, max_body=None, is_head=None):
    """``(frames, error class or None)``, checking what the reader holds
    after every feed when ``max_body`` is given."""
    reader = FrameReader(kind, max_header, is_head, max_body)
    frames = []
    try:
        for piece in pieces:
            frames += reader.feed(piece)
            if max_body is not None:
                held = len(reader._buf) + sum(map(len, reader._parts))
                assert held <= max_header + max_body + 4 + len(piece), held
    except FramingError as e:
        return frames, (e.__class__, getattr(e, "what", None))
    return frames, None


def same_frames(reference, other) -> None:
    """A split feed gives the byte-by-byte frames, or the same error after
    a prefix of them."""
    assert other[1] == reference[1]
    if reference[1] is None:
        assert other[0] == reference[0]
    else:
        assert other[0] == reference[0][:len(other[0])]


@given(st.lists(request_frames(), min_size=1, max_size=6), st.data())
def test_request_frames_round_trip(frames, data):
    stream = b"".join(raw for raw, _ in frames)
    for pieces in ([stream], data.draw(cuts(stream, max_cuts=8))):
        got, err = read_frames("request", pieces)
        assert err is None and got == [frame for _, frame in frames]


@given(response_streams(), st.data())
def test_response_frames_round_trip(case, data):
    frames, heads = case
    stream = b"".join(raw for raw, _ in frames)
    for pieces in ([stream], data.draw(cuts(stream, max_cuts=8))):
        got, err = read_frames("response", pieces, is_head=heads.__getitem__)
        assert err is None and got == [frame for _, frame in frames]


def _framed(messages):
    """Frames of arbitrary (valid, damaged) HTTP messages behind random ids."""
    return st.lists(st.tuples(ids, messages), min_size=1, max_size=3).map(
        lambda fs: b"".join(i.to_bytes(4, "little") + m for i, m in fs))


damaged_request_stream = st.one_of(
    _framed(damaged_pipelines(bytewise=False)),
    _framed(damaged_pipelines()),
    st.lists(request_frames(), min_size=1, max_size=4).map(
        lambda fs: b"".join(raw for raw, _ in fs)).flatmap(byte_mutations),
    st.binary(max_size=300),
)
damaged_response_stream = st.one_of(
    _framed(damaged_responses().map(lambda c: c[1])),
    response_streams(4).map(lambda c: b"".join(raw for raw, _ in c[0])).flatmap(byte_mutations),
    st.binary(max_size=300),
)


@st.composite
def damaged_frames(draw):
    kind = draw(st.sampled_from(["request", "response"]))
    return kind, draw(damaged_request_stream if kind == "request" else damaged_response_stream)


@given(damaged_frames(), st.data())
def test_damaged_frames_read_the_same_split_anywhere(case, data):
    kind, stream = case
    is_head = (lambda req_id: req_id % 3 == 0) if kind == "response" else None
    reference = read_frames(kind, bytewise(stream), is_head=is_head)
    same_frames(reference, read_frames(kind, [stream], is_head=is_head))
    same_frames(reference, read_frames(kind, data.draw(cuts(stream, max_cuts=8)),
                                       is_head=is_head))


@given(damaged_frames(), st.integers(8, 300), st.integers(0, 200), st.data())
def test_frame_reader_holds_one_head_and_one_body_at_most(case, max_header, max_body, data):
    kind, stream = case
    pieces = data.draw(cuts(stream, max_cuts=8))
    frames, err = read_frames(kind, pieces, max_header, max_body)
    for req_id, head, body in frames:
        assert body is None or len(body) <= max_body
        if body is None:        # refused, skipped: a request with a Content-Length
            assert kind == "request" and head.content_length > max_body
    if err is not None and err[0] is FrameTooLarge:
        assert err[1] in ("header", "body")


@given(st.sampled_from(["request", "response"]).flatmap(
    lambda kind: st.tuples(st.just(kind), st.lists(
        damaged_request_stream if kind == "request" else damaged_response_stream,
        min_size=1, max_size=4))))
def test_remembered_header_blocks_read_like_fresh_ones(case):
    """One reader over many frames (its header-block memory in play) gives
    each frame and each error as a fresh reader per frame does."""
    kind, streams = case
    shared = FrameReader(kind, 4096)
    for stream in streams:
        fresh = FrameReader(kind, 4096)
        try:
            expected = fresh.feed(stream)
            if fresh._buf or fresh._skip or fresh._state.__func__ is not FrameReader._read_head:
                return              # an unfinished frame: the next stream would not start one
        except FramingError as e:
            expected = e
        try:
            got = shared.feed(stream)
        except FramingError as e:
            got = e
        if isinstance(expected, FramingError):
            assert type(got) is type(expected) and str(got) == str(expected)
            return
        assert got == expected


def test_strategies_cover_both_head_paths():
    """The remembered-block path needs repeated heads: a quick sanity check
    that a repeated frame is served from the cache and equals the first."""
    raw = encode_request(1, b"POST", b"/x", [(b"Host", b"h")], b"abc")
    reader = FrameReader("request", 4096)
    first = reader.feed(raw)
    assert reader._heads and reader.feed(raw) == first
    assert framing.HEAD_CACHE_SIZE > 1
