"""The stats helper of the real `httptp` (-expvarAddr): what it answers and counts."""

from __future__ import annotations

import http.client
import json
import re

import pytest

import httptp
from tests.helpers import HttpTp, UnixHTTPConnection, Upstream, get, wait_until

pytestmark = pytest.mark.timeout(60)


def stats_get(p: HttpTp, path: str):
    """(status, headers as a list of pairs, body) of ``path`` on p's -expvarAddr."""
    assert wait_until(lambda: "stats on http://" in p.output), p.output
    port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        c.close()


def test_server_header_names_the_version():
    up = Upstream()
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", "-expvarAddr=127.0.0.1:0", workers=1) as p:
            for path in ("/expvar", "/prometheus", "/healthz", "/nothing"):
                _, headers, _ = stats_get(p, path)
                assert [v for k, v in headers if k.lower() == "server"] == \
                    [f"httptp/{httptp.__version__}"], (path, headers)
    finally:
        up.close()


def test_a_unix_listener_counts_accepted_connections(tmp_path):
    up = Upstream()
    path = str(tmp_path / "in.sock")
    try:
        with HttpTp(f"-in={path}", "-inType=unix", f"-out={up.addr}", "-outType=http",
                    "-expvarAddr=127.0.0.1:0", workers=2) as p:
            for _ in range(3):
                c = UnixHTTPConnection(path)
                assert get(c)[0] == 200 and get(c)[0] == 200    # two requests, one connection
                c.close()
            stats = json.loads(stats_get(p, "/expvar")[2])
            assert stats["inAcceptSuccess"] == 3, stats
            assert stats["inRequestSuccess"] == 6, stats
    finally:
        up.close()
