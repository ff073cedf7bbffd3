"""The status page (/ and /status.json) from a real shared-memory map, over a real socket."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import sys
import time
import types
from html.parser import HTMLParser

import pytest

from httptp import stats as S
from httptp import statuspage
from httptp.stats import Stats
from httptp.statsserver import make_server

HOSTILE = '<script>alert("x")</script>&"\':80'


@pytest.fixture
def stats():
    st = Stats.create(4)
    ups = st.assign_upstreams(["10.0.0.1:80", HOSTILE])
    for block, n in ((st.claim_block(101, 0, 1), 7), (st.claim_block(102, 1, 1), 5)):
        base = st.block_base(block)
        st.q[base + S.IN_REQUEST_START] += n
        st.q[base + S.IN_CONNS] = 2
        st.q[st.upstream_base(block, ups[0]) + S.UP_REQUESTS] += n
        st.q[st.upstream_base(block, ups[0]) + S.UP_HIST + 3] += n      # 5..10 ms
        st.set_state(block, S.STATE_READY)
        st.beat(block, time.monotonic())
    return st


def serve(stats, info=None, history=None):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = make_server(sock, stats, ["httptp"], info, history)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, sock


@pytest.fixture
def server(stats):
    srv, sock = serve(stats, {"in": "127.0.0.1:8080", "in_type": "http", "out": ["10.0.0.1:80"],
                              "out_type": "teleport", "started": time.time() - 3725})
    yield sock.getsockname()[1]
    srv.shutdown()
    sock.close()


def fetch(port, path, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


class Tables(HTMLParser):
    """The text of every cell by table id, row by row; every script body."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.scripts: list[str] = []
        self._table = self._row = self._col = None
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None and "data-state" in a:
            self._row = {"_state": a["data-state"]}
            self._table.append(self._row)
        elif tag == "td" and self._row is not None:
            self._col = a.get("data-col")
            self._row[self._col] = ""
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._row = None
        elif tag == "td":
            self._col = None
        elif tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        elif self._row is not None and self._col:
            self._row[self._col] += data


def parse(body: bytes) -> Tables:
    t = Tables()
    t.feed(body.decode())
    return t


@pytest.mark.parametrize("health, ejected, current, inflight, want", [
    (None, False, True, 0, "up"),
    ("up", False, True, 3, "up"),
    ("unknown", False, True, 0, "up"),
    ("down", False, True, 0, "down"),
    ("down", True, True, 0, "down"),          # health wins over the balancer
    (None, True, True, 0, "ejected"),
    ("up", True, True, 0, "ejected"),
    (None, False, False, 2, "draining"),
    (None, False, False, 0, None),            # gone: not shown
    (None, True, False, 0, "ejected"),
])
def test_upstream_state_is_derived_in_one_place(health, ejected, current, inflight, want):
    assert statuspage.upstream_state(health=health, ejected=ejected, current=current,
                                     inflight=inflight) == want


def test_quantile_interpolates_within_a_bucket():
    buckets = [0] * (len(S.LATENCY_BUCKETS) + 1)
    assert statuspage.quantile(0.99, buckets) is None
    buckets[3] = 100                          # all in 5..10 ms
    assert statuspage.quantile(0.5, buckets) == pytest.approx(0.0075)
    buckets[-1] = 100                         # half beyond the last bound
    assert statuspage.quantile(0.99, buckets) == S.LATENCY_BUCKETS[-1]


def test_status_json_shape(server):
    status, headers, body = fetch(server, "/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    doc = json.loads(body)
    assert set(doc) == {"version", "time", "uptime", "in", "out", "workers", "upstreams",
                        "requests", "errors", "teleport", "history"}
    assert doc["in"] == {"addr": "127.0.0.1:8080", "type": "http"}
    assert doc["out"] == {"addrs": ["10.0.0.1:80"], "type": "teleport"}
    assert 3720 < doc["uptime"] < 3800 and doc["requests"] == 12 and doc["errors"] == 0
    assert [(w["pid"], w["state"], w["connections"], w["requests"]) for w in doc["workers"]] == \
        [(101, "ready", 2, 7), (102, "ready", 2, 5)]
    first, second = doc["upstreams"]
    assert set(first) == {"index", "address", "origin", "state", "inflight", "requests",
                          "failures", "ewma", "p99", "health"}
    assert (first["address"], first["origin"], first["state"], first["requests"]) == \
        ("10.0.0.1:80", "10.0.0.1:80", "up", 12)
    assert 0.005 < first["p99"] <= 0.01 and first["health"] is None   # no health checks yet
    assert second["address"] == HOSTILE and second["p99"] is None
    assert doc["teleport"] == {"sent": {"plain": 0, "wire": 0}, "received": {"plain": 0, "wire": 0},
                               "plain": 0, "wire": 0, "ratio": None, "saved": 0,
                               "levels": {}}
    assert doc["history"]["columns"] == ["ago", "requests_per_s", "errors_per_s",
                                         "bytes_saved_per_s"]


def test_page_without_javascript_has_the_tables_and_escapes_names(server):
    status, headers, body = fetch(server, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'sha256-" in headers["content-security-policy"]
    page = parse(body)
    assert [(r["pid"], r["state"], r["requests"]) for r in page.tables["workers"]] == \
        [("101", "ready", "7"), ("102", "ready", "5")]
    ups = page.tables["upstreams"]
    assert [(r["address"], r["state"], r["requests"]) for r in ups] == \
        [("10.0.0.1:80", "up", "12"), (HOSTILE, "up", "0")]
    assert ups[0]["health"] == "–"
    assert b"<script>alert" not in body and len(page.scripts) == 1   # only the page's own script
    assert b"1h 2m" in body                                           # uptime
    assert b"http://" not in body and b"https://" not in body        # nothing loaded from elsewhere


def test_head_and_other_methods(server):
    status, headers, body = fetch(server, "/", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    status, _, body = fetch(server, "/status.json", "HEAD")
    assert status == 200 and body == b""
    assert fetch(server, "/", "POST")[0] == 501
    assert fetch(server, "/status.json", "DELETE")[0] == 501


class HealthStats(Stats):
    """The health-check contract (issue 12 §2): ``health(index)``."""

    verdicts: dict = {}

    def health(self, index):
        return self.verdicts.get(index, (0, 0.0, 0))


def test_health_checks_when_present_mark_an_upstream_down():
    st = HealthStats.create(2)
    a, b = st.assign_upstreams(["10.0.0.1:80", "10.0.0.2:80"])
    HealthStats.verdicts = {a: (1, time.time() - 2, 200), b: (2, time.time() - 1, 503)}
    doc = statuspage.status(st, {}, None)
    assert [(u["state"], u["health"]["state"], u["health"]["code"]) for u in doc["upstreams"]] == \
        [("up", "up", 200), ("down", "down", 503)]
    cells = dict(statuspage.upstream_cells(doc["upstreams"][1], doc["time"]))
    assert cells["health"].startswith("down 503, ")


def test_a_retired_upstream_with_requests_in_flight_is_draining():
    st = Stats.create(2)
    old, = st.assign_upstreams(["10.0.0.9:80"])
    block = st.claim_block(1, 0, 0)
    st.q[st.upstream_base(block, old) + S.UP_INFLIGHT] = 2
    st.assign_upstreams(["10.0.0.1:80"])          # a reload drops the old one
    doc = statuspage.status(st, {}, None)
    assert [(u["address"], u["state"]) for u in doc["upstreams"]] == \
        [("10.0.0.1:80", "up"), ("10.0.0.9:80", "draining")]
    st.q[st.upstream_base(block, old) + S.UP_INFLIGHT] = 0
    assert [u["address"] for u in statuspage.status(st, {}, None)["upstreams"]] == ["10.0.0.1:80"]


def test_history_gives_rates_and_teleport_savings():
    st = Stats.create(2)
    block = st.claim_block(1, 0, 0)
    base = st.block_base(block)
    clock = iter([10.0, 12.0, 14.0]).__next__
    history = statuspage.History(st, clock=clock)
    history.sample()
    st.q[base + S.IN_REQUEST_START] += 20
    st.q[base + S.IN_REQUEST_OTHER_ERROR] += 4
    st.q[base + S.TELEPORT_SENT_PLAIN] += 1000
    st.q[base + S.TELEPORT_SENT_COMPRESSED] += 200
    history.sample()
    history.sample()
    assert history.rates() == [[2.0, 10.0, 2.0, 400.0], [0.0, 0.0, 0.0, 0.0]]
    tp = statuspage.status(st, {"out_type": "http"}, history)["teleport"]
    assert (tp["plain"], tp["wire"], tp["ratio"], tp["saved"]) == (1000, 200, 5.0, 800)


def test_a_client_that_hangs_up_mid_answer_leaves_no_traceback(stats, capfd):
    srv, sock = serve(stats)
    try:
        for _ in range(20):
            c = socket.create_connection(sock.getsockname(), timeout=5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            c.close()                                 # RST before the page is written
        assert fetch(sock.getsockname()[1], "/status.json")[0] == 200
    finally:
        srv.shutdown()
        sock.close()
    assert "Traceback" not in capfd.readouterr().err


def test_discovery_entries_when_present_give_address_and_origin(monkeypatch):
    """The discovery contract (issue 12 §1): ``upstream_entries(stats)`` in
    httptp.discovery gives (index, address, origin); each address is a row."""
    st = Stats.create(2)
    a, b = st.assign_upstreams(["10.0.0.1:80", "10.0.0.2:80"])
    block = st.claim_block(1, 0, 0)
    st.q[st.upstream_base(block, b) + S.UP_REQUESTS] = 9
    module = types.ModuleType("httptp.discovery")
    module.upstream_entries = lambda stats: [(a, "10.0.0.1:80", "app.example:80"),
                                             (b, "10.0.0.2:80", "app.example:80"),
                                             (7, "10.0.0.3:80", "app.example:80")]
    monkeypatch.setitem(sys.modules, "httptp.discovery", module)
    rows = statuspage.status(st, {}, None)["upstreams"]
    assert [(u["address"], u["origin"], u["state"], u["requests"]) for u in rows] == [
        ("10.0.0.1:80", "app.example:80", "up", 0), ("10.0.0.2:80", "app.example:80", "up", 9),
        ("10.0.0.3:80", "app.example:80", "up", 0)]


def test_teleport_compression_levels_are_the_mean_per_side(stats):
    """Two workers: listener connections at levels 6+9 and 3, upstream links at 1."""
    for block, (in_sum, in_links, out_sum, out_links) in ((0, (15, 2, 1, 1)), (1, (3, 1, 0, 0))):
        base = stats.block_base(block)
        stats.q[base + S.IN_LEVEL_SUM], stats.q[base + S.IN_LEVEL_LINKS] = in_sum, in_links
        stats.q[base + S.OUT_LEVEL_SUM], stats.q[base + S.OUT_LEVEL_LINKS] = out_sum, out_links
    doc = statuspage.status(stats, {"in_type": "teleport", "out_type": "teleport"}, None)
    assert doc["teleport"]["levels"] == {"in": 6.0, "out": 1.0}
    assert statuspage._levels_text(doc["teleport"]["levels"]) == "in 6, out 1"
