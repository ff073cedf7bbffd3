"""What the teleport library hands its users (``httptp.io.teleport_messages``):
httpx-like request arguments, headers looked up by name, responses."""

import pytest

from httptp.io.teleport_messages import (Headers, HTTPStatusError, Response, answer_parts,
                                         build_request, outgoing)


def test_build_request_paths_urls_params_and_bodies():
    assert build_request("GET", "/a?x=1", params={"y": "2 3"}) == (
        "GET", "/a?x=1&y=2+3", [], b"", None)
    method, path, hdrs, body, host = build_request(
        "POST", "https://user@svc.example:8443/p?q", params=[("a", 1), ("a", 2)],
        headers={"X-A": "b", "Content-Length": "9"}, json={"k": "é"})
    assert (path, host) == ("/p?q&a=1&a=2", "svc.example:8443")
    assert hdrs == [(b"X-A", b"b"), (b"Content-Type", b"application/json")]
    assert body == '{"k":"é"}'.encode()
    assert build_request("PUT", "http://h", content="text")[1:] == ("/", [], b"text", "h")
    _, _, hdrs, _, _ = build_request("POST", "/", headers={"content-type": "x/y"}, json=[1])
    assert hdrs == [(b"content-type", b"x/y")]
    with pytest.raises(ValueError, match="not both"):
        build_request("POST", "/", json=1, content=b"x")
    with pytest.raises(ValueError, match="scheme"):
        build_request("GET", "ftp://h/x")


def test_outgoing_host_rules():
    assert outgoing("get", "/", None, "", None, b"d:1") == (b"GET", b"/", [(b"Host", b"d:1")],
                                                           b"")
    assert outgoing("GET", "/", {"Host": "mine"}, b"", None, b"d")[2] == [(b"Host", b"mine")]
    assert outgoing("GET", "/", {"Host": "mine"}, b"", "forced", b"d")[2] == [
        (b"Host", b"forced")]


def test_headers_are_pairs_and_a_mapping():
    h = Headers([("Content-Type", "a/b"), ("Set-Cookie", "1"), ("set-cookie", "2")])
    assert list(h) == [("Content-Type", "a/b"), ("Set-Cookie", "1"), ("set-cookie", "2")]
    assert h == [("Content-Type", "a/b"), ("Set-Cookie", "1"), ("set-cookie", "2")]
    assert h["content-type"] == "a/b" and h[0] == ("Content-Type", "a/b")
    assert h["SET-COOKIE"] == "1, 2" and h.get_list("set-cookie") == ["1", "2"]
    assert "Set-Cookie" in h and "x" not in h and ("Set-Cookie", "1") in h
    assert h.get("x") is None and h.get("x", "d") == "d"
    assert h.keys() == ["content-type", "set-cookie"]
    with pytest.raises(KeyError):
        h["x"]


def test_response_names_old_and_httpx():
    r = Response(418, "I'm a teapot", [("Content-Type", "text/plain; charset=latin-1")],
                 "caf\xe9".encode("latin-1"))
    assert (r.status, r.status_code, r.reason_phrase, r.body, r.content) == (
        418, 418, "I'm a teapot", b"caf\xe9", b"caf\xe9")
    assert r.text == "café" and r.header("content-type").startswith("text/plain")
    assert not r.is_success
    with pytest.raises(HTTPStatusError, match="Client error '418 I'm a teapot'") as e:
        r.raise_for_status()
    assert e.value.response is r
    ok = Response(200, "OK", None, b'{"a": 1}')
    assert ok.raise_for_status() is ok and ok.json() == {"a": 1} and ok.headers == []


def test_answer_parts_takes_tuples_and_response_like_objects():
    assert answer_parts((201, {"A": "b", "Connection": "x"}, "hi")) == (
        201, b"Created", [(b"A", b"b")], b"hi")
    assert answer_parts(Response(299, "", [], b"")) == (299, b"Unknown", [], b"")

    class Starlettish:
        status_code, headers, content = 202, [(b"x", b"y")], b"c"
    assert answer_parts(Starlettish()) == (202, b"Accepted", [(b"x", b"y")], b"c")
