"""Helpers shared by the fuzz tests: feed splits, parser runs with their
memory observed, and event-list comparisons."""

from __future__ import annotations

import copy

from hypothesis import strategies as st

from httptp.errors import ProtocolError
from httptp.http import h11_backend, httptools_backend
from httptp.http.events import Data, RequestHead, ResponseHead

BACKENDS = {"httptools": httptools_backend, "h11": h11_backend}


@st.composite
def cuts(draw, raw: bytes, max_cuts: int = 4) -> list:
    """``raw`` cut into pieces at 0-``max_cuts`` random places (sometimes one
    byte at a time)."""
    if len(raw) < 2:
        return [raw]
    if draw(st.integers(0, 15)) == 0:
        return [raw[i:i + 1] for i in range(len(raw))]
    points = sorted(draw(st.sets(st.integers(1, len(raw) - 1), max_size=max_cuts)))
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]


def bytewise(raw: bytes) -> list:
    return [raw[i:i + 1] for i in range(len(raw))]


# -- what a parser holds ----------------------------------------------------------

def held(parser) -> int:
    """Bytes a parser keeps between feeds (its private buffers: the events it
    returned belong to the caller)."""
    if isinstance(parser, httptools_backend.RequestParser):
        # llhttp keeps nothing; the back-end keeps the target and the headers
        # of the current head (and counts the rest in _head_bytes)
        return max(len(parser._target) + _fields(parser._headers), parser._head_bytes)
    if isinstance(parser, httptools_backend.ResponseParser):
        return max(len(parser._buf), _fields(getattr(parser, "_headers", ())))
    conn = parser._conn
    return max(len(parser._raw), len(conn._receive_buffer) if conn is not None else 0)


def _fields(headers) -> int:
    """Bytes of the header fields a httptools parser holds: none once the
    head is complete (``_headers`` is then the trailer sink, which counts
    trailer fields and drops them)."""
    if not isinstance(headers, list):
        return 0
    return sum(len(k) + len(v) for k, v in headers)


def raising(events: list) -> list:
    """``events`` from a RequestParser's ``feed``; a ProtocolError as the last
    event (the whole requests before bad bytes come first) is raised here."""
    if events and isinstance(events[-1], ProtocolError):
        raise events[-1]
    return events


def run_parser(parser, pieces: list, *, start: bytes | None = None, eof: bool = True,
               bound: int | None = None):
    """Feed ``pieces`` then EOF; return ``(events, status)`` with status None
    when no ProtocolError was raised (anything else escapes: a bug).  With
    ``bound``, assert after each feed that the parser holds at most ``bound``
    plus one feed."""
    if start is not None:
        parser.start(start)
    events, biggest = [], 0
    try:
        for piece in pieces:
            events += raising(parser.feed(piece))
            biggest = max(biggest, len(piece))
            if bound is not None:
                assert held(parser) <= bound + biggest, (held(parser), bound, biggest)
        if eof:
            events += raising(parser.feed(b""))
    except ProtocolError as e:
        assert e.status in (400, 413, 431), e.status
        return events, e.status
    return events, None


def coalesce(events: list) -> list:
    """Join adjacent Data events (back-ends and feed boundaries cut bodies
    differently; the bytes are what matters)."""
    out = []
    for ev in events:
        if isinstance(ev, Data):
            if not ev.data:
                continue
            if out and isinstance(out[-1], Data):
                out[-1] = Data(out[-1].data + ev.data)
                continue
        out.append(ev)
    return out


def is_prefix(short: list, long: list) -> bool:
    """``short`` is how ``long`` starts, the last Data of ``short`` possibly
    cut (coalesced lists)."""
    if len(short) > len(long):
        return False
    for i, (a, b) in enumerate(zip(short, long)):
        if a == b:
            continue
        last = i == len(short) - 1
        if not (last and isinstance(a, Data) and isinstance(b, Data) and b.data.startswith(a.data)):
            return False
    return True


def same_outcome(reference, other) -> None:
    """``other`` (a split feed) parses like ``reference`` (byte by byte):
    the same events, or the same error status after a prefix of the events
    (a feed that raises loses the events it completed)."""
    ref_events, ref_status = reference
    events, status = other
    ref_events, events = without_known_drift(ref_events), without_known_drift(events)
    assert status == ref_status, (status, ref_status)
    if status is None:
        assert events == ref_events
    else:
        assert is_prefix(events, ref_events), (events, ref_events)


def without_known_drift(events: list) -> list:
    """``coalesce(events)`` with the Transfer-Encoding values lowercased: h11
    lowercases them, llhttp keeps them as sent (finding TE-CASE, pinned by a
    strict xfail in test_fuzz_http.py; drop this when it flips)."""
    out = []
    for ev in coalesce(events):
        if isinstance(ev, (RequestHead, ResponseHead)) and any(
                k.lower() == b"transfer-encoding" for k, _ in ev.headers):
            ev = copy.copy(ev)
            ev.headers = [(k, v.lower() if k.lower() == b"transfer-encoding" else v)
                          for k, v in ev.headers]
        out.append(ev)
    return out


def agree(a, b) -> None:
    """Two back-ends' ``(events, status)`` for the same feeds: the same
    status, and the same events, except that on an error one may have raised
    earlier than the other (llhttp refuses a bad byte at once, h11 may wait
    for the end of the message): then one event list starts the other."""
    (a_events, a_status), (b_events, b_status) = a, b
    a_events, b_events = without_known_drift(a_events), without_known_drift(b_events)
    assert a_status == b_status, (a_status, b_status)
    if a_status is None:
        assert a_events == b_events
    else:
        assert is_prefix(a_events, b_events) or is_prefix(b_events, a_events), (a_events, b_events)
