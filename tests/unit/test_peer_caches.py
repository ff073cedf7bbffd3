"""The hot path's caches keyed by what peers send (field names, Host values,
reason phrases, teleport header blocks) stay small whatever the peers send:
long keys are checked every time and never kept (a peer cannot move the bound)."""

from __future__ import annotations

from httptp.http import host, parser, policy, writer
from httptp.http.parser import select_backend
from httptp.teleport import framing
from httptp.teleport.framing import FrameReader, encode_request


def _kept_bytes(cache) -> int:
    return sum(len(k) for k in cache)


def test_long_field_names_are_never_cached():
    for backend in ("httptools", "h11"):
        p = select_backend(backend).RequestParser(1 << 20, 1 << 20)
        for i in range(50):
            name = b"X-" + b"n" * 1000 + b"%d" % i
            raw = b"GET / HTTP/1.1\r\nHost: a\r\n%s: v\r\n\r\n" % name
            [head, _] = p.feed(raw)
            policy.forward_request_headers(head.headers, None, None)
            policy.forward_request_headers(head.headers, b"X-Forwarded-For", b"1.2.3.4",
                                           b"http")
            policy.forward_response_headers(head.headers)
    for cache in (parser._KINDS, policy._request_keeps, policy._response_keeps,
                  *(rule.keeps for rule in policy._added.values())):
        assert all(len(k) <= 64 for k in cache)


def test_long_host_values_and_reasons_are_never_cached():
    for i in range(50):
        assert host.valid_host(b"h" * 300 + b"%d.example" % i)
        writer.status_line(200, b"R" * 500 + b"%d" % i)
    assert all(len(v) <= 262 for v in host._seen)
    assert all(len(reason) <= 64 for _, reason in writer._status_lines)


def test_long_teleport_header_blocks_are_never_cached():
    reader = FrameReader("request", 1 << 20)
    long_value = b"v" * 5000
    data = b"".join(encode_request(i + 1, method, b"/", [(b"Host", b"h"), (b"X-%d" % i, long_value)],
                                   b"x" if method == b"POST" else b"")
                    for i in range(20) for method in (b"GET", b"POST"))
    frames = reader.feed(data)
    assert len(frames) == 40
    assert _kept_bytes(reader._heads) + _kept_bytes(reader._no_body_heads) \
        <= framing.HEAD_CACHE_SIZE * framing.HEAD_CACHE_BLOCK
    assert not any(len(k) > framing.HEAD_CACHE_BLOCK
                   for k in (*reader._heads, *reader._no_body_heads))
