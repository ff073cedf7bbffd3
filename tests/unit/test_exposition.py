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


def test_metrics_is_prometheus_and_head_works_on_every_path(server):
    """/metrics (Prometheus' default path) answers what /prometheus does, and
    HEAD answers every path as GET would, without the body."""
    status, ctype, body = fetch(server, "/metrics")
    assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {f.name for f in text_string_to_metric_families(
        fetch(server, "/prometheus")[2].decode())} == names
    assert {"inRequestStart", "httptp_requests_started", "process_cpu_seconds"} <= names
    for path in ("/", "/status.json", "/expvar", "/prometheus", "/metrics", "/healthz",
                 "/nothing"):
        got = fetch(server, path)
        c = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
        try:
            c.request("HEAD", path)
            r = c.getresponse()
            assert (r.status, r.getheader("content-type")) == got[:2], path
            assert int(r.getheader("content-length")) > 0 and r.read() == b"", path
            c.request("GET", path)         # the connection is still in step
            again = c.getresponse()
            assert again.status == got[0] and again.read()
        finally:
            c.close()


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


def test_compat_block_has_help_and_types_gauges_as_gauges(stats):
    text = Exposition(stats).prometheus().decode()
    compat = text[:text.index("# HELP httptp_")]
    names = set(json.loads(Exposition(stats).expvar())) - {"cmdline"}
    for name in names:
        kind = "gauge" if name in ("inConns", "outConns") else "counter"
        assert f"# TYPE {name} {kind}\n{name} " in compat, name
        help_line = next(line for line in compat.splitlines()
                         if line.startswith(f"# HELP {name} "))
        assert "docs/metrics.md" not in help_line, f"{name} has no help of its own"
    assert compat.count("# HELP ") == compat.count("# TYPE ") == len(names)


def test_code_classes_and_request_duration(stats):
    block = stats.blocks_in_use()[0]
    base = stats.block_base(block)
    for status, n in ((200, 3), (302, 1), (404, 2), (503, 1), (101, 1)):
        stats.q[base + S.RESP_1XX - 1 + status // 100] += n
    stats.q[base + S.RESP_OTHER] += 1
    for seconds in (0.0004, 0.02, 0.02, 7.0):
        stats.q[base + S.DURATION_HIST + __import__("bisect").bisect_left(
            S.LATENCY_BUCKETS, seconds)] += 1
        stats.d[base + S.DURATION_SUM] += seconds
    text = Exposition(stats).prometheus().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    proxied = {s.labels["code"]: s.value for s in families["httptp_requests_proxied"].samples
               if s.name.endswith("_total")}
    assert proxied == {"1xx": 1, "2xx": 3, "3xx": 1, "4xx": 2, "5xx": 1, "other": 1}
    hist = {s.labels.get("le", s.name): s.value
            for s in families["httptp_request_duration_seconds"].samples}
    assert hist["0.001"] == 1 and hist["0.025"] == 3 and hist["5.0"] == 3 and hist["+Inf"] == 4
    assert hist["httptp_request_duration_seconds_count"] == 4
    assert hist["httptp_request_duration_seconds_sum"] == pytest.approx(7.0404)


def test_process_metrics_sum_this_process_and_its_children(stats):
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        text = Exposition(stats).prometheus().decode()     # master: this process
    finally:
        child.kill()
        child.wait()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {name: families[name].samples[0].value for name in (
        "process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
        "process_open_fds", "process_max_fds", "process_start_time_seconds", "httptp_processes")}
    assert value["httptp_processes"] >= 2
    assert value["process_cpu_seconds"] > 0
    assert 1 << 20 < value["process_resident_memory_bytes"] < value["process_virtual_memory_bytes"]
    assert 3 <= value["process_open_fds"] <= 2 * value["process_max_fds"]
    assert time.time() - 7 * 86400 < value["process_start_time_seconds"] <= time.time()
    assert families["process_cpu_seconds"].type == "counter"


def test_proc_children_fall_back_to_a_scan(tmp_path):
    """A kernel without /proc/<pid>/task/<tid>/children: parents from every stat."""
    from httptp import procstats
    for pid, ppid in ((10, 1), (11, 10), (12, 10), (13, 11)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (a (b) c) S {ppid} 0 0\n")
    (tmp_path / "10" / "task" / "10").mkdir(parents=True)      # no "children" in it
    assert sorted(procstats.children(10, str(tmp_path))) == [11, 12]
    assert procstats.children(99, str(tmp_path)) == []


def test_cpu_clock_never_goes_back():
    from httptp.procstats import CpuClock
    clock = CpuClock()
    assert [clock(v) for v in (1.0, 3.0, 2.5, 4.0)] == [1.0, 3.0, 3.0, 4.0]


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
