"""The status page of the real `httptp` (-expvarAddr /): without JavaScript, and
live in headless Chromium (Debian's `chromium`, installed by `make test-deps`)
driven over the DevTools protocol."""

from __future__ import annotations

import http.client
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from tests.helpers import HttpTp, Upstream, dead_address, get, wait_until
from tests.unit.test_statuspage import parse

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def stats_port(p: HttpTp) -> int:
    assert wait_until(lambda: "stats on http://" in p.output), p.output
    return int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))


def fetch(port: int, path: str):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()



def requests_through(p: HttpTp, n: int) -> None:
    for _ in range(n):
        c = http.client.HTTPConnection(p.host, p.port, timeout=5)
        try:
            assert get(c)[0] == 200
        finally:
            c.close()


def upstream_states(port: int) -> dict[str, str]:
    doc = json.loads(fetch(port, "/status.json")[1])
    return {u["address"]: u["state"] for u in doc["upstreams"]}


def start_with_a_dead_upstream(up: Upstream, dead: str) -> HttpTp:
    """httptp with one live and one dead upstream; the dead one ejected at its
    first failure (and for long enough that it stays so during the test)."""
    return HttpTp(f"-out={up.addr},{dead}", "-outType=http", "-expvarAddr=127.0.0.1:0",
                  "-outMaxFails=1", "-outFailTimeout=120s", workers=1)


def eject(p: HttpTp, port: int, dead: str) -> None:
    """Requests until the balancer has tried (and ejected) the dead upstream."""
    for _ in range(50):
        requests_through(p, 2)
        if upstream_states(port).get(dead) in ("down", "ejected"):
            return
    raise AssertionError(f"{dead} never ejected: {fetch(port, '/status.json')[1]!r}")


def test_page_without_javascript_shows_the_tables():
    up, dead = Upstream(), dead_address()
    try:
        with start_with_a_dead_upstream(up, dead) as p:
            port = stats_port(p)
            eject(p, port, dead)
            status, body = fetch(port, "/")
            assert status == 200
            page = parse(body)
            workers = page.tables["workers"]
            assert len(workers) == 1 and workers[0]["state"] == "ready", workers
            assert int(workers[0]["requests"]) >= 2
            rows = {r["address"]: r for r in page.tables["upstreams"]}
            assert rows[up.addr]["_state"] == "up" and int(rows[up.addr]["requests"]) >= 2
            assert rows[dead]["_state"] in ("down", "ejected")
            assert rows[dead]["failures"] != "0"
            assert f"{p.host}:{p.port}".encode() in body           # -in as bound
    finally:
        up.close()


def test_status_json_of_a_running_httptp():
    up, dead = Upstream(), dead_address()
    try:
        with start_with_a_dead_upstream(up, dead) as p:
            port = stats_port(p)
            requests_through(p, 3)
            doc = json.loads(fetch(port, "/status.json")[1])
            assert doc["in"]["addr"] == f"{p.host}:{p.port}" and doc["in"]["type"] == "http"
            assert doc["out"] == {"addrs": [up.addr, dead], "type": "http"}
            assert [w["state"] for w in doc["workers"]] == ["ready"]
            assert doc["teleport"] is None and doc["uptime"] >= 0
            assert {u["address"] for u in doc["upstreams"]} == {up.addr, dead}
            # the helper samples every second: the chart gets a history
            assert wait_until(lambda: len(json.loads(fetch(port, "/status.json")[1])
                                          ["history"]["samples"]) >= 2, timeout=10)
    finally:
        up.close()


def test_a_reload_changing_out_shows_the_new_upstreams(tmp_path):
    """HUP with a new -out: the stats helper restarts with it (the chart starts
    over); the dropped upstream leaves the table once nothing is in flight."""
    a, b = Upstream(name="a"), Upstream(name="b")
    conf = tmp_path / "httptp.conf"
    conf.write_text(f"out = {a.addr}\noutType = http\n")
    try:
        with HttpTp(f"-config={conf}", "-expvarAddr=127.0.0.1:0", workers=1) as p:
            port = stats_port(p)
            assert list(upstream_states(port)) == [a.addr]
            browser = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            browser.request("GET", "/status.json")          # a keep-alive poller stays connected
            assert browser.getresponse().read()
            conf.write_text(f"out = {b.addr}\noutType = http\n")
            p.signal(signal.SIGHUP)

            def shows_b():
                doc = json.loads(fetch(port, "/status.json")[1])
                return doc["out"]["addrs"] == [b.addr] and list(upstream_states(port)) == [b.addr]
            assert wait_until(shows_b, timeout=20), (fetch(port, "/status.json"), p.output)
            assert "stats helper" in p.output and "did not stop in time" not in p.output, p.output
            browser.close()
    finally:
        a.close()
        b.close()


# -- in a real browser ---------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol (a websocket)."""

    def __init__(self):
        from websockets.sync.client import connect
        self.profile = tempfile.mkdtemp(prefix="httptp-chromium-")
        self.stack = contextlib.ExitStack()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.ids = 0
        try:
            active = os.path.join(self.profile, "DevToolsActivePort")
            assert wait_until(lambda: os.path.exists(active) and
                              open(active).read().count("\n") >= 1, timeout=30), \
                "chromium did not open its DevTools port"
            port = int(open(active).read().split()[0])
            targets = json.loads(fetch(port, "/json/list")[1])
            page = next(t for t in targets if t["type"] == "page")
            self.ws = self.stack.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params) -> dict:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        for _ in range(1000):                     # skip events until our answer
            msg = json.loads(self.ws.recv(timeout=15))
            if msg.get("id") == self.ids:
                assert "error" not in msg, msg
                return msg["result"]
        raise AssertionError(f"no answer to {method}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self):
        self.stack.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


DOM_STATE = """JSON.stringify({
  polls: +document.body.getAttribute("data-polls"),
  live: document.getElementById("live").textContent,
  upstreams: Array.from(document.querySelectorAll("#upstreams-body tr")).map(function(tr){
    var row = {state: tr.getAttribute("data-state")};
    tr.querySelectorAll("td").forEach(function(td){row[td.getAttribute("data-col")] = td.textContent;});
    return row;}),
  workers: document.querySelectorAll("#workers-body tr").length,
  requests: document.getElementById("requests").textContent,
  chart: document.getElementById("line-req").getAttribute("points")})"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `make test-deps` installs "
                    "Debian's chromium where apt is usable (root)")
def test_live_page_in_headless_chromium():
    up, dead = Upstream(), dead_address()
    browser = None
    try:
        with start_with_a_dead_upstream(up, dead) as p:
            port = stats_port(p)
            eject(p, port, dead)
            browser = Chromium()
            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")

            def dom():
                try:
                    return json.loads(browser.evaluate(DOM_STATE) or "null")
                except AssertionError:            # the page is still loading
                    return None

            assert wait_until(lambda: (dom() or {}).get("polls", 0) >= 1, timeout=30), dom()
            before = dom()
            rows = {r["address"]: r for r in before["upstreams"]}
            assert rows[dead]["state"] in ("down", "ejected"), before
            assert rows[up.addr]["state"] == "up" and before["workers"] == 1, before
            assert before["live"].startswith("live: updated"), before
            seen = int(rows[up.addr]["requests"].replace(",", ""))

            requests_through(p, 5)

            def moved():
                now = dom()
                if not now or now["polls"] <= before["polls"]:
                    return False
                row = {r["address"]: r for r in now["upstreams"]}[up.addr]
                return int(row["requests"].replace(",", "")) >= seen + 5
            assert wait_until(moved, timeout=30, step=0.3), (before, dom())
            after = dom()
            assert {r["address"]: r for r in after["upstreams"]}[dead]["state"] in ("down", "ejected")
            assert after["chart"], after                 # the chart has points
    finally:
        if browser is not None:
            browser.close()
        up.close()
