"""`make run` runs `python -m httptp.demo`: a load phase per codec with live lines,
a summary table, then the zstd chain serving until Ctrl-C."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.helpers import wait_until

CODECS = ("zstd", "flate")
# e.g. "zstd   █████░░░░░  51%  1394 req/s  p99 11.2 ms  saved 84.8%: 1.63 MB → 248 kB"
LIVE = re.compile(r"^(\w+)\s+\S+\s+(\d+%|done)\s+(\d+) req/s\s+p99\s+([\d.]+) ms\s+saved\s+([\d.]+)%: ")
# e.g. "zstd       2,849      0    1420     5.3    11.3       1,137            173   6.6x   84.8%"
ROW = re.compile(r"^(\w+)\s+([\d,]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x\s+([\d.]+)%$")


@pytest.mark.timeout(60)
def test_demo_shows_the_bandwidth_saved_and_stops_on_ctrl_c():
    env = dict(os.environ, DEMO_IN="127.0.0.1:0", DEMO_STATS="127.0.0.1:0", DEMO_SECONDS="2",
               DEMO_CODECS=",".join(CODECS))
    proc = subprocess.Popen([sys.executable, "-m", "httptp.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline and not any("serving (zstd)" in l for l in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        out = "".join(lines)
        assert "serving (zstd)" in out, out
        assert "open-file limit" not in out, out      # the demo's -concurrency fits

        live = [m.groups() for m in map(LIVE.match, lines) if m]
        for codec in CODECS:
            mine = [g for g in live if g[0] == codec]
            assert any(g[1].endswith("%") for g in mine), f"no per-second line for {codec}:\n{out}"
            assert any(g[1] == "done" for g in mine), f"no closing line for {codec}:\n{out}"
            assert all(int(g[2]) > 0 and float(g[3]) > 0 for g in mine), out

        rows = {m.group(1): m.groups() for m in map(ROW.match, (l.rstrip("\n") for l in lines)) if m}
        assert set(rows) == set(CODECS), out
        for codec, (_, requests, failed, rps, p50, p99, plain, tele, ratio, saved) in rows.items():
            assert int(requests.replace(",", "")) > 100, out
            assert int(failed) == 0, out
            assert float(p50) <= float(p99), out
            assert int(plain.replace(",", "")) > int(tele.replace(",", "")), out
        assert float(rows["zstd"][8]) > 3, out
        assert float(rows["zstd"][9]) > 66, out

        # the chain left serving answers curl, and its stats server is up
        addr = re.search(r"curl -i http://(\S+)/hello", out).group(1)
        host, _, port = addr.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        assert resp.status == 200 and b"demo bidder" in resp.read()
        conn.close()
        stats = re.search(r"stats: (http://\S+)/expvar", out).group(1)
        with urllib.request.urlopen(stats + "/expvar", timeout=10) as r:
            assert r.status == 200

        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C reaches the whole group
        assert proc.wait(20) == 0, "".join(lines)
        time.sleep(0.2)
        assert "Traceback" not in "".join(lines), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _start_demo() -> tuple[subprocess.Popen, list[str]]:
    """The demo in a session of its own, one short phase; returns once it serves."""
    env = dict(os.environ, DEMO_IN="127.0.0.1:0", DEMO_STATS="127.0.0.1:0", DEMO_SECONDS="0.5",
               DEMO_CODECS="zstd")
    proc = subprocess.Popen([sys.executable, "-m", "httptp.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    assert wait_until(lambda: any("serving (zstd)" in l for l in lines) or proc.poll() is not None,
                      timeout=30), "".join(lines)
    assert proc.poll() is None, "".join(lines)
    return proc, lines


def _the_rest_of_the_group(pgid: int) -> list[int]:
    """The httptp workers and helpers, then the masters, of the demo's process
    group: in that order, no process exits before it got its signal (a
    master's SIGINT stops its workers; theirs is ignored)."""
    def pids(*args):
        out = subprocess.run(["pgrep", *args], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]
    masters = pids("-P", str(pgid))
    return [pid for pid in pids("-g", str(pgid)) if pid != pgid and pid not in masters] + masters


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", ["httptp", "demo"])
def test_ctrl_c_ends_the_demo_with_0_whichever_process_sees_it_first(first):
    """The two orders a Ctrl-C to the group can take, made deterministic: the
    second process gets its SIGINT only after the demo has reacted to the first."""
    proc, lines = _start_demo()
    try:
        if first == "httptp":
            others = _the_rest_of_the_group(proc.pid)
            assert others
            for pid in others:
                os.kill(pid, signal.SIGINT)
            # the demo sees its httptp exit before its own SIGINT comes
            assert wait_until(lambda: "demo: httptp" in "".join(lines), timeout=20), "".join(lines)
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
            assert wait_until(lambda: "demo: stopping." in "".join(lines), timeout=20), "".join(lines)
            os.killpg(proc.pid, signal.SIGINT)      # the rest of the group gets it late
        assert proc.wait(30) == 0, "".join(lines)
        assert wait_until(lambda: not _the_rest_of_the_group(proc.pid)), "".join(lines)
        assert "Traceback" not in "".join(lines), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
