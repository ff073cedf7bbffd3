"""`make run`: a teleport chain on one machine, and the bandwidth it saves.

    clients ─▶ A: httptp http → teleport ─▶ [relay: counts the teleport leg] ─▶
               B: httptp teleport → http ─▶ [relay: counts plain HTTP] ─▶ bidder

The bidder is a small RTB-like upstream (JSON bid requests in, a bid or a 204
no-bid out).  For each codec (DEMO_CODECS, default zstd first, then flate,
snappy, brotli, none) the demo starts a fresh A/B pair of real `httptp`
processes on the same bidder and drives it for DEMO_SECONDS (default 4 s, at
most DEMO_REQUESTS requests) with DEMO_CLIENTS keep-alive client threads
posting bid requests.  Every second it prints a live line: codec, progress,
req/s and p99 latency over the last second, and the bytes saved on the
teleport leg so far.  Then a summary table per codec, and the DEMO_CODEC
(zstd) chain keeps serving on DEMO_IN (127.0.0.1:8080) with its stats on
DEMO_STATS (127.0.0.1:8040: /expvar, /prometheus) until Ctrl-C.
Everything stays on 127.0.0.1 and every phase is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from httptp.relay import Relay

CODECS = ("zstd", "flate", "snappy", "brotli", "none")
SECONDS = 4.0           # load per codec
MAX_REQUESTS = 20000    # and at most this many requests per codec
CLIENTS = 8             # keep-alive client threads
BAR = 10                # progress bar width


class _Bidder(BaseHTTPRequestHandler):
    """Answers a bid for ~40% of requests, 204 otherwise (as exchanges do)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # headers and body go out in two writes

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


# ---------------------------------------------------------------- httptp pairs

# httptp's routine chatter; anything else it says (errors, warnings) is shown.
_QUIET = re.compile(r"httptp: (worker |ready|stats |graceful stop|fast stop|stopped:|listening on)")


def _echo(stream, chain: "_Chain") -> None:
    for line in stream:
        m = re.search(r"stats on (http://\S+?)/expvar", line)
        if m:
            chain.stats_url = m.group(1)
        if not _QUIET.search(line):
            sys.stderr.write(line)


def _start(exe: str, chain: "_Chain", *args: str) -> tuple[subprocess.Popen, str]:
    """Start one httptp; return it and its listen address once its workers are ready."""
    if not any(a.startswith("-in=") for a in args):
        args = ("-in=127.0.0.1:0", *args)
    proc = subprocess.Popen([exe, *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chain.procs.append(proc)
    addr = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:                # EOF: httptp is gone, or going
            _check_exit(proc, 5.0, "while starting")
            break
        m = re.search(r"listening on (\S+) pid=", line)
        if m:
            addr = m.group(1)
        m = re.search(r"stats on (http://\S+?)/expvar", line)
        if m:
            chain.stats_url = m.group(1)
        if addr and line.startswith("httptp: ready"):
            threading.Thread(target=_echo, args=(proc.stderr, chain), daemon=True).start()
            return proc, addr
        if not _QUIET.search(line) and line:
            sys.stderr.write(line)
    raise SystemExit(f"demo: httptp did not start: {' '.join(args)}")


class _Stopped(Exception):
    """An httptp of ours exited with status 0: it was told to stop (TERM, INT or
    QUIT), which is what a Ctrl-C to the process group does when httptp sees
    it before the demo does.  The demo then stops as it does on its own Ctrl-C."""


def _check_exit(proc: subprocess.Popen, wait: float, when: str, who: str = "httptp") -> None:
    """Raise if ``proc`` exited (waiting up to ``wait`` s for it): ``_Stopped``
    for a stop (status 0), SystemExit naming the status for anything else."""
    try:
        code = proc.wait(wait) if wait else proc.poll()
    except subprocess.TimeoutExpired:
        return
    if code == 0:
        raise _Stopped()
    if code is not None:
        how = f"status {code}" if code > 0 else f"signal {-code}"
        raise SystemExit(f"demo: {who} exited with {how} {when}")


def _concurrency(workers: int) -> int:
    """A -concurrency whose share per worker fits under RLIMIT_NOFILE (httptp
    raises its soft limit to the hard one), so that httptp has no open-file
    warning to print: its default of 100,000 seldom fits, and the demo's load
    is a few hundred connections at most."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 100000
    return max(1, min(100000, (hard - 128) * workers))


class _Chain:
    """A → [teleport relay] → B → [plain relay] → bidder, for one codec."""

    def __init__(self, exe: str, codec: str, bidder: str, in_addr: str = "127.0.0.1:0", stats: str = ""):
        self.codec, self.procs, self.stats_url = codec, [], ""
        self.plain = Relay(bidder)
        self.tele = None
        _, b_addr = _start(exe, self, "-inType=teleport", f"-inCompress={codec}", "-outType=http",
                           f"-out={self.plain.addr}", "-workers=1", f"-concurrency={_concurrency(1)}",
                           "-expvarAddr=")
        self.b_addr = b_addr
        self.tele = Relay(b_addr)
        _, self.a_addr = _start(exe, self, f"-in={in_addr}", "-outType=teleport", f"-outCompress={codec}",
                                f"-out={self.tele.addr}", "-clientIPHeader=X-Real-IP", "-workers=2",
                                f"-concurrency={_concurrency(2)}", f"-expvarAddr={stats}")

    def check(self, when: str) -> None:
        """Raise ``_Stopped`` or SystemExit if one of the two httptp exited."""
        for p in self.procs:
            _check_exit(p, 0, when, f"httptp ({self.codec})")

    def bytes(self) -> tuple[int, int]:
        return self.plain.total_bytes, self.tele.total_bytes if self.tele else 0

    def stop(self) -> None:
        for p in reversed(self.procs):             # A first, then B
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.plain.close()
        if self.tele:
            self.tele.close()


# ------------------------------------------------------------------ the load

def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000 or unit == "MB":
            digits = 0 if unit == "B" or n >= 100 else 1 if n >= 10 else 2
            return f"{n:.{digits}f} {unit}"
        n /= 1000
    return ""


def _saved(plain: int, tele: int) -> str:
    pct = 100 * (1 - tele / plain) if plain else 0.0
    return f"plain {plain:>11,} B → teleport {tele:>10,} B  saved {pct:5.1f}%"


class _Load:
    """Keep-alive client threads posting bid requests until a deadline or a request cap."""

    def __init__(self, addr: str, seconds: float, cap: int, clients: int, stop: threading.Event):
        self.host, _, port = addr.rpartition(":")
        self.port = int(port)
        self.seconds, self.cap, self.stop = seconds, cap, stop
        self.lock = threading.Lock()
        self.issued = self.ok = self.failed = 0
        self.window: list[float] = []       # latencies (s) since the last tick
        self.all: list[float] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds
        self.threads = [threading.Thread(target=self._client, args=(random.randrange(1 << 30),), daemon=True)
                        for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                with self.lock:
                    if self.issued >= self.cap:
                        break
                    self.issued += 1
                body = bid_request(rng)
                t = time.perf_counter()
                try:
                    conn.request("POST", "/openrtb2/auction", body=body,
                                 headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    good = r.status in (200, 204)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                    good = False
                took = time.perf_counter() - t
                with self.lock:
                    if good:
                        self.ok += 1
                        self.window.append(took)
                        self.all.append(took)
                    else:
                        self.failed += 1
        finally:
            conn.close()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def tick(self) -> list[float]:
        with self.lock:
            w, self.window = self.window, []
        return w

    def progress(self) -> float:
        return min(1.0, max((time.monotonic() - self.t0) / self.seconds, self.issued / self.cap))


def _bar(frac: float) -> str:
    utf = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
    full, empty = ("█", "░") if utf else ("#", ".")
    n = int(round(frac * BAR))
    return full * n + empty * (BAR - n)


def _run_phase(chain: _Chain, seconds: float, cap: int, clients: int, stop: threading.Event,
               tty: bool) -> dict:
    p0, t0 = chain.bytes()
    load = _Load(chain.a_addr, seconds, cap, clients, stop)

    def line(frac, rate, p99, err, done=False):
        plain, tele = chain.bytes()
        plain, tele = plain - p0, tele - t0
        pct = 100 * (1 - tele / plain) if plain else 0.0
        text = (f"{chain.codec:<6} {_bar(frac)} {'done' if done else f'{100 * frac:3.0f}%'} "
                f"{rate:5.0f} req/s  p99 {1000 * p99:4.1f} ms  "
                f"saved {pct:4.1f}%: {_size(plain)} → {_size(tele)}" + (f"  {err} failed" if err else ""))
        if tty:
            return "\r" + text[:shutil.get_terminal_size((100, 24)).columns - 1] + "\x1b[K"
        return text + "\n"

    last = load.t0
    while True:
        while load.running() and time.monotonic() < last + 1.0:
            chain.check("during the load")
            time.sleep(0.02)
        if not load.running():
            break
        now = time.monotonic()
        if now >= load.deadline - 0.1 or load.issued >= load.cap:
            time.sleep(0.02)                   # ending: the phase's closing line follows
            continue
        w = load.tick()
        print(line(load.progress(), len(w) / (now - last), _pct(w, 0.99), load.failed), end="", flush=True)
        last = now
    took = time.monotonic() - load.t0
    plain, tele = chain.bytes()
    plain, tele = plain - p0, tele - t0
    res = {"codec": chain.codec, "ok": load.ok, "failed": load.failed, "seconds": took,
           "rps": load.ok / took if took else 0.0, "p50": _pct(load.all, 0.50), "p99": _pct(load.all, 0.99),
           "plain": plain, "tele": tele}
    if not stop.is_set():                      # the closing line: the whole phase
        print(line(1.0, res["rps"], res["p99"], load.failed, done=True) + ("\n" if tty else ""),
              end="", flush=True)
    return res


def _table(results: list[dict]) -> str:
    head = (f"{'codec':<7}{'requests':>9}{'failed':>7}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'plain B/req':>12}{'teleport B/req':>15}{'ratio':>7}{'saved':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        n = r["ok"] or 1
        ratio = r["plain"] / r["tele"] if r["tele"] else 0.0
        saved = 100 * (1 - r["tele"] / r["plain"]) if r["plain"] else 0.0
        rows.append(f"{r['codec']:<7}{r['ok']:>9,}{r['failed']:>7}{r['rps']:>8.0f}{1000 * r['p50']:>8.1f}"
                    f"{1000 * r['p99']:>8.1f}{r['plain'] / n:>12,.0f}{r['tele'] / n:>15,.0f}"
                    f"{ratio:>6.1f}x{saved:>7.1f}%")
    return "\n".join(rows)


# ------------------------------------------------------------------ the demo

def _env_number(name: str, default, kind):
    raw = os.environ.get(name, "")
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise SystemExit(f"demo: {name}={raw!r} is not a number")
    if value <= 0:
        raise SystemExit(f"demo: {name} must be positive")
    return value


class _StopSignals:
    """The SIGINT and SIGTERM handler: the first signal raises KeyboardInterrupt
    in the main thread; after it, or once ``stopping`` is set, signals do
    nothing, so a second Ctrl-C cannot cut the cleanup short.  (Switching to
    SIG_IGN would not do: ``signal.signal`` first runs a handler that is
    already pending, and that would raise in the middle of the cleanup.)"""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum, frame) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt


def _serve_until_stopped(serving: _Chain) -> None:
    """Check httptp every 0.1 s; every 2 s, the bytes saved if they changed.
    Returns only by raising: KeyboardInterrupt, ``_Stopped`` or SystemExit."""
    base = last = serving.bytes()
    report = time.monotonic() + 2
    while True:
        serving.check("while serving")
        time.sleep(0.1)
        if time.monotonic() >= report:
            report += 2
            now = serving.bytes()
            if now != last:
                print(f"demo: since serving: {_saved(now[0] - base[0], now[1] - base[1])}", flush=True)
                last = now


def main() -> int:
    stopper = _StopSignals()                    # TERM stops the demo like Ctrl-C
    signal.signal(signal.SIGINT, stopper)
    signal.signal(signal.SIGTERM, stopper)
    in_addr = os.environ.get("DEMO_IN", "127.0.0.1:8080")
    codec = os.environ.get("DEMO_CODEC", "zstd")
    stats_addr = os.environ.get("DEMO_STATS", "127.0.0.1:8040")
    default_codecs = ",".join([codec] + [c for c in CODECS if c != codec])
    codecs = [c.strip() for c in os.environ.get("DEMO_CODECS", default_codecs).split(",") if c.strip()]
    for c in [codec, *codecs]:
        if c not in CODECS:
            raise SystemExit(f"demo: unknown codec {c!r} (one of {', '.join(CODECS)})")
    seconds = _env_number("DEMO_SECONDS", SECONDS, float)
    cap = _env_number("DEMO_REQUESTS", MAX_REQUESTS, int)
    clients = min(_env_number("DEMO_CLIENTS", CLIENTS, int), 256)
    tty = sys.stdout.isatty()
    exe = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
    stop = threading.Event()
    bidder: ThreadingHTTPServer | None = None
    serving: _Chain | None = None           # the DEMO_CODEC chain on DEMO_IN: kept to the end
    chains: list[_Chain] = []
    results: list[dict] = []
    summarized = False

    def start_serving() -> _Chain:
        chain = _Chain(exe, codec, bidder_addr, in_addr, stats_addr)
        chains.append(chain)
        return chain

    began = time.monotonic()
    try:
        bidder = ThreadingHTTPServer(("127.0.0.1", 0), _Bidder)
        bidder.daemon_threads = True
        threading.Thread(target=bidder.serve_forever, daemon=True).start()
        bidder_addr = "127.0.0.1:%d" % bidder.server_address[1]
        print(f"demo: RTB-like bidder on {bidder_addr}; {len(codecs)} load phase(s) of {seconds:g} s "
              f"(≤{cap:,} requests) with {clients} keep-alive clients", flush=True)
        print("demo: chain per codec: clients → A (http → teleport) → [teleport leg] → "
              "B (teleport → http) → [plain leg] → bidder", flush=True)
        for c in codecs:
            if c == codec and serving is None:
                chain = serving = start_serving()
            else:
                chain = _Chain(exe, c, bidder_addr)
                chains.append(chain)
            results.append(_run_phase(chain, seconds, cap, clients, stop, tty))
            chain.check("during the load")
            if chain is not serving:
                chains.remove(chain)
                chain.stop()
        print(f"\ndemo: {len(results)} phase(s) in {time.monotonic() - began:.1f} s; bytes are counted "
              "on the wire of each leg, both directions", flush=True)
        print(_table(results), flush=True)
        summarized = True
        if serving is None:
            serving = start_serving()
        stats = serving.stats_url or ""
        print(f"\ndemo: serving ({codec}); try   curl -i http://{serving.a_addr}/hello   (Ctrl-C stops)",
              flush=True)
        if stats:
            print(f"demo: status page: {stats}/   stats: {stats}/expvar   {stats}/prometheus",
                  flush=True)
        _serve_until_stopped(serving)
        return 1                                # not reached: it returns by raising
    except (KeyboardInterrupt, _Stopped) as why:
        stopper.stopping = True                 # first: no KeyboardInterrupt from here on
        stop.set()
        print("\ndemo: httptp was stopped; stopping." if isinstance(why, _Stopped)
              else "\ndemo: stopping.", flush=True)
        if results and not summarized:
            print(_table(results), flush=True)
        return 0
    finally:
        stopper.stopping = True
        stop.set()
        for chain in chains:
            chain.stop()
        if bidder is not None:
            bidder.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
