"""Bytes on the wire: plain HTTP against teleport, on OpenRTB-like traffic.

    load → relay1 → A (http in, teleport out) → relay2 → B (teleport in, http out) → bidder

One chain per codec and delay.  relay1 counts the plain HTTP bytes and relay2
the teleport bytes (handshake included), both ways, on the same kind of socket.
The bidder (bench/rtb.py, its own process) answers ~60% 204 no-bid, else a
~500-900 byte bid.  Printed as a Markdown table with req/s and the CPU seconds
of both httptp (master and workers, from /proc).  Afterwards the plain teleport
stream of the `none` run is replayed through each codec at several levels, to
show what the level costs and buys.  `make bench-bandwidth` runs it.
Traffic stays on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rtb  # noqa: E402

from httptp.relay import Relay  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LISTEN_RE = re.compile(r"listening on (\S+?):(\d+)")
HANDSHAKE = 15                       # "httpteleport" + version, codec, flags
CAPTURE_LIMIT = 32 * 1024 * 1024     # bytes of plain teleport stream kept for the replay


# --------------------------------------------------------------------------- processes

class Proc:
    """A child that prints ``listening on HOST:PORT`` on stdout or stderr."""

    def __init__(self, args, name):
        self.name = name
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.addr = None
        ready = threading.Event()

        def read():
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if len(self.lines) < 1000:
                    self.lines.append(line)
                m = LISTEN_RE.search(line)
                if m and not ready.is_set():
                    self.addr = f"{m.group(1)}:{m.group(2)}"
                    ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(15):
            self.stop()
            raise SystemExit(f"bench: {name} did not start:\n" + "\n".join(self.lines[-20:]))

    def cpu_seconds(self) -> float:
        """utime+stime of this process, its live children and its reaped ones."""
        pids = [self.proc.pid]
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                 text=True, timeout=5).stdout
            pids += [int(p) for p in out.split()]
        except (OSError, subprocess.TimeoutExpired):
            pass
        ticks = 0
        for i, pid in enumerate(pids):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])          # utime, stime
            if i == 0:
                ticks += int(fields[13]) + int(fields[14])      # cutime, cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# --------------------------------------------------------------------------- load

def load(addr: str, bodies: list[bytes], threads: int, seconds: float) -> dict:
    """POST every body once over ``threads`` keep-alive connections, within
    ``seconds``.  A 200 must be a bid for the same request id; 204 is a no-bid."""
    host, _, port = addr.rpartition(":")
    lock = threading.Lock()
    tickets = iter(range(len(bodies)))
    res = {"done": 0, "bids": 0, "nobids": 0, "failed": 0, "errors": []}
    deadline = time.monotonic() + seconds

    def fail(msg):
        with lock:
            res["failed"] += 1
            if len(res["errors"]) < 10:
                res["errors"].append(msg)

    def run():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                i = next(tickets, None)
            if i is None:
                break
            body = bodies[i]
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("POST", "/openrtb2/auction", body=body, headers=rtb.HEADERS)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                fail(f"request {i}: {e!r}")
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if r.status == 204 and not data:
                with lock:
                    res["done"] += 1
                    res["nobids"] += 1
            elif r.status == 200 and json.loads(data)["id"] == json.loads(body)["id"]:
                with lock:
                    res["done"] += 1
                    res["bids"] += 1
            else:
                fail(f"request {i}: {r.status} {data[:200]!r}")
        if conn is not None:
            conn.close()

    ts = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()) + 15)
    res["seconds"] = time.monotonic() - t0
    return res


# --------------------------------------------------------------------------- one chain

def run_chain(httptp, bidder_addr, codec, delay, bodies, args, capture=False) -> dict:
    b = Proc([httptp, "-inType=teleport", "-in=127.0.0.1:0", "-outType=http", f"-out={bidder_addr}",
              f"-inCompress={codec}", f"-inDelay={delay}", "-workers=1", "-expvarAddr="], "B")
    tele = Relay(b.addr, capture_limit=CAPTURE_LIMIT if capture else 0)
    a = None
    plain = None
    try:
        a = Proc([httptp, "-in=127.0.0.1:0", "-outType=teleport", f"-out={tele.addr}",
                  f"-outCompress={codec}", f"-outDelay={delay}", "-workers=1", "-expvarAddr="], "A")
        plain = Relay(a.addr)
        cpu0 = a.cpu_seconds() + b.cpu_seconds()
        res = load(plain.addr, bodies, args.concurrency, args.seconds)
        time.sleep(0.3)                   # let the last bytes cross the relays
        cpu_a, cpu_b = a.cpu_seconds(), b.cpu_seconds()
        res.update(cpu=cpu_a + cpu_b - cpu0, cpu_a=cpu_a, cpu_b=cpu_b,
                   plain={"up": plain.up_bytes, "down": plain.down_bytes},
                   tele={"up": tele.up_bytes, "down": tele.down_bytes}, tele_conns=tele.connections,
                   capture=tele.capture)
        res["log"] = [ln for ln in a.lines + b.lines
                      if "Traceback" in ln or "rror" in ln or " 50" in ln][:10]
        return res
    finally:
        if plain:
            plain.close()
        if a:
            a.stop()
        b.stop()
        tele.close()


# --------------------------------------------------------------------------- codec replay

def replay(capture: dict) -> list[tuple]:
    """Feed the captured plain teleport stream (each relay read = one batch)
    through every codec at several levels, flushing per batch."""
    from httptp.teleport.codecs import compressor
    from httptp.teleport.handshake import Compress
    rows = []
    plans = [("flate", Compress.FLATE, (1, 6, 9)), ("snappy", Compress.SNAPPY, (None,)),
             ("zstd", Compress.ZSTD, (1, 3, 5, 6, 9)), ("brotli", Compress.BROTLI, (4, 5, 6))]
    for way in ("up", "down"):
        batches = list(capture[way])
        head = b"".join(batches)[:HANDSHAKE]
        first = batches[0][HANDSHAKE:] if len(batches[0]) > HANDSHAKE else b""
        batches = ([first] if first else []) + batches[1:]
        assert head.startswith(b"httpteleport")
        plain = sum(len(x) for x in batches)
        for name, c, levels in plans:
            for level in levels:
                comp = compressor(c, level)
                t0 = time.process_time()
                out = 0
                for x in batches:
                    out += len(comp.compress(x)) + len(comp.flush())
                cpu = time.process_time() - t0
                rows.append((way, name, level, len(batches), plain, out, cpu))
    return rows


# --------------------------------------------------------------------------- main

def fmt_delay(d: str) -> str:
    return "0" if d in ("0", "0ms", "0s") else d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--codecs", default="none,flate,snappy,zstd,brotli")
    ap.add_argument("--delays", default="0,5ms")
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap of each run's load")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-replay", action="store_true", help="skip the codec-level replay")
    args = ap.parse_args()
    httptp = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
    traffic = rtb.Traffic(args.seed)
    bodies = [traffic.request() for _ in range(args.requests)]
    sizes = sorted(len(x) for x in bodies)
    bidder = Proc([sys.executable, os.path.join(HERE, "rtb.py"), "serve"], "bidder")
    results = []
    captures = {}
    try:
        for delay in args.delays.split(","):
            for codec in args.codecs.split(","):
                t0 = time.monotonic()
                res = run_chain(httptp, bidder.addr, codec, delay, bodies, args,
                                capture=codec == "none" and not args.no_replay)
                cap = res.pop("capture")
                if cap:
                    captures[delay] = cap
                results.append((codec, delay, res))
                p, t = res["plain"], res["tele"]
                print(f"  {codec:6} delay={fmt_delay(delay):4} {res['done']:6} ok "
                      f"({res['bids']} bids) {res['failed']} failed, {res['done'] / res['seconds']:7,.0f} "
                      f"req/s, plain {p['up'] + p['down']:,} B, teleport {t['up'] + t['down']:,} B "
                      f"over {res['tele_conns']} conn, cpu A {res['cpu_a']:.1f}s B {res['cpu_b']:.1f}s, "
                      f"{time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
                for e in res["errors"] + res["log"]:
                    print(f"    ! {e}", file=sys.stderr)
    finally:
        bidder.stop()

    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({platform.machine()}), "
          f"Python {platform.python_version()}, {args.requests} requests, {args.concurrency} "
          f"keep-alive connections, -workers=1 for A and B.\nRequest bodies: min {sizes[0]}, "
          f"median {sizes[len(sizes) // 2]}, mean {statistics.mean(sizes):.0f}, max {sizes[-1]} "
          f"bytes; ~60% of answers are 204.\n")
    print("| codec | delay | requests | req/s | plain bytes/req | teleport bytes/req "
          "| ratio req / resp / total | CPU s A+B per 10K req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for codec, delay, r in results:
        n = max(r["done"] + r["failed"], 1)
        p, t = r["plain"], r["tele"]
        pt, tt = p["up"] + p["down"], t["up"] + t["down"]
        fails = f" ({r['failed']} failed)" if r["failed"] else ""
        print(f"| {codec} | {fmt_delay(delay)} | {r['done']:,}{fails} | {r['done'] / r['seconds']:,.0f} "
              f"| {pt / n:,.0f} | {tt / n:,.0f} | {p['up'] / max(t['up'], 1):.1f} / "
              f"{p['down'] / max(t['down'], 1):.1f} / {pt / max(tt, 1):.2f} "
              f"| {r['cpu'] / n * 10000:.2f} |")

    for delay, cap in captures.items():
        if not cap:
            continue
        rows = replay(cap)
        print(f"\nReplay of the plain teleport stream (codec none, delay {fmt_delay(delay)}), "
              f"one flush per relay read; compressor CPU only, this process:\n")
        print("| direction | codec | level | batches | plain bytes/batch | ratio | compress us/batch |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for way, name, level, nb, plain, out, cpu in rows:
            print(f"| {'requests' if way == 'up' else 'responses'} | {name} | "
                  f"{'-' if level is None else level} | {nb:,} | {plain / nb:,.0f} | "
                  f"{plain / max(out, 1):.2f} | {cpu / nb * 1e6:.1f} |")
    failed = sum(r["failed"] for _, _, r in results)
    if failed:
        print(f"\nbench: {failed} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
