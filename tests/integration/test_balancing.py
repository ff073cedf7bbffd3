"""Least-loaded balancing and health across workers, with real upstreams."""

from __future__ import annotations

import time

import pytest

from tests.helpers import HttpTp, Upstream, load, wait_until

pytestmark = pytest.mark.timeout(90)


def test_faster_upstreams_serve_more():
    ups = [Upstream(name=n, delay=d) for n, d in (("fast", 0.001), ("mid", 0.005), ("slow", 0.020))]
    try:
        out = ",".join(u.addr for u in ups)
        with HttpTp(f"-out={out}", "-outType=http", workers=2) as p:
            res = load(p.host, p.port, threads=12, duration=4.0, max_requests=6000)
        assert res.failed == 0, res.errors[:3]
        fast, mid, slow = (u.requests for u in ups)
        assert fast > mid > slow, (fast, mid, slow)
        assert slow > 0  # still probed, never starved completely
    finally:
        for u in ups:
            u.close()


def test_dead_upstream_is_ejected_and_reinstated():
    a, b = Upstream(name="a"), Upstream(name="b")
    try:
        with HttpTp(f"-out={a.addr},{b.addr}", "-outType=http", "-outMaxFails=3",
                    "-outFailTimeout=2s", workers=2) as p:
            # warm up until both have served: one slow sample (a busy machine)
            # steers picks away from an upstream until its estimate relaxes
            def both_served():
                assert load(p.host, p.port, threads=8, max_requests=400).failed == 0
                return a.requests > 20 and b.requests > 20
            assert wait_until(both_served, timeout=30, step=0.1), (a.requests, b.requests)
            b.kill()
            res = load(p.host, p.port, threads=4, duration=20, max_requests=1000)
            assert res.total == 1000
            assert res.ok >= 995, (res.statuses, res.errors[:3])
            early = b.dead_attempts
            # after the first second: only the single probes per cool-down get through
            time.sleep(1.0)
            before = b.dead_attempts
            res2 = load(p.host, p.port, threads=4, duration=20, max_requests=1000)
            assert res2.ok >= 995
            assert b.dead_attempts - before <= 20, (early, before, b.dead_attempts)
            # it comes back: reinstated within one cool-down (2 s) plus a margin
            b.revive()
            served_before = b.requests
            t0 = time.monotonic()
            while b.requests == served_before and time.monotonic() - t0 < 6:
                load(p.host, p.port, threads=2, max_requests=20)
                time.sleep(0.05)
            assert b.requests > served_before, "not reinstated"
            assert time.monotonic() - t0 < 4.0
    finally:
        a.close()
        b.close()


def test_counters_add_up_across_workers():
    """Requests served per worker (shared memory) add up to what was sent."""
    import re
    import signal
    up = Upstream()
    try:
        p = HttpTp(f"-out={up.addr}", "-outType=http", workers=2)
        try:
            # one client connection per thread: both workers get some
            res = load(p.host, p.port, threads=16, max_requests=600, duration=20)
            assert res.ok == 600
            p.signal(signal.SIGTERM)
            assert p.wait(15) == 0
        finally:
            p.kill()
    finally:
        up.close()
    assert up.requests == 600
    m = re.search(r"stopped: (\d+) requests served, (\d+) started, (\d+) upstream errors; "
                  r"per worker block: (.*)", p.output)
    assert m, p.output
    assert m.group(1) == m.group(2) == "600" and m.group(3) == "0"
    per_block = [int(kv.split("=")[1]) for kv in m.group(4).split()]
    assert sum(per_block) == 600
    assert len(per_block) == 2 and min(per_block) > 0   # both workers served


def test_stats_server_sums_workers_and_survives_a_killed_worker():
    """-expvarAddr: /expvar counts are exact over 2 workers, also after kill -9 of
    one; /prometheus parses; /healthz answers."""
    import http.client
    import json
    import os
    import re
    import signal
    from prometheus_client.parser import text_string_to_metric_families
    up = Upstream()
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", "-expvarAddr=127.0.0.1:0", workers=2) as p:
            t0 = time.monotonic()
            while "stats on http://" not in p.output and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))

            def get(path):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", path)
                r = c.getresponse()
                return r.status, r.read()
            assert load(p.host, p.port, threads=8, max_requests=300, duration=20).ok == 300
            stats = json.loads(get("/expvar")[1])
            assert stats["inRequestStart"] == stats["inRequestSuccess"] == 300
            os.kill(p.worker_pids()[0], signal.SIGKILL)
            t0 = time.monotonic()
            while len(p.worker_pids()) < 2 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            assert load(p.host, p.port, threads=8, max_requests=200, duration=20).ok == 200
            stats = json.loads(get("/expvar")[1])
            assert stats["inRequestSuccess"] == 500          # never goes backwards
            assert stats["workerRestarts"] >= 1
            status, text = get("/prometheus")
            assert status == 200 and b"inRequestSuccess 500\n" in text
            names = {f.name for f in text_string_to_metric_families(text.decode())}
            assert "httptp_upstream_requests" in names
            assert get("/healthz")[0] == 200
    finally:
        up.close()
