"""/expvar and /prometheus from a real shared-memory map, over a real socket."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from httptp import stats as S
from httptp.exposition import Exposition
from httptp.stats import Stats
from httptp.statsserver import make_server

ORIGINAL = ("inRequestStart inRequestSuccess inRequestNon200 inRequestTimeoutError "
            "inRequestOtherError inAcceptSuccess inAcceptError inConns inBytesRead inBytesWritten "
            "inReadCalls inWriteCalls inReadError inWriteError outDialSuccess outDialError "
            "outConns outBytesRead outBytesWritten outReadCalls outWriteCalls outReadError "
            "outWriteError prometheusHandlerCalls expvarHandlerCalls expvarRegexpErrors").split()


@pytest.fixture
def stats():
    st = Stats.create(4)
    ups = st.assign_upstreams(["10.0.0.1:80", "10.0.0.2:80"])
    for block, n in ((st.claim_block(0, 0, 1), 7), (st.claim_block(0, 1, 1), 5)):
        base = st.block_base(block)
        st.q[base + S.IN_REQUEST_START] += n
        st.q[base + S.IN_REQUEST_SUCCESS] += n
        st.q[st.upstream_base(block, ups[0]) + S.UP_REQUESTS] += n
        st.set_state(block, S.STATE_READY)
        st.beat(block, time.monotonic())
    return st


@pytest.fixture
def server(stats):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = make_server(sock, stats, ["httptp", "-outType=http"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield sock.getsockname()[1]
    srv.shutdown()
    sock.close()


def fetch(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.getheader("content-type"), r.read()


def test_expvar_has_the_original_names_summed_over_blocks(server):
    status, ctype, body = fetch(server, "/expvar")
    assert status == 200 and ctype == "application/json; charset=utf-8"
    data = json.loads(body)
    assert set(ORIGINAL) <= set(data)
    assert data["inRequestStart"] == data["inRequestSuccess"] == 12
    assert data["cmdline"] == ["httptp", "-outType=http"]


def test_expvar_regexp_filter_and_bad_regexp(server):
    status, _, body = fetch(server, "/expvar?r=^inRequestS")
    assert status == 200 and set(json.loads(body)) == {"inRequestStart", "inRequestSuccess"}
    status, _, body = fetch(server, "/expvar?r=(")
    assert status == 400
    assert json.loads(fetch(server, "/expvar?r=RegexpErrors")[2]) == {"expvarRegexpErrors": 1}


def test_prometheus_parses_without_duplicates_and_keeps_the_original_block(server):
    status, ctype, body = fetch(server, "/prometheus")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    assert "# TYPE inRequestStart counter\ninRequestStart 12\n" in text
    series = []
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for fam in families.values():
        for sample in fam.samples:
            series.append((sample.name, tuple(sorted(sample.labels.items()))))
    assert len(series) == len(set(series)), "duplicate series"
    per_up = {s.labels["upstream"]: s.value for s in families["httptp_upstream_requests"].samples
              if s.name.endswith("_total")}
    assert per_up == {"10.0.0.1:80": 12, "10.0.0.2:80": 0}
    assert "# HELP httptp_requests_started_total Requests received from clients" in text
    assert any(s.labels.get("version") for s in families["httptp_build_info"].samples)


def test_healthz_and_unknown_path(server, stats):
    assert fetch(server, "/healthz")[0] == 200
    assert fetch(server, "/nope")[:1] == (400,)
    for block in stats.blocks_in_use():
        stats.set_state(block, S.STATE_DRAINING)
    assert fetch(server, "/healthz")[0] == 503


def test_counters_never_go_backwards_when_a_block_is_reused(stats):
    exp = Exposition(stats)
    before = json.loads(exp.expvar())["inRequestStart"]
    block = stats.blocks_in_use()[0]
    stats.release_block(block)              # the worker died and was reaped
    stats.claim_block(0, 0, 2)              # its replacement
    assert json.loads(exp.expvar())["inRequestStart"] == before


def test_latency_histogram_and_teleport_ratio(stats):
    from httptp.balancer import Balancer
    block = stats.blocks_in_use()[0]
    bal = Balancer(stats, block, [0, 1])
    for latency in (0.0005, 0.003, 0.003, 0.2):
        lease = bal.pick()
        lease.release(True, latency)
    base = stats.block_base(block)
    stats.q[base + S.TELEPORT_SENT_PLAIN] += 8000
    stats.q[base + S.TELEPORT_SENT_COMPRESSED] += 1000
    text = Exposition(stats).prometheus().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hist = families["httptp_upstream_latency_seconds"]
    counts = {}
    for sample in hist.samples:
        if sample.name.endswith("_count"):
            counts[sample.labels["upstream"]] = sample.value
    assert sum(counts.values()) == 4
    inf = [s.value for s in hist.samples if s.labels.get("le") == "+Inf"]
    assert sum(inf) == 4
    le_5ms = sum(s.value for s in hist.samples if s.labels.get("le") == "0.005")
    assert le_5ms == 3
    ratio = families["httptp_teleport_compression_ratio"].samples
    assert [(s.labels["direction"], s.value) for s in ratio] == [("sent", 8.0)]


@pytest.mark.skipif(not __import__("shutil").which("promtool"),
                    reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_every_httptp_metric(stats):
    """Prometheus' own linter on our metrics (names, units, HELP).  The
    original's block before them is camelCase without _total by design: it
    keeps dashboards built on the Go httptp working."""
    import subprocess
    from httptp.balancer import Balancer
    lease = Balancer(stats, stats.blocks_in_use()[0], [0, 1]).pick()
    lease.release(True, 0.002)
    text = Exposition(stats).prometheus().decode()
    ours = text[text.index("# HELP httptp_"):]
    r = subprocess.run(["promtool", "check", "metrics"], input=ours, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
