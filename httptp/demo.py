"""`make run`: a teleport chain on one machine, and the bandwidth it saves.

    curl ─▶ A: httptp http → teleport ─▶ [relay: counts the teleport leg] ─▶
            B: httptp teleport → http ─▶ [relay: counts plain HTTP] ─▶ bidder

The bidder is a small RTB-like upstream (JSON bid requests in, a bid or a 204
no-bid out).  The demo first pushes a bounded burst of bid requests through the
chain and prints what crossed each leg, then keeps serving until Ctrl-C, with a
line whenever traffic moved.  A listens on 127.0.0.1:8080 (DEMO_IN) with its
stats on 127.0.0.1:8040 (DEMO_STATS: /expvar, /prometheus), the codec is zstd
(DEMO_CODEC).  Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from httptp.relay import Relay

BURST = 2000            # requests in the opening burst
BURST_CLIENTS = 16


class _Bidder(BaseHTTPRequestHandler):
    """Answers a bid for ~40% of requests, 204 otherwise (as exchanges do)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            req = {}
        if not req or hash(req.get("id", "")) % 5 >= 2:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        imp = (req.get("imp") or [{}])[0]
        bid = {"id": req.get("id"), "seatbid": [{"seat": "demo", "bid": [{
            "id": "%x" % random.getrandbits(48), "impid": imp.get("id", "1"),
            "price": round(random.uniform(0.1, 3.0), 4), "crid": "creative-%d" % random.randint(1, 40),
            "adomain": ["brand%d.example" % random.randint(1, 30)],
            "adm": "<a href=\"https://click.example/c?%x\"><img src=\"https://cdn.example/%d.png\"></a>"
                   % (random.getrandbits(64), random.randint(1, 999))}]}], "cur": "USD"}
        self._send(200, json.dumps(bid).encode(), "application/json")

    def do_GET(self):
        self._send(200, json.dumps({"path": self.path, "client_ip": self.headers.get("X-Real-IP", ""),
                                    "served_by": "demo bidder"}).encode() + b"\n", "application/json")

    def _send(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


_DOMAINS = ["news%d.example" % i for i in range(40)]
_AGENTS = ["Mozilla/5.0 (Linux; Android %d; SM-G99%d) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/1%02d.0.0.0 Mobile Safari/537.36" % (10 + i % 5, i, 10 + i) for i in range(15)]


def bid_request(rng: random.Random) -> bytes:
    """An OpenRTB 2.5-shaped bid request of ~1–1.5 KB."""
    domain = rng.choice(_DOMAINS)
    return json.dumps({
        "id": "%032x" % rng.getrandbits(128),
        "imp": [{"id": "1", "tagid": "slot-%d" % rng.randint(1, 20),
                 "banner": {"w": rng.choice([300, 320, 728]), "h": rng.choice([50, 90, 250])},
                 "bidfloor": round(rng.uniform(0.05, 1.5), 4), "bidfloorcur": "USD", "secure": 1}],
        "site": {"id": "%d" % rng.randint(1000, 9999), "domain": domain,
                 "page": "https://%s/%s/%d.html" % (domain, rng.choice(["sport", "tech", "world"]),
                                                    rng.randint(1, 10 ** 6)),
                 "publisher": {"id": "pub-%d" % rng.randint(1, 300)}},
        "device": {"ua": rng.choice(_AGENTS), "ip": "%d.%d.%d.%d" % tuple(rng.randint(1, 254) for _ in range(4)),
                   "geo": {"country": rng.choice(["USA", "DEU", "FRA", "GBR", "BRA"]),
                           "lat": round(rng.uniform(-60, 60), 4), "lon": round(rng.uniform(-120, 120), 4)},
                   "devicetype": 4, "os": "Android", "language": rng.choice(["en", "de", "fr"])},
        "user": {"id": "%024x" % rng.getrandbits(96), "buyeruid": "%016x" % rng.getrandbits(64)},
        "at": 1, "tmax": 120, "cur": ["USD"], "regs": {"ext": {"gdpr": rng.randint(0, 1)}},
    }).encode()


def _burst(host: str, port: int) -> tuple[int, int, float]:
    """POST BURST bid requests over keep-alive connections; (ok, failed, seconds)."""
    ok = failed = 0
    lock = threading.Lock()
    tickets = iter(range(BURST))

    def client(seed):
        nonlocal ok, failed
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while True:
            with lock:
                if next(tickets, None) is None:
                    break
            try:
                conn.request("POST", "/openrtb2/auction", body=bid_request(rng),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                good = r.status in (200, 204)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
                good = False
            with lock:
                ok, failed = ok + good, failed + (not good)
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(BURST_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return ok, failed, time.monotonic() - t0


def _start(exe: str, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([exe, "-in=127.0.0.1:0", *args] if not any(a.startswith("-in=") for a in args)
                            else [exe, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (\S+) pid=", line)
        if m:
            threading.Thread(target=_echo, args=(proc.stderr,), daemon=True).start()
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    raise SystemExit(f"demo: httptp did not start: {' '.join(args)}")


def _echo(stream) -> None:
    for line in stream:
        if "ready" not in line and "worker" not in line:
            sys.stderr.write(line)


def _report(plain: Relay, tele: Relay) -> str:
    ratio = plain.total_bytes / tele.total_bytes if tele.total_bytes else 0.0
    return (f"plain HTTP {plain.total_bytes:>12,} B   teleport {tele.total_bytes:>11,} B   "
            f"saved {100 * (1 - 1 / ratio) if ratio else 0:5.1f}%  ({ratio:.1f}x smaller)")


def main() -> int:
    in_addr = os.environ.get("DEMO_IN", "127.0.0.1:8080")
    codec = os.environ.get("DEMO_CODEC", "zstd")
    stats_addr = os.environ.get("DEMO_STATS", "127.0.0.1:8040")
    bidder = ThreadingHTTPServer(("127.0.0.1", 0), _Bidder)
    bidder.daemon_threads = True
    threading.Thread(target=bidder.serve_forever, daemon=True).start()
    plain = Relay("127.0.0.1:%d" % bidder.server_address[1])
    exe = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
    procs = []
    try:
        b, b_addr = _start(exe, "-inType=teleport", f"-inCompress={codec}", "-outType=http",
                           f"-out={plain.addr}", "-workers=1", "-expvarAddr=")
        procs.append(b)
        tele = Relay(b_addr)
        a, a_addr = _start(exe, f"-in={in_addr}", "-outType=teleport", f"-outCompress={codec}",
                           f"-out={tele.addr}", "-clientIPHeader=X-Real-IP", "-workers=2",
                           f"-expvarAddr={stats_addr}")
        procs.append(a)
        host, _, port = a_addr.rpartition(":")
        print(f"demo: chain up: client → A {a_addr} (http → teleport, {codec}) → B {b_addr} "
              f"(teleport → http) → bidder", flush=True)
        print(f"demo: sending {BURST} RTB-like bid requests through it ...", flush=True)
        ok, failed, took = _burst(host, int(port))
        print(f"demo: {ok} answered, {failed} failed in {took:.1f}s", flush=True)
        print(f"demo: {_report(plain, tele)}", flush=True)
        print(f"demo: serving; try   curl -i http://{a_addr}/hello   (Ctrl-C stops)", flush=True)
        last = (plain.total_bytes, tele.total_bytes)
        while all(p.poll() is None for p in procs):
            time.sleep(2)
            now = (plain.total_bytes, tele.total_bytes)
            if now != last:
                print(f"demo: {_report(plain, tele)}", flush=True)
                last = now
        return 1
    except KeyboardInterrupt:
        print(f"\ndemo: stopping. {_report(plain, tele) if len(procs) == 2 else ''}", flush=True)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
        bidder.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
