"""Real teleport streams written by the Go httptp (/work/shared/vectors/README.md):
our handshake, decompressors and FrameReader must read exactly the listed
exchanges, independent decoders must agree with ours, and what we encode for
the same messages must read back the same way."""

import json
import zlib
from pathlib import Path

import pytest
import snappy

from httptp.teleport import codecs, handshake
from httptp.teleport.framing import FrameReader, encode_request, encode_response
from httptp.teleport.handshake import HEADER_SIZE, Compress
from tests.helpers import decompress_all
from tests.unit.test_teleport_codecs import masked_crc32c, snappy_chunks

_CANDIDATES = [Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "teleport-go",
               Path("/work/shared/vectors/teleport-go")]
VECTORS = next((p for p in _CANDIDATES if (p / "index.json").is_file()), None)

pytestmark = pytest.mark.skipif(
    VECTORS is None, reason="Go teleport vectors not found in ../shared/vectors/teleport-go")

MAX_HEADER = 4096       # the Go httptp's ReadBufferSize


def _cases():
    if VECTORS is None:
        return []
    return json.loads((VECTORS / "index.json").read_text())["cases"]


CASES = _cases()
IDS = [c["case"] for c in CASES]


def load(case, direction):
    data = (VECTORS / case[f"{direction}_file"]).read_bytes()
    assert len(data) == case[f"{direction}_bytes"]
    return data


def split_handshake(case, direction):
    data = load(case, direction)
    codec, tls = handshake.decode(data[:HEADER_SIZE])
    name = case["client_compress" if direction == "c2s" else "server_compress"]
    assert codec == handshake.BY_NAME[name] and tls is False
    assert data[14] == 0
    return codec, data[HEADER_SIZE:]


def decompress(codec, stream, step):
    dec = codecs.decompressor(codec)
    return b"".join(decompress_all(dec, stream[i:i + step]) for i in range(0, len(stream), step))


def frames_of(kind, plain, step=4096):
    reader = FrameReader(kind, MAX_HEADER)
    out = []
    for i in range(0, len(plain), step):
        out += reader.feed(plain[i:i + step])
    return out


def header_value(head, name):
    values = [v for k, v in head.headers if k.lower() == name.lower().encode()]
    assert len(values) == 1, (name, head.headers)
    return values[0].decode("latin-1")


def check_requests(case, frames):
    assert len(frames) == len(case["exchanges"])
    for n, ((rid, head, body), ex) in enumerate(zip(frames, case["exchanges"]), 1):
        want = ex["request"]
        assert rid == n                     # serial requests: ids 1, 2, 3, ...
        assert head.method.decode() == want["method"] and head.target.decode() == want["path"]
        for name, value in want["headers"].items():
            assert header_value(head, name) == value
        assert len(body) == want["body_len"]
        if want["body_utf8"] is not None:
            assert body.decode() == want["body_utf8"]


def check_responses(case, frames):
    assert len(frames) == len(case["exchanges"])
    for n, ((rid, head, body), ex) in enumerate(zip(frames, case["exchanges"]), 1):
        assert rid == n
        assert head.status == ex["response"]["status"]
        assert body.decode() == ex["response"]["body"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_c2s_gives_the_listed_requests(case, step):
    codec, stream = split_handshake(case, "c2s")
    plain = decompress(codec, stream, step)
    check_requests(case, frames_of("request", plain))
    check_requests(case, frames_of("request", plain, step=step))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_s2c_gives_the_listed_responses(case, step):
    codec, stream = split_handshake(case, "s2c")
    plain = decompress(codec, stream, step)
    check_responses(case, frames_of("response", plain, step=step))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_independent_decoders_agree(case, direction):
    codec, stream = split_handshake(case, direction)
    ours = decompress(codec, stream, 1 << 20)
    if codec == Compress.FLATE:
        d = zlib.decompressobj(-15)
        assert d.decompress(stream) == ours and not d.eof     # Go never ends the stream
        assert stream.endswith(b"\x00\x00\xff\xff")           # each batch ends in a sync flush
    elif codec == Compress.SNAPPY:
        assert snappy.StreamDecompressor().decompress(stream) == ours
        chunks = snappy_chunks(stream)
        assert chunks[0] == (0xFF, b"sNaPpY")                  # identifier first, lazily
        data = [snappy.uncompress(b[4:]) if k == 0 else b[4:] for k, b in chunks[1:]]
        assert all(k in (0, 1) for k, _ in chunks[1:])
        assert all(len(piece) <= 65536 for piece in data)
        assert [int.from_bytes(b[:4], "little") for _, b in chunks[1:]] == \
            [masked_crc32c(piece) for piece in data]
        assert b"".join(data) == ours
    else:
        assert ours == stream


def reencode(kind, frames):
    """Our encoding of the messages Go sent (framing headers removed)."""
    out = []
    for rid, head, body in frames:
        headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        if kind == "request":
            out.append(encode_request(rid, head.method, head.target, headers, body))
        else:
            out.append(encode_response(rid, head.status, head.reason, headers, body))
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("direction, kind", [("c2s", "request"), ("s2c", "response")])
def test_our_encoding_reads_back_the_same(case, direction, kind):
    codec, stream = split_handshake(case, direction)
    go_frames = frames_of(kind, decompress(codec, stream, 4096))
    messages = reencode(kind, go_frames)
    for c in Compress:
        comp = codecs.compressor(c)
        wire = b"".join(comp.compress(m) + comp.flush() for m in messages)
        ours = frames_of(kind, decompress(c, wire, 4096))
        (check_requests if kind == "request" else check_responses)(case, ours)
    if codec == Compress.NONE and kind == "request":
        # Go's c2s plaintext equals ours byte for byte once its Content-Length
        # moves to where we write it (fasthttp writes it before other headers).
        assert len(b"".join(messages)) == len(decompress(codec, stream, 1 << 20))
