"""The 15-byte teleport header (PROTOCOL.md §1.2)."""

import pytest

from httptp.teleport import HandshakeError, TeleportError
from httptp.teleport import handshake
from httptp.teleport.handshake import BY_NAME, HEADER_SIZE, MAGIC, Compress, decode, encode


def test_worked_example_header():
    # PROTOCOL.md §1.8: "httpteleport" v0 none no-TLS
    assert encode(Compress.NONE, False) == bytes.fromhex("6874747074656c65706f7274000100")


def test_codec_byte_values_match_go_and_ours():
    assert [Compress.FLATE, Compress.NONE, Compress.SNAPPY] == [0, 1, 2]
    assert (Compress.ZSTD, Compress.BROTLI) == (3, 4)
    assert BY_NAME == {"flate": 0, "none": 1, "snappy": 2, "zstd": 3, "brotli": 4}


@pytest.mark.parametrize("codec", list(Compress))
@pytest.mark.parametrize("tls", [False, True])
def test_round_trip(codec, tls):
    data = encode(codec, tls)
    assert len(data) == HEADER_SIZE and data.startswith(MAGIC)
    assert data[14] == (1 if tls else 0)
    got = decode(data)
    assert got == (codec, tls) and type(got[0]) is Compress


def test_any_nonzero_tls_byte_is_true():
    assert decode(MAGIC + b"\x00\x02\xff") == (Compress.SNAPPY, True)


@pytest.mark.parametrize("data, words", [
    (b"httpteleporX\x00\x01\x00", "magic"),
    (b"GET / HTTP/1.1\r", "magic"),
    (MAGIC + b"\x01\x01\x00", "version"),
    (MAGIC + b"\x00\x05\x00", "compression"),
    (MAGIC + b"\x00\xff\x00", "compression"),
    (MAGIC + b"\x00\x01", "15 bytes"),
    (MAGIC + b"\x00\x01\x00\x00", "15 bytes"),
])
def test_bad_headers(data, words):
    with pytest.raises(HandshakeError, match=words) as info:
        decode(data)
    assert isinstance(info.value, TeleportError)


def test_encode_refuses_unknown_codec():
    with pytest.raises(ValueError):
        encode(9, False)


def test_package_does_not_import_gevent_eagerly():
    import subprocess
    import sys
    code = ("import sys, httptp.teleport, httptp.teleport.handshake, httptp.teleport.codecs, "
            "httptp.teleport.framing; "
            "bad = {'gevent', 'socket', 'time', 'httptp.teleport.api'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # socket/time may be pulled in by the interpreter itself; gevent and api must not be.
    assert "gevent" not in out.stdout and "api" not in out.stdout


def test_lazy_attribute_error():
    import httptp.teleport as tp
    with pytest.raises(AttributeError):
        tp.NoSuchThing  # noqa: B018
    assert handshake.VERSION == 0
