"""httptp.logs: the access log's fields, text (nginx's combined first) and JSON."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from httptp.logs import AccessLog

COMBINED = re.compile(r'^(\S+) - - \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"')


def head(method=b"GET", target=b"/p?x=1", headers=()):
    return SimpleNamespace(method=method, target=target, version=b"1.1",
                           headers=[(b"Host", b"example.com"), (b"User-Agent", b"curl/8"),
                                    *headers])


def written(tmp_path, fmt, **kw) -> str:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), fmt)
    args = dict(client=b"10.0.0.7", head=head(), status=200, size=1234,
                upstream="10.0.0.1:80", upstream_time=0.0031)
    args.update(kw)
    log.log(args.pop("client"), args.pop("head"), args.pop("status"), args.pop("size"),
            args.pop("upstream"), args.pop("upstream_time"), **args)
    log.close()
    return path.read_text()


FULL = dict(request_time=0.0046, received=17, upstream_status=200, tries=2,
            tls=("TLSv1.3", "example.com"), request_id="abc-1")


def test_text_starts_with_nginx_combined_then_our_fields(tmp_path):
    line = written(tmp_path, "text", **FULL)
    assert line.endswith("\n") and line.count("\n") == 1
    m = COMBINED.match(line)
    assert m and m.group(1) == "10.0.0.7" and m.group(3) == "GET /p?x=1 HTTP/1.1"
    assert (m.group(4), m.group(5), m.group(6), m.group(7)) == ("200", "1234", "-", "curl/8")
    rest = line[m.end():].split()
    assert rest == ["upstream=10.0.0.1:80", "upstream_time=0.003", "request_time=0.005",
                    "upstream_status=200", "tries=2", "bytes_received=17",
                    'host="example.com"', "tls=TLSv1.3", "sni=example.com", "request_id=abc-1"]


def test_text_without_upstream_tls_or_id(tmp_path):
    line = written(tmp_path, "text", head=None, status=400, upstream="", upstream_time=0.0)
    assert COMBINED.match(line).group(3) == "-"
    assert line.rstrip("\n").endswith(
        "upstream=- upstream_time=0.000 request_time=0.000 upstream_status=- tries=0 "
        'bytes_received=0 host="-" tls=- sni=- request_id=-')


def test_text_escapes_what_would_split_fields(tmp_path):
    evil = head(headers=())
    evil.headers[0] = (b"Host", b'a" b\\c')
    line = written(tmp_path, "text", head=evil, tls=("TLSv1.2", "x y"), request_id="")
    assert 'host="a\\x22 b\\x5Cc"' in line
    assert " sni=x\\x20y " in line and line.count('"') == 8


def test_json_has_every_field(tmp_path):
    record = json.loads(written(tmp_path, "json", **FULL))
    assert record["request_time"] == record["duration"] == 0.005
    assert {k: record[k] for k in ("status", "bytes", "upstream", "upstream_status", "tries",
                                   "bytes_received", "host", "tls_version", "sni",
                                   "request_id")} == {
        "status": 200, "bytes": 1234, "upstream": "10.0.0.1:80", "upstream_status": 200,
        "tries": 2, "bytes_received": 17, "host": "example.com", "tls_version": "TLSv1.3",
        "sni": "example.com", "request_id": "abc-1"}
    assert record["upstream_time"] == 0.0031 and record["time"].endswith("Z")


def test_json_nulls_when_unknown(tmp_path):
    record = json.loads(written(tmp_path, "json", head=None, status=400, upstream=""))
    assert [record[k] for k in ("upstream", "upstream_status", "host", "tls_version", "sni",
                                "request_id")] == [None] * 6
    assert record["tries"] == 0 and record["bytes_received"] == 0
