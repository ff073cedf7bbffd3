"""Compression levels: each codec's range, level changes at a flush boundary
(a stream of zstd frames, a fresh flate deflater primed with the history),
and ``auto`` driven by a fake clock and a fake CPU meter (no timing)."""

from __future__ import annotations

import random
import zlib

import pytest

from httptp.teleport import CodecError, codecs
from httptp.teleport.autolevel import AutoLevel
from httptp.teleport.codecs import REGISTRY, check_level, compressor, decompressor
from httptp.teleport.connection import ClientConnection, ServerConnection
from httptp.teleport.handshake import Compress
from tests.helpers import decompress_all
from tests.unit.test_teleport_codecs import message, run

LEVELLED = [c for c in REGISTRY if c.levels]


def rtb(i: int, rng: random.Random) -> bytes:
    """An OpenRTB-like request body: ids and prices that do not repeat."""
    return (b'{"id":"%016x","imp":[{"id":"1","banner":{"w":300,"h":250},"bidfloor":%.4f}],'
            b'"site":{"domain":"news%d.example","page":"https://news%d.example/a/%08x"},'
            b'"device":{"ua":"Mozilla/5.0 (X11; Linux x86_64)","ip":"10.%d.%d.%d"},'
            b'"user":{"id":"%032x"},"tmax":120}'
            % (rng.getrandbits(64), rng.random(), i % 50, i % 50, rng.getrandbits(32),
               rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.getrandbits(128)))


# --- ranges -----------------------------------------------------------------

@pytest.mark.parametrize("entry", LEVELLED, ids=lambda c: c.name)
@pytest.mark.parametrize("end", [0, 1])
def test_every_codec_round_trips_at_its_lowest_and_highest_level(entry, end):
    level = entry.levels[end]
    batches = [[message(i) for i in range(j, j + 8)] for j in range(0, 40, 8)]
    for step in (None, 7):
        run(Compress(entry.byte), batches, step, level=level)
    assert compressor(entry.byte, level).level == level


@pytest.mark.parametrize("name, level, match", [
    ("none", 1, "none has no compression levels"),
    ("snappy", "auto", "snappy has no compression levels"),
    ("flate", 0, "flate levels are 1 to 9, not 0"),
    ("flate", 10, "flate levels are 1 to 9"),
    ("zstd", 20, "zstd levels are 1 to 19"),
    ("zstd", -1, "zstd levels are 1 to 19"),
    ("brotli", 12, "brotli levels are 0 to 11"),
])
def test_levels_outside_the_codecs_range_are_refused(name, level, match):
    with pytest.raises(ValueError, match=match):
        check_level(codecs.BY_NAME[name], level)


def test_levels_inside_the_range_and_auto_are_taken():
    assert check_level(Compress.FLATE, 9) == 9
    assert check_level(Compress.BROTLI, 0) == 0
    assert check_level(Compress.ZSTD, "auto") == "auto"
    assert check_level(Compress.SNAPPY, None) is None


def test_default_levels_are_todays():
    assert [compressor(c.byte).level for c in LEVELLED] == [6, 6, 5]


# --- a level change at a flush boundary ---------------------------------------

def _switching_stream(c, levels, per_batch=6, seed=1):
    """Batches of RTB-like messages, the level changing after each batch as
    ``levels`` says; returns (plain, stream, flushes)."""
    rng = random.Random(seed)
    comp = compressor(c, levels[0], history=True)
    plain, flushes = [], []
    for n, level in enumerate(levels[1:] + levels[-1:]):
        batch = b"".join(rtb(n * per_batch + i, rng) for i in range(per_batch))
        plain.append(batch)
        flushes.append(comp.compress(batch) + comp.flush() + comp.set_level(level))
        assert comp.level == level
    return b"".join(plain), b"".join(flushes), flushes


@pytest.mark.parametrize("step", [None, 1, 5, 4096])
def test_zstd_reads_a_stream_of_frames(step):
    levels = [6, 7, 7, 3, 12, 1, 19, 6]
    plain, stream, flushes = _switching_stream(Compress.ZSTD, levels)
    assert stream.count(b"\x28\xb5\x2f\xfd") >= 6          # one frame per level
    dec = decompressor(Compress.ZSTD)
    feeds = flushes if step is None else [stream[i:i + step] for i in range(0, len(stream), step)]
    assert b"".join(decompress_all(dec, f) for f in feeds) == plain


def test_zstd_frames_with_checksums_and_sizes_from_another_writer():
    import zstandard
    parts = [message(i) * 3 for i in range(5)]
    stream = b"".join(zstandard.ZstdCompressor(level=lvl, write_checksum=True).compress(p)
                      for lvl, p in zip((1, 5, 9, 15, 19), parts))
    assert decompress_all(decompressor(Compress.ZSTD), stream) == b"".join(parts)


def test_zstd_frame_end_then_garbage_is_a_codec_error():
    comp = compressor(Compress.ZSTD)
    stream = comp.compress(b"x" * 100) + comp.flush() + comp.set_level(3)
    with pytest.raises(CodecError, match="zstd frame"):
        decompress_all(decompressor(Compress.ZSTD), stream + b"garbage!")


@pytest.mark.parametrize("step", [None, 3])
def test_flate_level_change_is_one_deflate_stream_any_inflater_reads(step):
    levels = [6, 1, 9, 9, 4, 1, 6]
    plain, stream, flushes = _switching_stream(Compress.FLATE, levels)
    assert all(f.endswith(b"\x00\x00\xff\xff") for f in flushes)
    d = zlib.decompressobj(-15)                 # as Go's flate reader: one stream
    assert d.decompress(stream) == plain and not d.eof
    dec = decompressor(Compress.FLATE)
    feeds = flushes if step is None else [stream[i:i + step] for i in range(0, len(stream), step)]
    assert b"".join(decompress_all(dec, f) for f in feeds) == plain


def test_flate_keeps_its_history_across_a_level_change():
    comp = compressor(Compress.FLATE, 6, history=True)
    first = comp.compress(message(1)) + comp.flush()
    comp.set_level(1)
    again = comp.compress(message(1)) + comp.flush()
    assert len(again) < len(first) // 3         # the same message: a back-reference
    d = zlib.decompressobj(-15)
    assert d.decompress(first + again) == message(1) * 2


def test_brotli_cannot_change_its_level_in_a_stream():
    with pytest.raises(NotImplementedError):
        compressor(Compress.BROTLI).set_level(9)


@pytest.mark.parametrize("level", [1, 9])
def test_go_style_flate_streams_at_levels_1_and_9_are_read(level):
    """Go's compress/flate Writer at ``level`` with a Flush per batch: raw
    DEFLATE, a sync flush (00 00 ff ff) per batch, never a final block.  No
    Go toolchain here: zlib writes the same format (the real Go capture at
    the default level is in test_teleport_vectors.py)."""
    rng = random.Random(level)
    z = zlib.compressobj(level, zlib.DEFLATED, -15)
    batches = [b"".join(rtb(i * 4 + j, rng) for j in range(4)) for i in range(30)]
    stream = b"".join(z.compress(b) + z.flush(zlib.Z_SYNC_FLUSH) for b in batches)
    dec = decompressor(Compress.FLATE)
    got = b"".join(decompress_all(dec, stream[i:i + 1000]) for i in range(0, len(stream), 1000))
    assert got == b"".join(batches)


# --- auto: fake clock, fake CPU meter --------------------------------------------

class Meter:
    """A fake monotonic clock and a fake process CPU clock."""

    def __init__(self):
        self.now = 100.0
        self.used = 5.0

    def clock(self):
        return self.now

    def cpu(self):
        return self.used

    def second(self, load: float):
        """Advance one second with the worker at ``load`` of a core."""
        self.now += 1.0
        self.used += load


def drive(auto: AutoLevel, meter: Meter, seconds: int, *, load: float, compress: float,
          behind: bool = False, batches: int = 10) -> list[int]:
    """``seconds`` intervals of ``batches`` batches each (compress seconds
    per batch); the level after each interval."""
    levels = []
    for _ in range(seconds):
        for i in range(batches):
            if i == batches - 1:
                meter.second(load)
            auto.batch(compress, behind)
        levels.append(auto.level)
    return levels


def test_auto_moves_up_on_an_idle_link_one_step_a_second():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    # 10% of a core, compressing a tenth of that
    assert drive(auto, m, 8, load=0.10, compress=0.001) == [7, 8, 9, 10, 11, 12, 12, 12]


def test_auto_moves_down_on_a_saturated_worker():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    assert drive(auto, m, 5, load=0.97, compress=0.001) == [5, 4, 3, 3, 3]


def test_auto_moves_down_when_the_writer_falls_behind():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    assert drive(auto, m, 2, load=0.2, compress=0.001, behind=True) == [5, 4]


def test_auto_moves_down_when_compressing_is_over_the_target_share():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    # 40% of a core, 60% of it compressing
    assert drive(auto, m, 2, load=0.4, compress=0.024) == [5, 4]


def test_auto_holds_between_the_margin_and_the_target():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    # 40% of a core, 45% of it compressing: under the target, over the margin
    assert drive(auto, m, 3, load=0.4, compress=0.018) == [6, 6, 6]
    assert auto.changes == 0 and "45%" in auto.reason


def test_auto_waits_a_whole_interval():
    m = Meter()
    auto = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    for _ in range(100):                     # many batches, no time passing
        assert auto.batch(0.0001, False) == 6
    m.now += 0.5
    assert auto.batch(0.0001, False) == 6
    m.now += 0.6
    assert auto.batch(0.0001, False) == 7


def test_auto_starts_within_its_bounds():
    m = Meter()
    assert AutoLevel(3, 12, 1, clock=m.clock, cpu=m.cpu).level == 3
    with pytest.raises(ValueError):
        AutoLevel(5, 4, 4, clock=m.clock, cpu=m.cpu)


# --- auto on a connection: the stream stays byte-exact ----------------------------

def _pair(codec, meter, level="auto"):
    client = ClientConnection(codec, level=level, clock=meter.clock, cpu=meter.cpu)
    server = ServerConnection(codec)
    server.receive_handshake(client.handshake())
    client.receive_handshake(server.handshake())
    return client, server


@pytest.mark.parametrize("codec", [Compress.FLATE, Compress.ZSTD])
def test_auto_level_changes_under_traffic_keep_the_stream_byte_exact(codec):
    m = Meter()
    client, server = _pair(codec, m)
    rng = random.Random(7)
    sent, got, levels = [], [], []
    for second, load in enumerate([0.1] * 6 + [0.98] * 9 + [0.1] * 3):
        for i in range(5):
            body = rtb(second * 5 + i, rng)
            _, frame = client.send_request(b"POST", b"/bid", [(b"Host", b"dsp")], body)
            sent.append(body)
            client.write(frame)
            if i == 4:
                m.second(load)
            got += [b for _, _, b in server.receive_data(client.flush())]
        levels.append(client.compress_level)
    assert got == sent
    low, high = codecs.codec(codec).auto_levels
    assert max(levels) > codecs.codec(codec).default_level > min(levels)
    assert client.auto.changes >= 10 and low <= min(levels) and max(levels) <= high


@pytest.mark.parametrize("codec", [Compress.BROTLI, Compress.SNAPPY, Compress.NONE])
def test_auto_on_a_codec_that_cannot_change_level(codec):
    m = Meter()
    if codec != Compress.BROTLI:
        with pytest.raises(ValueError, match="no compression levels"):
            ClientConnection(codec, level="auto", clock=m.clock, cpu=m.cpu)
        return
    client, server = _pair(codec, m)
    for n in range(5):
        _, frame = client.send_request(b"GET", b"/%d" % n, [(b"Host", b"a")])
        client.write(frame)
        m.second(0.05)
        assert [f[0] for f in server.receive_data(client.flush())] == [n + 1]
    assert client.auto is None and client.compress_level == 5


def test_server_in_auto_codec_takes_auto_level_but_not_a_number():
    m = Meter()
    with pytest.raises(ValueError, match="fixed codec"):
        ServerConnection(None, level=9)
    server = ServerConnection(None, level="auto", clock=m.clock, cpu=m.cpu)
    client = ClientConnection(Compress.ZSTD)
    server.receive_handshake(client.handshake())
    server.write(server.send_response(1, 200, b"", [], b"ok"))
    assert server.flush() and server.auto is not None and server.compress_level == 6


def test_auto_needs_a_clock_and_a_meter():
    with pytest.raises(ValueError, match="clock"):
        ClientConnection(Compress.ZSTD, level="auto")


def test_a_fixed_level_on_a_connection():
    client = ClientConnection(Compress.ZSTD, level=19)
    assert client.compress_level == 19
    server = ServerConnection(Compress.FLATE, level=1)
    assert server.compress_level == 1


# --- the flags ------------------------------------------------------------------

def _config(*argv, env=None):
    from httptp.config import load_config
    return load_config(["-outType=teleport", *argv], env or {})


def _config_error(*argv, env=None) -> str:
    from httptp.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        _config(*argv, env=env)
    return str(info.value)


def test_level_flags_default_to_the_codecs_default():
    cfg = _config()
    assert cfg.in_compress_level is None and cfg.out_compress_level is None


def test_level_flags_from_the_command_line_env_and_file(tmp_path):
    cfg = _config("-outCompress=zstd", "-outCompressLevel=19", "-inCompressLevel=1")
    assert cfg.out_compress_level == 19 and cfg.in_compress_level == 1
    cfg = _config("-inCompress=brotli", env={"HTTPTP_IN_COMPRESS_LEVEL": "11",
                                              "HTTPTP_OUT_COMPRESS_LEVEL": "auto"})
    assert cfg.in_compress_level == 11 and cfg.out_compress_level == "auto"
    conf = tmp_path / "httptp.conf"
    conf.write_text("outCompress = zstd\noutCompressLevel = auto\ninCompressLevel = 9\n")
    cfg = _config(f"-config={conf}")
    assert cfg.out_compress_level == "auto" and cfg.in_compress_level == 9


@pytest.mark.parametrize("argv, expected", [
    (["-outCompress=snappy", "-outCompressLevel=3"],
     "-outCompressLevel: snappy has no compression levels (leave the level unset) "
     "(-outCompress=snappy)"),
    (["-outCompress=none", "-outCompressLevel=auto"], "-outCompressLevel: none has no"),
    (["-outCompressLevel=10"], "-outCompressLevel: flate levels are 1 to 9, not 10 "
                               "(-outCompress=flate)"),
    (["-inCompress=zstd", "-inCompressLevel=0"], "-inCompressLevel: zstd levels are 1 to 19"),
    (["-inCompress=auto", "-inCompressLevel=5"], "-inCompressLevel: a number needs a fixed "
                                                 "-inCompress"),
    (["-inCompressLevel=fast"], "-inCompressLevel: invalid level 'fast'"),
])
def test_level_flag_errors_name_the_flag(argv, expected):
    assert _config_error(*argv).startswith(expected)


def test_in_compress_auto_takes_level_auto():
    assert _config("-inCompress=auto", "-inCompressLevel=auto").in_compress_level == "auto"


def test_auto_counts_every_compressor_of_the_worker_when_they_share_a_meter():
    """Two links at 30% of the worker's CPU each: alone each would hold, but
    the worker's compressors take 60%, over the target: both step down."""
    from httptp.teleport.autolevel import Spent
    m = Meter()
    spent = Spent()
    links = [AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu, spent=spent) for _ in range(2)]
    alone = AutoLevel(3, 12, 6, clock=m.clock, cpu=m.cpu)
    for _ in range(2):
        for i in range(10):
            if i == 9:
                m.second(0.4)
            for auto in (*links, alone):
                auto.batch(0.012, False)        # 10 x 12 ms = 30% of 0.4 s, per link
    assert [a.level for a in links] == [4, 4] and alone.level == 8
