"""One codec registry: the handshake byte, the settings' choices and the
(de)compressor factories all come from ``codecs.REGISTRY``."""

from __future__ import annotations

import pytest

from httptp import settings
from httptp.teleport import codecs, handshake
from httptp.teleport.codecs import REGISTRY, Compress


def test_names_and_bytes_are_unique():
    assert len({c.name for c in REGISTRY}) == len({c.byte for c in REGISTRY}) == len(REGISTRY)


def test_compress_is_the_registry_by_byte():
    assert [(c.name.lower(), int(c)) for c in Compress] == \
        sorted(((c.name, c.byte) for c in REGISTRY), key=lambda p: p[1])
    assert handshake.Compress is Compress and handshake.BY_NAME is codecs.BY_NAME
    assert list(handshake.BY_NAME) == ["flate", "none", "snappy", "zstd", "brotli"]


def test_go_codecs_are_the_originals():
    """The Go original speaks flate, none and snappy, with these bytes."""
    assert {c.name: c.byte for c in REGISTRY if c.go} == {"flate": 0, "none": 1, "snappy": 2}


def test_settings_choices_come_from_the_registry():
    assert settings.CODECS == codecs.NAMES == ("none", "flate", "snappy", "zstd", "brotli")
    help_in = settings.BY_NAME["inCompress"].help
    assert "auto, none, flate, snappy, zstd, brotli\n" in help_in
    assert "zstd and brotli work only between two httptp of ours." in help_in
    assert settings.BY_NAME["outCompress"].help.endswith(": none, flate, snappy, zstd, brotli")


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda c: c.name)
def test_factories_come_from_the_registry(entry):
    c = Compress(entry.byte)
    assert codecs.codec(c) is entry and codecs.codec(entry.byte) is entry
    comp, dec = codecs.compressor(c), codecs.decompressor(c)
    assert type(comp) is type(entry.compressor(None))
    assert type(dec) is type(entry.decompressor())
    dec.feed(comp.compress(b"hello") + comp.flush())
    out = b""
    while piece := dec.read():
        out += piece
    assert out == b"hello"


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError):
        codecs.compressor(9)
    with pytest.raises(ValueError):
        codecs.decompressor(9)
    with pytest.raises(ValueError):
        codecs.codec(-1)
