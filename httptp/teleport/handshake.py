"""The 15-byte plaintext teleport header (PROTOCOL.md §1.2).

Layout: ``b"httpteleport"`` (12 bytes), version ``0x00``, the codec the
*sender* writes its outgoing stream with, TLS flag (``0x01`` asked/accepted;
a reader treats any non-zero byte as true).  Compression is not negotiated:
each side announces its own codec and the peer must be able to read it.

Codec byte values: 0 flate, 1 none, 2 snappy are the Go original's (note the
order: flate is 0, the Go zero value, hence its default).  3 zstd and 4 brotli
are ours (PROTOCOL.md §8): only a peer that is also httptp understands them;
a Go peer drops the connection after the handshake when it sees them.  They
are declared once, in ``codecs.REGISTRY``; `Compress` and `BY_NAME` come
from there and are re-exported here, where their users import them.
"""

from __future__ import annotations

from httptp.teleport import HandshakeError
from httptp.teleport.codecs import BY_NAME, Compress

__all__ = ["MAGIC", "VERSION", "HEADER_SIZE", "Compress", "BY_NAME", "encode", "decode"]

MAGIC = b"httpteleport"
VERSION = 0
HEADER_SIZE = 15


def encode(compress: int, tls: bool) -> bytes:
    """Return the 15-byte header announcing our codec and TLS wish."""
    return MAGIC + bytes((VERSION, Compress(compress), 1 if tls else 0))


def decode(data: bytes) -> tuple[Compress, bool]:
    """Parse a peer's 15-byte header into (its codec, TLS flag).

    Raises HandshakeError on bad magic, a version other than 0 or an unknown
    codec byte (the Go peer closes the connection in all three cases).
    """
    if len(data) != HEADER_SIZE:
        raise HandshakeError(f"handshake needs {HEADER_SIZE} bytes, got {len(data)}")
    if data[:12] != MAGIC:
        raise HandshakeError("bad handshake magic: not a teleport peer")
    if data[12] != VERSION:
        raise HandshakeError(f"unsupported teleport protocol version {data[12]}")
    try:
        codec = Compress(data[13])
    except ValueError:
        raise HandshakeError(f"unknown compression type {data[13]}") from None
    return codec, data[14] != 0
