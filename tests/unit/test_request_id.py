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
        headers = list(FORWARDED)
        rid = proxy._request_id([(b"Host", b"x")], headers)
        assert headers == FORWARDED + [(b"X-Request-Id", rid)]
        seen.add(rid)
    assert len(seen) == 1000
    prefix = rid.rsplit(b"-", 1)[0]
    assert len(prefix) == 12 and ids()._request_id([], []).rsplit(b"-", 1)[0] != prefix


@pytest.mark.parametrize("value", [b"abc", b"3f9a-77:x/y+z=@.", b"a" * 128,
                                   b"0c1e2f7a-5b6d-4c3e-9f80-112233445566"])
def test_a_valid_incoming_id_is_kept(value):
    incoming = [(b"Host", b"x"), (b"x-request-id", value)]
    headers = FORWARDED + [(b"x-request-id", value)]
    assert ids()._request_id(incoming, headers) == value
    assert headers == FORWARDED + [(b"x-request-id", value)]    # once, as it came


@pytest.mark.parametrize("value", [b"", b"a" * 129, b"has space", b"semi;colon", b"\xff",
                                   b'quote"'])
def test_an_invalid_incoming_id_is_replaced(value):
    incoming = [(b"Host", b"x"), (b"X-Request-ID", value)]
    headers = FORWARDED + [(b"X-Request-ID", value)]
    rid = ids()._request_id(incoming, headers)
    assert rid != value
    assert headers == FORWARDED + [(b"X-Request-Id", rid)]


def test_another_header_name():
    headers = [(b"trace-id", b"t1")]
    assert ids("Trace-Id")._request_id([(b"trace-id", b"t1")], headers) == b"t1"
    assert headers == [(b"trace-id", b"t1")]


def test_empty_name_turns_it_off():
    assert ids("").request_id_header is None


def test_the_setting():
    from httptp.config import ConfigError, load_config
    assert load_config([], {}).request_id_header == "X-Request-Id"
    assert load_config(["-requestIDHeader="], {}).request_id_header == ""
    assert load_config([], {"HTTPTP_REQUEST_ID_HEADER": "Trace-Id"}).request_id_header == "Trace-Id"
    with pytest.raises(ConfigError):
        load_config(["-requestIDHeader=bad name"], {})
