"""Prometheus conventions on a real `httptp` (-expvarAddr): /metrics, HEAD,
status classes, the request duration histogram, process_* over the master's
processes, promtool on the live exposition; and the proxy conventions
(X-Forwarded-For appended, X-Forwarded-Proto) through a real upstream."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import HttpTp, Reply, Upstream, get, wait_until

pytestmark = pytest.mark.timeout(90)


def stats_port(p: HttpTp) -> int:
    assert wait_until(lambda: "stats on http://" in p.output), p.output
    return int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))


def fetch(port: int, path: str, method: str = "GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.getheader("content-type"), r.read()
    finally:
        c.close()


def scrape(port: int, path: str = "/metrics") -> tuple[str, dict]:
    status, _, body = fetch(port, path)
    assert status == 200
    text = body.decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> dict:
    """{label values (tuple) or sample name: value} of one family."""
    out = {}
    for s in family.samples:
        if s.name.endswith(suffix):
            out[tuple(sorted(s.labels.items())) or s.name] = s.value
    return out


def by_status(method, path, headers, body) -> Reply:
    """/s/<code>: answer that status; /slow: 200 after 0.3 s; else echo the headers."""
    if path.startswith(b"/s/"):
        return Reply(status=int(path[3:6]), body=b"x")
    if path == b"/slow":
        return Reply(delay=0.3)
    return Reply(body=json.dumps({k.decode(): v.decode() for k, v in headers.items()}).encode())


@pytest.fixture(scope="module")
def running():
    up = Upstream(by_status)
    started = time.time()
    with HttpTp(f"-out={up.addr}", "-outType=http", "-expvarAddr=127.0.0.1:0", workers=2) as p:
        yield p, stats_port(p), started
    up.close()


def test_status_classes_and_duration_histogram_move(running):
    p, port, _ = running
    _, before = scrape(port)
    count0 = samples(before["httptp_request_duration_seconds"], "_count")
    codes0 = samples(before["httptp_requests_proxied"], "_total")
    c = http.client.HTTPConnection(p.host, p.port, timeout=10)
    sent = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    for path in ("/a", "/s/204", "/s/302", "/s/404", "/s/404", "/s/503", "/slow"):
        status = get(c, path)[0]
        assert status == (int(path[3:]) if path.startswith("/s/") else 200)
        sent[f"{status // 100}xx"] += 1
    c.close()
    text, after = scrape(port)
    codes = samples(after["httptp_requests_proxied"], "_total")
    assert {k[0][1]: v - codes0[k] for k, v in codes.items()} == {
        "1xx": 0, "2xx": sent["2xx"], "3xx": 1, "4xx": 2, "5xx": 1, "other": 0}
    hist = samples(after["httptp_request_duration_seconds"])
    (count_key, count), = samples(after["httptp_request_duration_seconds"], "_count").items()
    assert count - count0[count_key] == 7
    # the /slow one took 0.3 s at least: above the 0.25 bucket
    assert hist[(("le", "0.25"),)] <= count - 1
    assert hist["httptp_request_duration_seconds_sum"] >= 0.3
    # beside the upstream latency histogram, with the same buckets
    assert "httptp_upstream_latency_seconds" in after
    assert "# TYPE inConns gauge\n" in text and "# TYPE outConns gauge\n" in text
    assert "# TYPE inRequestStart counter\n" in text


def test_metrics_is_prometheus_and_head_answers_every_path(running):
    _, port, _ = running
    names = set(scrape(port, "/prometheus")[1])
    assert set(scrape(port, "/metrics")[1]) == names
    for path in ("/", "/status.json", "/expvar", "/prometheus", "/metrics", "/healthz", "/x"):
        status, ctype, _ = fetch(port, path)
        assert fetch(port, path, "HEAD") == (status, ctype, b""), path
    assert fetch(port, "/healthz", "HEAD")[0] == 200


def test_process_metrics_sum_the_master_and_its_children(running):
    p, port, started = running
    _, fams = scrape(port)
    value = {name: fams[name].samples[0].value for name in (
        "process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
        "process_open_fds", "process_max_fds", "process_start_time_seconds", "httptp_processes")}
    children = subprocess.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    # the master, 2 workers and the stats helper
    assert value["httptp_processes"] == 1 + len(children) == 4
    assert value["process_cpu_seconds"] > 0
    assert value["process_resident_memory_bytes"] > 4 * (1 << 20)
    assert value["process_open_fds"] >= 4 * 3
    assert value["process_max_fds"] >= 64
    assert started - 2 <= value["process_start_time_seconds"] <= time.time() + 1
    # a counter: never less on the next scrape
    assert scrape(port)[1]["process_cpu_seconds"].samples[0].value >= value["process_cpu_seconds"]


# promtool's remarks that the original's names cannot avoid
CAMEL = "metric names should be written in 'snake_case' not 'camelCase'"
TOTAL = 'counter metrics should have "_total" suffix'


@pytest.mark.skipif(not shutil.which("promtool"),
                    reason="promtool (Debian package prometheus) not installed: make test-deps")
def test_promtool_has_only_the_remarks_of_the_original_names(running):
    _, port, _ = running
    text, _ = scrape(port, "/prometheus")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    remarks = set()
    for line in (r.stdout + r.stderr).splitlines():
        name, _, remark = line.strip().partition(" ")
        if name:
            remarks.add((name, remark))
    compat = {}
    for line in text.splitlines():
        if line.startswith("# TYPE ") and not line.startswith("# TYPE httptp_") \
                and not line.startswith("# TYPE process_"):
            _, _, name, kind = line.split()
            compat[name] = kind
    expected = {(n, CAMEL) for n in compat if n != n.lower()}
    expected |= {(n, TOTAL) for n, kind in compat.items() if kind == "counter"}
    assert remarks == expected, r.stdout + r.stderr
    assert all(f"# HELP {n} " in text for n in compat)


# -- proxy conventions --------------------------------------------------------------------


def echoed(p: HttpTp, headers: dict) -> dict:
    c = http.client.HTTPConnection(p.host, p.port, timeout=10)
    try:
        status, _, body = get(c, "/echo", headers=headers)
    finally:
        c.close()
    assert status == 200
    return json.loads(body)


def test_x_forwarded_for_appends_and_proto_is_set():
    up = Upstream(by_status)
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", "-clientIPHeader=X-Forwarded-For",
                    workers=1) as p:
            seen = echoed(p, {"X-Forwarded-For": "203.0.113.7, 198.51.100.1",
                              "X-Forwarded-Proto": "https"})
            assert seen["x-forwarded-for"] == "203.0.113.7, 198.51.100.1, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"          # the client's is replaced
            assert echoed(p, {})["x-forwarded-for"] == "127.0.0.1"
        with HttpTp(f"-out={up.addr}", "-outType=http", "-clientIPHeader=X-Real-IP",
                    "-forwardedProto=false", workers=1) as p:
            seen = echoed(p, {"X-Real-IP": "203.0.113.7", "X-Forwarded-For": "203.0.113.7",
                              "X-Forwarded-Proto": "https"})
            assert seen["x-real-ip"] == "127.0.0.1"             # set, as the original
            assert seen["x-forwarded-for"] == "203.0.113.7"     # not ours: untouched
            assert seen["x-forwarded-proto"] == "https"         # -forwardedProto=false
    finally:
        up.close()


def test_a_teleport_hop_passes_on_what_the_first_hop_set():
    """client → httptp (http in, teleport out) → httptp (teleport in, http
    out) → upstream: the first hop sets X-Forwarded-Proto and appends to
    X-Forwarded-For; the second (a teleport listener) adds nothing."""
    up = Upstream(by_status)
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", "-inType=teleport",
                    "-clientIPHeader=X-Forwarded-For", workers=1) as second, \
                HttpTp(f"-out={second.addr}", "-outType=teleport",
                       "-clientIPHeader=X-Forwarded-For", workers=1) as first:
            seen = echoed(first, {"X-Forwarded-For": "203.0.113.7"})
            assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
    finally:
        up.close()
