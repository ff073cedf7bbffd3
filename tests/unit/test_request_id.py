"""Request ids (-requestIDHeader): taken when valid, else generated, cheaply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from httptp.io.pipeline import Proxy


def ids(header="X-Request-Id") -> Proxy:
    proxy = Proxy.__new__(Proxy)        # only the request-id part: no upstreams needed
    proxy._init_request_ids(SimpleNamespace(request_id_header=header))
    return proxy


FORWARDED = [(b"Host", b"x"), (b"Accept", b"*/*")]


def test_generated_ids_are_unique_and_sent_upstream():
    proxy = ids()
    seen = set()
    for _ in range(1000):
        rid, headers = proxy._request_id([(b"Host", b"x")], FORWARDED)
        assert headers[:2] == FORWARDED and headers[2] == (b"X-Request-Id", rid.encode())
        seen.add(rid)
    assert len(seen) == 1000
    prefix = rid.rsplit("-", 1)[0]
    assert len(prefix) == 12 and ids()._request_id([], [])[0].rsplit("-", 1)[0] != prefix


@pytest.mark.parametrize("value", [b"abc", b"3f9a-77:x/y+z=@.", b"a" * 128,
                                   b"0c1e2f7a-5b6d-4c3e-9f80-112233445566"])
def test_a_valid_incoming_id_is_kept(value):
    incoming = [(b"Host", b"x"), (b"x-request-id", value)]
    rid, headers = ids()._request_id(incoming, FORWARDED + [(b"x-request-id", value)])
    assert rid == value.decode()
    assert headers == FORWARDED + [(b"x-request-id", value)]    # once, as it came


@pytest.mark.parametrize("value", [b"", b"a" * 129, b"has space", b"semi;colon", b"\xff",
                                   b'quote"'])
def test_an_invalid_incoming_id_is_replaced(value):
    incoming = [(b"Host", b"x"), (b"X-Request-ID", value)]
    rid, headers = ids()._request_id(incoming, FORWARDED + [(b"X-Request-ID", value)])
    assert rid.encode() != value
    assert headers == FORWARDED + [(b"X-Request-Id", rid.encode())]


def test_another_header_name():
    rid, headers = ids("Trace-Id")._request_id([(b"trace-id", b"t1")], [(b"trace-id", b"t1")])
    assert rid == "t1" and headers == [(b"trace-id", b"t1")]


def test_empty_name_turns_it_off():
    assert ids("").request_id_header is None
