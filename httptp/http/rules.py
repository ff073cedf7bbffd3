"""HTTP/1 rules, each written once: which messages have a body, how
Content-Length and Transfer-Encoding frame one, and the grammar pieces the
readers share.

Theory of operation
-------------------
httptp reads HTTP/1.1 messages in three places: the two parser back-ends
(``httptools_backend``, ``h11_backend``, through ``parser.check_request`` and
``parser.check_response``) and the teleport frame reader
(``httptp.teleport.framing``).  They read with two strictnesses:

strict (``strict=True``, the HTTP parsers)
    RFC 9112 §6 as a proxy must read a message from a peer it does not
    trust: one Content-Length field of 1*DIGIT (a repeat, even an equal one,
    is refused), Transfer-Encoding exactly ``chunked`` and only once.

lenient (``strict=False``, the teleport reader)
    As the Go original's fasthttp reads teleport frames: equal repeated
    Content-Length fields are one, ``Transfer-Encoding: identity`` means
    nothing, and a GET or HEAD request never has a body
    (`request_may_have_body`), whatever its headers say.

Both refuse what a plain HTTP parser on the other leg of the proxy could read
two ways: a message with both Content-Length and chunked (`check_framing`).
A rule that is broken raises `FramingViolation`, a ValueError; each reader
turns it into its own error (``ProtocolError``, 400; ``FramingError``), with
the same text.

The functions take one field value at a time, so that ``parser.scan_headers``
keeps its single pass over the headers (it also looks at Host, Connection
and Expect); `message_framing` is the whole pass for a reader that needs only
the framing.

Nothing here imports socket, gevent or time (STYLE.md §7.2).
"""

from __future__ import annotations

OWS = b" \t"
"""Optional whitespace around a field value (RFC 9110 §5.6.3)."""

MAX_CONTENT_LENGTH_DIGITS = 18
"""A longer Content-Length could pass 2**63: llhttp refuses it itself, and
every other reader must too, so that all of them frame alike."""

# The RFC 9110/9112 grammar the readers build their regexes from (h11's _abnf).
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
"""A method or field name (RFC 9110 §5.6.2)."""
VCHAR_OBS = rb"[\x21-\x7e\x80-\xff]"
"""A visible character or obs-text: one character of a request-target."""
FIELD_CHAR = rb"[\t\x20-\x7e\x80-\xff]"
"""HTAB, SP, VCHAR or obs-text: one character of a field value or a
reason-phrase (RFC 9112 §4)."""

LENIENT_BODYLESS_METHODS = frozenset((b"GET", b"HEAD"))
"""Methods whose requests a Go teleport peer never reads a body for
(PROTOCOL.md §1.4)."""

_CL_NAME, _TE_NAME, _EXPECT_NAME = b"content-length", b"transfer-encoding", b"expect"
_CL_LEN, _TE_LEN, _EXPECT_LEN = len(_CL_NAME), len(_TE_NAME), len(_EXPECT_NAME)


class FramingViolation(ValueError):
    """A message whose framing a rule here refuses; its text says which rule."""


def is_interim(status: int) -> bool:
    """True for a 1xx answer: an interim response, another head follows."""
    return status < 200


def status_has_body(status: int, method: bytes | None = None) -> bool:
    """Whether a response with ``status`` to a request with ``method`` has a
    body (RFC 9112 §6.3): never for 1xx, 204 or 304, nor for any answer to
    HEAD.  ``method=None``: the status alone decides (what a writer asks
    before it writes a Content-Length)."""
    return not (status < 200 or status == 204 or status == 304 or method == b"HEAD")


def request_may_have_body(method: bytes, strict: bool = True) -> bool:
    """Whether a request with ``method`` may carry a body: always when
    ``strict`` (its framing headers decide); when lenient, never for GET or
    HEAD (module docstring)."""
    return strict or method not in LENIENT_BODYLESS_METHODS


def content_length(value: bytes, seen: int | None, strict: bool = True) -> int:
    """The body length a Content-Length field value gives.

    ``seen`` is what an earlier Content-Length field of the same message gave
    (None: this is the first).  Strict: a second field is refused, even an
    equal one.  Lenient: an equal one is the same field, a different one is
    refused.  Either way the value is 1 to ``MAX_CONTENT_LENGTH_DIGITS``
    ASCII digits between optional whitespace.  Raises FramingViolation.
    """
    if strict and seen is not None:
        raise FramingViolation("duplicate Content-Length")
    digits = value.strip(OWS)
    if not digits.isdigit() or len(digits) > MAX_CONTENT_LENGTH_DIGITS:
        raise FramingViolation("invalid Content-Length" if strict
                               else f"invalid Content-Length {value[:20]!r}")
    n = int(digits)
    if seen is not None and seen != n:
        raise FramingViolation("conflicting Content-Length headers")
    return n


def transfer_encoding(value: bytes, chunked: bool, strict: bool = True) -> bool:
    """Whether the message is chunked once this Transfer-Encoding field value
    is read; ``chunked``: whether an earlier field made it so.

    Only ``chunked``, once, is a coding we read (case-insensitive, optional
    whitespace around it); lenient reading also skips ``identity``.  Raises
    FramingViolation for anything else.
    """
    coding = value.strip(OWS).lower()
    if coding != b"chunked" or chunked:
        if not strict and coding == b"identity":
            return chunked
        raise FramingViolation("unsupported Transfer-Encoding" if strict
                               else f"unsupported Transfer-Encoding {value[:40]!r}")
    return True


def check_framing(content_length: int | None, chunked: bool) -> None:
    """Refuse a message framed both ways (RFC 9112 §6.3 lets chunked win, but
    a peer that reads the Content-Length would see another message)."""
    if chunked and content_length is not None:
        raise FramingViolation("both Content-Length and Transfer-Encoding")


def expects_continue(value: bytes) -> bool:
    """Whether an Expect field value asks for ``100 Continue``."""
    return value.strip(OWS).lower() == b"100-continue"


def message_framing(headers: list, strict: bool = True) -> tuple[int | None, bool, bool]:
    """``(content_length, chunked, expect_continue)`` from a head's
    ``(name, value)`` pairs, by the rules above; raises FramingViolation."""
    length = None
    chunked = expect = False
    for name, value in headers:
        size = len(name)        # most names have none of these lengths: no lower()
        if size == _CL_LEN:
            if name.lower() == _CL_NAME:
                length = content_length(value, length, strict)
        elif size == _TE_LEN:
            if name.lower() == _TE_NAME:
                chunked = transfer_encoding(value, chunked, strict)
        elif size == _EXPECT_LEN:
            if name.lower() == _EXPECT_NAME and expects_continue(value):
                expect = True
    check_framing(length, chunked)
    return length, chunked, expect
