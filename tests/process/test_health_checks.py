"""Active health checks through the real `httptp` command, on loopback.

An upstream that fails -outHealthCheckFall checks gets no client request;
after -outHealthCheckRise good ones it is back; and no client request is ever
used to probe it: while it is down only the checker's ``GET /health`` reach
it (every request is recorded at the upstream)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
from collections import Counter

import pytest

from tests.helpers import HttpTp, Reply, Upstream, wait_until

pytestmark = pytest.mark.timeout(90)

CHECKS = ("-outHealthCheck=/health", "-outHealthCheckInterval=100ms",
          "-outHealthCheckTimeout=1s", "-outHealthCheckRise=2", "-outHealthCheckFall=3")


class App:
    """An upstream whose /health can be made to fail; it records every
    request as ("health" | "client", sick at that moment)."""

    def __init__(self, name: str):
        self.name = name
        self.sick = False
        self.events: list[tuple[str, bool]] = []
        self.up = Upstream(self._handle, name=name)
        self.addr = self.up.addr

    def _handle(self, method, path, headers, body):
        sick = self.sick
        if path == b"/health":
            self.events.append(("health", sick))
            return Reply(status=500 if sick else 200)
        self.events.append(("client", sick))
        return Reply(body=self.name.encode())

    def clients(self, start: int = 0) -> int:
        return sum(1 for kind, _ in self.events[start:] if kind == "client")

    def close(self):
        self.up.close()


def request(p: HttpTp, method: str = "GET") -> tuple[int, bytes]:
    """One request on a new connection (so that every worker gets some)."""
    c = http.client.HTTPConnection(p.host, p.port, timeout=10)
    try:
        c.request(method, "/work", body=b"x" if method == "POST" else None)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Load:
    """Requests one after another in a thread (GET and POST) until stopped."""

    def __init__(self, p: HttpTp):
        self.p = p
        self.results: list[tuple[int, bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for n in range(20000):          # bounded; stopped long before
            if self.stop.is_set():
                return
            self.results.append(request(self.p, "POST" if n % 2 else "GET"))

    def finish(self) -> list[tuple[int, bytes]]:
        self.stop.set()
        self.thread.join(15)
        return self.results


def stats_port(p: HttpTp) -> int:
    assert wait_until(lambda: "stats on http://" in p.output), p.output
    return int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))


def stats_get(p: HttpTp, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", stats_port(p), timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().read()
    finally:
        c.close()


def test_down_after_fall_back_after_rise_and_no_client_request_probes():
    a, b = App("a"), App("b")
    try:
        with HttpTp(f"-out={a.addr},{b.addr}", "-outType=http", *CHECKS,
                    "-expvarAddr=127.0.0.1:0", workers=2) as p:
            assert wait_until(lambda: request(p)[0] == 200 and a.clients() > 0), p.output
            a.sick = True
            assert wait_until(lambda: f"upstream {a.addr} is down" in p.output), p.output
            line = next(x for x in p.lines if f"upstream {a.addr} is down" in x)
            assert "GET /health answered 500 (3 failed checks in a row)" in line
            mark = len(a.events)
            load = Load(p)
            # down: the load all goes to b; a sees only the checker
            assert wait_until(lambda: len(load.results) >= 40 and
                              sum(1 for k, _ in a.events[mark:] if k == "health") >= 5)
            a.sick = False
            assert wait_until(lambda: f"upstream {a.addr} is up again" in p.output), p.output
            assert wait_until(lambda: a.clients(mark) > 0), "a never got traffic back"
            results = load.finish()
            events = a.events[mark:]
            first_client = next(i for i, (kind, _) in enumerate(events) if kind == "client")
            before = events[:first_client]
            assert all(kind == "health" for kind, _ in before)
            # the way back was the checks': Rise good ones before any client request
            assert sum(1 for kind, sick in before if not sick) >= 2, before
            assert ("client", True) not in events
            assert all(status == 200 for status, _ in results), Counter(results)
            assert p.output.count(f"upstream {a.addr} is down") == 1
            assert p.output.count(f"upstream {a.addr} is up again") == 1
            expvar = json.loads(stats_get(p, "/expvar?r=Health"))
            assert expvar["outHealthCheckFailures"] >= 3
            assert expvar["outHealthChecks"] > expvar["outHealthCheckFailures"]
            prom = stats_get(p, "/prometheus").decode()
            assert f'httptp_upstream_health{{upstream="{a.addr}"}} 1.0' in prom
            assert re.search(r'httptp_upstream_health_check_failures_total\{upstream="%s"\} '
                             r'[1-9]' % re.escape(a.addr), prom), prom
        assert "Traceback" not in p.output
    finally:
        a.close()
        b.close()


def test_a_dead_upstream_costs_no_post_a_502_once_it_is_down():
    """Passive ejection after one failure, a short -outFailTimeout: without
    checks a POST would be the probe after 100 ms and get a 502."""
    a, b = Upstream(name="a"), Upstream(name="b")
    try:
        with HttpTp(f"-out={a.addr},{b.addr}", "-outType=http", *CHECKS,
                    "-outMaxFails=1", "-outFailTimeout=100ms", workers=2) as p:
            assert wait_until(lambda: request(p)[0] == 200 and a.requests > 0), p.output
            a.kill()                    # accept, then reset: a crashed app behind its port
            assert wait_until(lambda: f"upstream {a.addr} is down" in p.output), p.output
            served = a.requests
            statuses = [request(p, "POST") for _ in range(40)]      # many cool-downs long
            assert statuses == [(200, b"b")] * 40
            a.revive()
            assert wait_until(lambda: f"upstream {a.addr} is up again" in p.output), p.output
            assert wait_until(lambda: request(p, "POST") == (200, b"a") or a.requests > served)
        assert "Traceback" not in p.output
    finally:
        a.close()
        b.close()


def test_teleport_out_checks_over_teleport_and_503_when_all_are_down():
    """front --teleport--> back --http--> app: the front checks GET /health
    over teleport; its only upstream down, clients get 503 at once."""
    app = App("app")
    try:
        with HttpTp("-inType=teleport", "-outType=http", f"-out={app.addr}", workers=1) as back, \
                HttpTp("-outType=teleport", f"-out={back.addr}", *CHECKS, workers=1) as front:
            assert wait_until(lambda: app.events.count(("health", False)) >= 2)
            assert request(front) == (200, b"app")
            app.sick = True
            assert wait_until(lambda: f"upstream {back.addr} is down" in front.output), \
                front.output
            mark = len(app.events)
            status, body = request(front, "POST")
            assert (status, body) == (503, b"no upstream is up (health checks)\n")
            assert ("client", True) not in app.events[mark:]
            app.sick = False
            assert wait_until(lambda: f"upstream {back.addr} is up again" in front.output)
            assert request(front) == (200, b"app")
        assert "Traceback" not in front.output + back.output
    finally:
        app.close()


def test_http_out_every_upstream_down_is_503_and_nothing_reaches_them():
    a = App("a")
    try:
        with HttpTp(f"-out={a.addr}", "-outType=http", *CHECKS, workers=1) as p:
            a.sick = True
            assert wait_until(lambda: f"upstream {a.addr} is down" in p.output), p.output
            mark = len(a.events)
            for method in ("GET", "POST"):
                assert request(p, method) == (503, b"no upstream is up (health checks)\n")
            assert a.clients(mark) == 0
        assert "Traceback" not in p.output
    finally:
        a.close()


def test_a_reload_keeps_a_down_upstream_down(tmp_path):
    """HUP restarts the checker; it takes the published states over, so the
    down upstream gets no client request and is not announced down again."""
    a, b = App("a"), App("b")
    conf = tmp_path / "httptp.conf"
    conf.write_text("outHealthCheckInterval = 100ms\n")
    try:
        with HttpTp(f"-config={conf}", f"-out={a.addr},{b.addr}", "-outType=http",
                    "-outHealthCheck=/health", "-outHealthCheckTimeout=1s", workers=1) as p:
            a.sick = True
            assert wait_until(lambda: f"upstream {a.addr} is down" in p.output), p.output
            conf.write_text("outHealthCheckInterval = 150ms\n")
            mark = len(a.events)
            p.signal(signal.SIGHUP)
            assert wait_until(lambda: "reloaded:" in p.output), p.output
            assert wait_until(lambda: len(re.findall(r"health helper \(pid \d+\) started",
                                                     p.output)) == 2), p.output
            assert wait_until(lambda: a.events[mark:].count(("health", True)) >= 4)
            results = [request(p) for _ in range(20)]
            assert results == [(200, b"b")] * 20
            assert a.clients(mark) == 0
            assert p.output.count(f"upstream {a.addr} is down") == 1, p.output
        assert "Traceback" not in p.output
    finally:
        a.close()
        b.close()
