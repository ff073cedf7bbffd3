"""`make bench`: httptp against nginx on the measurements of issues 6 and 11.

Every part runs against one nginx upstream (1 worker, answers from memory, so
it is never the bottleneck) and, where a ratio is asked for, against the
reference: nginx with 1 worker as a reverse proxy with a keep-alive upstream
pool, measured in the same run.

  1 http      wrk -t2 -c64 → proxy → upstream, GET of a ~2 KB JSON body: req/s,
              p50/p99 latency and CPU seconds per 10K requests of the proxy's
              worker processes, for httptp -workers 1 and 2 with each parser,
              for nginx, and for two ceilings: the bare gevent proxies with a
              greenlet per connection (bench/bare_proxy.py) and with callbacks
              on gevent's loop (bench/bare_callback_proxy.py).
  2 teleport  wrk → httptp A (http → teleport) → httptp B (teleport → http) →
              upstream, GET, for each codec and batching delay: req/s, latency,
              and the bytes on the teleport link per request (A's /expvar:
              out-side socket bytes) against the plain HTTP bytes (A's in-side).
  3 post      POST of ~1.5 KB OpenRTB bid requests (bench/rtb.py, seeded) to a
              bidder-like upstream (~60% 204, else a ~530 B bid): httptp http →
              http and the zstd chain, against nginx; link against plain bytes.
  4 idle      N (100,000) idle keep-alive client connections held on httptp
              (-workers: at least 2, and as many as RLIMIT_NOFILE needs for N)
              by bench/idle_conns.py: memory per connection (PSS of
              the workers with them minus before, over N), and req/s of 64 busy
              connections while they are held against without them.
  5 latency   p50/p99 at ~1K req/s (wrk -t1 -c10, 10 ms between requests on a
              connection) through httptp and nginx, and straight to the upstream.
  6 memory    growth of the worker's RSS (peak during minus before) of httptp
              -workers=1 for a 300 MiB response, a 100 MiB upload, the 300 MiB
              response to a slow reader, and a flate bomb on a teleport listener
              (bench/memory.py, its own upstream, no wrk, no nginx).
  7 rtbload   "RTB under load" (bench/rtb_load.py): POST of OpenRTB-like
              bodies through a teleport chain to an nginx answering 204, per codec
              and level and for auto: req/s, link ratio, CPU per request of A+B;
              its own section of docs/benchmarks.md and bench-rtb.png.

The machine is small and shared (wrk, nginx and the proxies share its cores),
so the rounds alternate between the targets, every figure is the median over
the rounds, and every ratio is the median of the per-round ratios to the nginx
run of the same round.  The summary goes to stdout and, as a Markdown section
between `<!-- bench:begin -->` and `<!-- bench:end -->`, into docs/benchmarks.md
(--output), with a plot beside it (bench.png).  Progress goes to stderr.

Traffic stays on 127.0.0.0/8, every run is bounded in time, and every process
started is stopped on the way out (see bench/harness.py).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import idle_conns  # noqa: E402
import memory  # noqa: E402
import rtb_load  # noqa: E402
import report  # noqa: E402
import rtb  # noqa: E402

PARTS = ("http", "teleport", "post", "idle", "latency", "memory", "rtbload")
NEEDS_NGINX = ("http", "teleport", "post", "idle", "latency", "rtbload")     # and wrk; memory needs neither
NGINX = "nginx (1 worker)"
BARE_GREENLETS = "bare gevent proxy, greenlets"      # bench/bare_proxy.py
BARE_CALLBACKS = "bare gevent proxy, callbacks"      # bench/bare_callback_proxy.py
POST_BODIES = 2000                 # distinct bid requests the wrk script cycles through
POST_PATH = "/openrtb2/auction"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- alternating wrk rounds

@dataclass
class Target:
    """Something wrk loads: its URL, the processes whose CPU it costs, and (for a
    teleport chain) the httptp whose /expvar counts plain and link bytes."""

    name: str
    url: str
    servers: list[h.Server]
    counters: h.Server | None = None

    @property
    def pids(self) -> list[int]:
        return [pid for s in self.servers for pid in s.workers]


@dataclass
class Run:
    """One wrk run on one target."""

    wrk: h.Wrk
    cpu: float                     # CPU seconds of the target's processes during the run
    plain: int = 0                 # bytes on the client ↔ A leg (A's in-side sockets)
    link: int = 0                  # bytes on the teleport leg (A's out-side sockets)
    proxied: int = 0               # requests A answered during the run


@dataclass
class Row:
    """A target's figures over all rounds."""

    name: str
    rps: float
    p50: float
    p99: float
    rps_ratio: float               # median of per-round req/s ratios to nginx
    p99_ratio: float
    cpu_10k: float                 # CPU seconds per 10,000 requests
    plain_req: float = 0.0         # plain bytes per request (chains only)
    link_req: float = 0.0          # teleport link bytes per request (chains only)
    errors: str = ""


def _bytes(server: h.Server) -> tuple[int, int, int]:
    v = h.expvar(server)
    return (v["inBytesRead"] + v["inBytesWritten"], v["outBytesRead"] + v["outBytesWritten"],
            v["inRequestSuccess"])


def measure(t: Target, seconds: float, **wrk_kw) -> Run:
    cpu0 = h.cpu_seconds(t.pids)
    b0 = _bytes(t.counters) if t.counters else (0, 0, 0)
    w = h.wrk(t.url, seconds, **wrk_kw)
    if t.counters:
        time.sleep(0.2)            # the last responses and batches are counted
    run = Run(w, h.cpu_seconds(t.pids) - cpu0)
    if t.counters:
        b1 = _bytes(t.counters)
        run.plain, run.link, run.proxied = (b - a for a, b in zip(b0, b1))
    return run


def alternate(part: str, targets: list[Target], seconds: float, rounds: int, **wrk_kw) -> list[Row]:
    """Warm each target up for 1 s, then ``rounds`` rounds of wrk over all of them
    in turn.  ``targets[0]`` is the reference for the ratios."""
    for t in targets:
        h.wrk(t.url, 1, **wrk_kw)
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in targets:
            run = measure(t, seconds, **wrk_kw)
            runs[t.name].append(run)
            w = run.wrk
            log(f"  {part} round {r + 1}/{rounds}  {t.name:38} {w.rps:9,.0f} req/s  p50 {w.p50:6.2f} ms"
                f"  p99 {w.p99:7.2f} ms" + (f"  ({w.errors})" if w.errors else ""))
    ref = runs[targets[0].name]
    rows = []
    for t in targets:
        rs = runs[t.name]
        requests = sum(x.wrk.requests for x in rs)
        proxied = sum(x.proxied for x in rs)
        rows.append(Row(
            t.name,
            rps=statistics.median(x.wrk.rps for x in rs),
            p50=statistics.median(x.wrk.p50 for x in rs),
            p99=statistics.median(x.wrk.p99 for x in rs),
            rps_ratio=statistics.median(x.wrk.rps / y.wrk.rps for x, y in zip(rs, ref)),
            p99_ratio=statistics.median(x.wrk.p99 / y.wrk.p99 for x, y in zip(rs, ref)),
            cpu_10k=sum(x.cpu for x in rs) / max(requests, 1) * 10000,
            plain_req=sum(x.plain for x in rs) / proxied if proxied else 0.0,
            link_req=sum(x.link for x in rs) / proxied if proxied else 0.0,
            errors="; ".join(f"round {i + 1}: {x.wrk.errors}" for i, x in enumerate(rs) if x.wrk.errors)))
    return rows


# --------------------------------------------------------------------------- the parts

@dataclass
class Part:
    """What a part measured, for the report."""

    name: str
    rows: list[Row] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)    # (target, command line)
    facts: dict = field(default_factory=dict)                        # part-specific figures
    error: str = ""


@dataclass
class Bench:
    """What every part shares: the settings, the upstream, the reference, a temp dir."""

    cfg: argparse.Namespace
    upstream: h.Server | None      # None when only parts without nginx run
    nginx: Target | None
    tmp: str
    nofile: int                    # RLIMIT_NOFILE of the bench and its children
    nofile_why: str                # why it is below what part 4 asked for, if it is


def start_chain(g: h.Group, b: Bench, codec: str, delay: str) -> Target:
    """B (teleport → http) in front of the upstream, A (http → teleport) in front of B.
    A's stats server counts both legs' bytes."""
    name = f"teleport {codec}, delay {delay}"
    workers = f"-workers={b.cfg.chain_workers}"
    tb = h.start_httptp(g, f"{name} (B)", "-inType=teleport", f"-inCompress={codec}", f"-inDelay={delay}",
                        "-outType=http", f"-out=127.0.0.1:{b.upstream.port}", workers, "-expvarAddr=")
    ta = h.start_httptp(g, f"{name} (A)", "-outType=teleport", f"-out=127.0.0.1:{tb.port}",
                        f"-outCompress={codec}", f"-outDelay={delay}", workers, "-expvarAddr=127.0.0.1:0")
    return Target(name, ta.url, [ta, tb], counters=ta)


def chain_commands(t: Target) -> list[tuple[str, str]]:
    return [(s.name, s.command) for s in t.servers]


def http_proxies(g: h.Group, b: Bench, configs: list[tuple[int, str]]) -> list[Target]:
    out = []
    for workers, parser in configs:
        name = f"httptp -workers={workers} {parser}"
        s = h.start_httptp(g, name, "-outType=http", f"-out=127.0.0.1:{b.upstream.port}",
                           f"-workers={workers}", f"-httpParser={parser}", "-expvarAddr=")
        out.append(Target(name, s.url, [s]))
    return out


def commands(targets: list[Target]) -> list[tuple[str, str]]:
    return [(t.name, t.servers[0].command) for t in targets]


def part_http(b: Bench, g: h.Group) -> Part:
    """Part 1: GET through each proxy.  The ceilings: the bare gevent proxies, one
    greenlet per connection (what httptp's design is) and callbacks on gevent's
    loop (what the rewrite of issue 11 moves to)."""
    ceilings = [h.start_script(g, BARE_GREENLETS, "bare_proxy.py", str(b.upstream.port)),
                h.start_script(g, BARE_CALLBACKS, "bare_callback_proxy.py", str(b.upstream.port))]
    targets = [b.nginx, *(Target(s.name, s.url, [s]) for s in ceilings), *http_proxies(g, b, b.cfg.http_configs)]
    rows = alternate("http", targets, b.cfg.seconds, b.cfg.rounds, conns=b.cfg.conns)
    return Part("http", rows, commands(targets))


def part_teleport(b: Bench, g: h.Group) -> Part:
    """Part 2: GET through a teleport chain per codec and delay."""
    chains = [start_chain(g, b, codec, delay) for delay in b.cfg.delays for codec in b.cfg.codecs]
    rows = alternate("teleport", [b.nginx, *chains], b.cfg.seconds, b.cfg.rounds, conns=b.cfg.conns)
    return Part("teleport", rows, commands([b.nginx]) + chain_commands(chains[0]))


def part_post(b: Bench, g: h.Group) -> Part:
    """Part 3: RTB-like POST bodies through httptp and through the zstd chain."""
    traffic = rtb.Traffic(1)
    bodies = [traffic.request() for _ in range(POST_BODIES)]
    path = os.path.join(b.tmp, "bodies.txt")
    with open(path, "wb") as f:
        f.write(b"\n".join(bodies) + b"\n")
    script = os.path.join(b.tmp, "post.lua")
    with open(script, "w") as f:
        f.write(h.lua_post(POST_PATH, path, rtb.HEADERS))
    proxies = http_proxies(g, b, [(2, "httptools")])
    chains = [start_chain(g, b, "zstd", delay) for delay in b.cfg.delays]
    targets = [b.nginx, *proxies, *chains]
    rows = alternate("post", targets, b.cfg.seconds, b.cfg.rounds, conns=b.cfg.conns, script=script)
    sizes = sorted(map(len, bodies))
    return Part("post", rows, commands(targets[:2]) + chain_commands(chains[0]), {
        "bodies": len(bodies), "min": sizes[0], "median": sizes[len(sizes) // 2],
        "mean": statistics.mean(sizes), "max": sizes[-1],
        "script": h.lua_post(POST_PATH, "bodies.txt", rtb.HEADERS)})


def part_latency(b: Bench, g: h.Group) -> Part:
    """Part 5: latency at ~1K req/s: 10 connections, each waiting 10 ms between requests."""
    script = os.path.join(b.tmp, "delay.lua")
    with open(script, "w") as f:
        f.write(h.lua_delay(10))
    direct = Target("nginx upstream, direct", b.upstream.url, [b.upstream])
    targets = [direct, b.nginx, *http_proxies(g, b, [(2, "httptools")])]
    rows = alternate("latency", targets, b.cfg.seconds * 2, b.cfg.rounds, conns=10, threads=1, script=script)
    return Part("latency", rows, commands(targets), {"seconds": b.cfg.seconds * 2})


class Holders:
    """bench/idle_conns.py processes that share the idle connections (one process
    would need a descriptor per connection: RLIMIT_NOFILE may not allow it).  They
    open them, then hold them until their stdin closes."""

    def __init__(self, g: h.Group, port: int, conns: int, per_process: int, open_seconds: float):
        self.g = g
        k = math.ceil(conns / per_process)
        sources = idle_conns.sources_needed(conns)
        self.lines: queue.Queue = queue.Queue()
        self.closed = [0] * k                    # connections the server closed while held, per holder
        self.procs = []
        self.window = k * max(50, WINDOW // k)
        for i in range(k):
            share = conns // k + (i < conns % k)
            proc = g.spawn([sys.executable, os.path.join(h.HERE, "idle_conns.py"), f"127.0.0.1:{port}",
                            "--conns", str(share), "--sources", str(sources), "--window", str(self.window // k),
                            "--open-seconds", str(open_seconds), "--hold", "1200"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("closed-by-server"):
                self.closed[i] = int(line.split()[1])
            self.lines.put((i, line.strip()))
        self.lines.put((i, None))

    def wait_for(self, prefix: str, timeout: float) -> list[str]:
        """Each holder's first line starting with ``prefix``; progress is shown every 5 s."""
        deadline = time.monotonic() + timeout
        found: dict[int, str] = {}
        shown = 0.0
        while len(found) < len(self.procs):
            try:
                i, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                i, line = -1, None
            if line is None and i in found:
                continue                         # it said its line, then exited
            if line is None or time.monotonic() > deadline:
                raise RuntimeError(f"idle_conns.py {i}: ended or timed out before a '{prefix}' line")
            if line.startswith(prefix):
                found[i] = line
            elif not line.startswith("progress") or time.monotonic() - shown >= 5:
                shown = time.monotonic()
                log(f"  idle [{i}]: {line}")
        return [found[i] for i in range(len(self.procs))]

    def release(self) -> int:
        for proc in self.procs:
            proc.stdin.close()
        n = sum(int(line.split()[1]) for line in self.wait_for("released", 120))
        for proc in self.procs:
            self.g.stop(proc)
        return n


FD_SPARE = 1000     # descriptors kept free in each httptp worker and holder (pools, pipes, uneven spread)
WINDOW = 200        # idle connections in flight while opening, over all holders: each makes httptp
                    # dial upstream, and 1,000 at once got some 504s (-outTimeout) in testing


def part_idle(b: Bench, g: h.Group) -> Part:
    """Part 4: memory per idle keep-alive connection, and the busy req/s beside them.
    The busy figure without idle connections is the mean of a run before opening
    them and one after releasing them, which brackets the runs with them."""
    cfg = b.cfg
    per_process = b.nofile - FD_SPARE
    # one descriptor per connection per worker: by default as many workers as
    # RLIMIT_NOFILE needs for the asked number (at least 2)
    workers = cfg.idle_workers or max(2, math.ceil(cfg.idle_conns / per_process))
    conns = min(cfg.idle_conns, workers * per_process)
    facts: dict = {"asked": cfg.idle_conns, "nofile": b.nofile, "workers": workers}
    if conns < cfg.idle_conns:
        facts["limited"] = (f"RLIMIT_NOFILE is {b.nofile:,}: {b.nofile_why}. With {FD_SPARE:,} descriptors "
                            f"kept spare, {workers} workers can hold {conns:,} connections, so that many were "
                            "opened (`--idle-workers` spreads them over more workers)")
    s = h.start_httptp(g, f"httptp -workers={workers}", "-outType=http", f"-out=127.0.0.1:{b.upstream.port}",
                       f"-workers={workers}", f"-concurrency={conns + 1000 * workers}", "-inIdleTimeout=10m",
                       "-expvarAddr=127.0.0.1:0")
    busy = Target(s.name, s.url, [s])
    h.wrk(busy.url, 1, conns=cfg.conns)                        # warm-up: pools, buffers, code
    without = [measure(busy, cfg.seconds, conns=cfg.conns)]
    pss0, rss0 = h.memory_kb(s.workers)
    log(f"  idle: busy without idle connections {without[0].wrk.rps:,.0f} req/s; "
        f"opening {conns:,} idle connections")
    open_seconds = max(60.0, conns / 500)
    holders = Holders(g, s.port, conns, per_process, open_seconds)
    held = failed = 0
    errors: dict[str, int] = {}
    for line in holders.wait_for("holding", open_seconds + 60):
        log(f"  idle: {line}")
        m = re.match(r"holding (\d+) failed=(\d+) errors=(.*) sources=(\d+) seconds=([\d.]+)", line)
        if not m:
            raise RuntimeError(f"idle_conns.py: unexpected line {line!r}")
        held, failed = held + int(m.group(1)), failed + int(m.group(2))
        for why, n in ast.literal_eval(m.group(3)).items():
            errors[why] = errors.get(why, 0) + n
        facts.update(sources=int(m.group(4)), open_seconds=max(float(m.group(5)), facts.get("open_seconds", 0)))
    facts.update(held=held, failed=failed, errors=errors, holders=len(holders.procs), window=holders.window)
    time.sleep(1)
    facts["in_conns"] = h.expvar(s)["inConns"]
    pss1, rss1 = h.memory_kb(s.workers)
    with_idle = []
    for r in range(cfg.rounds):
        with_idle.append(measure(busy, cfg.seconds, conns=cfg.conns))
        log(f"  idle: busy beside {held:,} idle connections, round {r + 1}/{cfg.rounds}: "
            f"{with_idle[-1].wrk.rps:,.0f} req/s")
    facts["closed_by_server"] = sum(holders.closed)
    facts["released"] = holders.release()
    deadline = time.monotonic() + 60
    while h.expvar(s)["inConns"] > 0 and time.monotonic() < deadline:
        time.sleep(0.5)                                        # httptp closes its ends
    without.append(measure(busy, cfg.seconds, conns=cfg.conns))
    log(f"  idle: busy after releasing them {without[-1].wrk.rps:,.0f} req/s")

    def per_conn(before: int, after: int) -> float:
        return (after - before) / held if held else float("nan")

    facts.update(
        pss_before=pss0, pss_with=pss1, rss_before=rss0, rss_with=rss1,
        pss_per_conn=per_conn(pss0, pss1), rss_per_conn=per_conn(rss0, rss1),
        rps_without=statistics.mean(x.wrk.rps for x in without),
        rps_with=statistics.median(x.wrk.rps for x in with_idle),
        p99_without=statistics.mean(x.wrk.p99 for x in without),
        p99_with=statistics.median(x.wrk.p99 for x in with_idle),
        wrk_errors="; ".join(x.wrk.errors for x in without + with_idle if x.wrk.errors))
    facts["busy_ratio"] = facts["rps_with"] / facts["rps_without"]
    return Part("idle", [], [(s.name, s.command),
                             ("idle connections", f"python bench/idle_conns.py 127.0.0.1:PORT --conns "
                                                  f"{conns // len(holders.procs)} (x{len(holders.procs)})")],
                facts)


def part_memory(b: Bench, g: h.Group) -> Part:
    """Part 6: the worker's RSS growth per case, each on a fresh httptp -workers=1."""
    up = h.start_script(g, "upstream (bench/memory.py)", "memory.py", "upstream")
    cases, cmds = [], [(up.name, up.command)]
    for key, title, what in memory.CASES:
        flags = ("-inType=teleport", "-inCompress=flate") if key == "bomb" else memory.BIG_LIMITS
        s = h.start_httptp(g, f"httptp for the {title}", *flags, "-outType=http", f"-out=127.0.0.1:{up.port}",
                           "-workers=1", "-expvarAddr=")
        try:
            case = memory.run_case(key, s.port, s.workers[0], b.cfg.slow_seconds)
        except Exception as e:                          # the warm-up failed: the other cases go on
            case = {"error": f"{type(e).__name__}: {e}"}
        finally:
            g.stop(s.proc)
        case.update(key=key, title=title, what=what.format(slow=b.cfg.slow_seconds))
        cases.append(case)
        if key in ("download", "bomb"):
            cmds.append((f"httptp ({'the bomb' if key == 'bomb' else 'the other cases'})", s.command))
        growth = f"RSS {case['before'] / memory.MiB:,.1f} → peak {case['peak'] / memory.MiB:,.1f} MiB, " \
                 f"growth {case['growth'] / memory.MiB:,.1f} MiB" if "growth" in case else "not measured"
        log(f"  memory: {title}: {growth}" + (f" ({case['error']})" if case.get("error") else ""))
    return Part("memory", [], cmds, {"cases": cases, "target": memory.TARGET})


def part_rtbload(b: Bench, g: h.Group) -> Part:
    """Part 7: RTB under load, per codec and level (bench/rtb_load.py)."""
    results, cmds = rtb_load.run(b.upstream.port, b.tmp, b.cfg, log)
    return Part("rtbload", [], cmds, {"results": results})


PART_FUNCS = {"http": part_http, "teleport": part_teleport, "post": part_post, "idle": part_idle,
              "latency": part_latency, "memory": part_memory, "rtbload": part_rtbload}


# --------------------------------------------------------------------------- main

QUICK = {"seconds": 2.0, "rounds": 2, "idle_conns": 5000, "codecs": "none,zstd", "slow_seconds": 8.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--seconds", type=float, help="length of each wrk run (default 5; part 5 runs twice as long)")
    ap.add_argument("--rounds", type=int, help="alternating rounds per part (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="2 s runs, 2 rounds, fewer configurations, 5,000 idle connections, 8 s slow reader")
    ap.add_argument("--only", default=",".join(PARTS),
                    help="parts to run, by name or number: " + ", ".join(f"{i + 1}={p}" for i, p in enumerate(PARTS)))
    ap.add_argument("--output", default=os.path.join(h.REPO, "docs", "benchmarks.md"),
                    help="Markdown file whose generated section is replaced (bench.png goes beside it)")
    ap.add_argument("--idle-conns", type=int, help="idle connections of part 4 (default 100000)")
    ap.add_argument("--idle-workers", type=int, help="-workers of the httptp of part 4 (default: "
                    "enough that no worker needs more descriptors than RLIMIT_NOFILE allows, at least 2)")
    ap.add_argument("--codecs", help="codecs of part 2 (default none,flate,snappy,zstd,brotli)")
    ap.add_argument("--delays", default="0,5ms", help="batching delays (-outDelay, -inDelay) of parts 2 and 3")
    ap.add_argument("--chain-workers", type=int, default=1, help="-workers of each httptp in a chain")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (wrk -c)")
    ap.add_argument("--slow-seconds", type=float, help="how long part 6's slow reader reads (default 15)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"seconds": 5.0, "rounds": 3, "idle_conns": 100000, "codecs": "none,flate,snappy,zstd,brotli",
                "slow_seconds": 15.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    parts = []
    for p in args.only.split(","):
        p = p.strip()
        if p.isdigit() and 1 <= int(p) <= len(PARTS):
            p = PARTS[int(p) - 1]
        if p not in PARTS:
            ap.error(f"--only: unknown part {p!r}")
        parts.append(p)
    args.parts = [p for p in PARTS if p in parts]
    args.codecs = args.codecs.split(",")
    args.delays = args.delays.split(",")
    args.http_configs = ([(2, "httptools"), (2, "h11")] if args.quick else
                         [(1, "httptools"), (1, "h11"), (2, "httptools"), (2, "h11")])
    return args


def tidy(text: str, tmp: str) -> str:
    """A command or nginx config as the report shows it: no temp dir, no 1,900 x's."""
    return text.replace(tmp, "$TMP").replace("x" * 1900, "xxx…(1,900 x)…xxx")


def main(argv=None) -> int:
    cfg = parse_args(argv)
    need_nginx = any(p in NEEDS_NGINX for p in cfg.parts)
    for tool in ("wrk", h.NGINX) if need_nginx else ():
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (make bench-deps, or apt-get install wrk nginx-light)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the children on the way out
    nofile, nofile_why = h.raise_nofile(cfg.idle_conns + 20000 if "idle" in cfg.parts else 0)
    info = h.machine()
    log(f"bench: parts {', '.join(cfg.parts)}; {cfg.seconds:g} s runs, {cfg.rounds} rounds; "
        f"RLIMIT_NOFILE {nofile:,}")
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="httptp-bench-")
    parts: list[Part] = []
    said: dict[str, list[str]] = {}
    try:
        with h.Group() as base:
            upstream = nginx = None
            configs = {}
            if need_nginx:
                upstream = h.nginx_upstream(base, tmp)
                proxy = h.nginx_proxy(base, tmp, upstream)
                nginx = Target(NGINX, proxy.url, [proxy])
                configs = {name: tidy(open(os.path.join(tmp, f"{name}.conf")).read(), tmp)
                           for name in ("upstream", "nginx-proxy")}
            bench = Bench(cfg, upstream, nginx, tmp, nofile, nofile_why)
            for name in cfg.parts:
                t0 = time.monotonic()
                log(f"part {PARTS.index(name) + 1}: {name}")
                g = h.Group()
                try:
                    parts.append(PART_FUNCS[name](bench, g))
                except Exception as e:                  # recorded in the report; the other parts go on
                    log(f"  {name}: failed:\n" + traceback.format_exc())
                    parts.append(Part(name, error=f"{type(e).__name__}: {e}"))
                finally:
                    g.close()
                parts[-1].commands = [(n, tidy(c, tmp)) for n, c in parts[-1].commands]
                for s in g.servers:
                    if s.said():
                        said[s.name] = s.said()
                log(f"  {name}: {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    for p in [p for p in parts if p.name == "rtbload"]:     # its own section and plot
        parts.remove(p)
        results = p.facts.get("results", [])
        rplot = "bench-rtb.png" if results and rtb_load.plot(
            results, os.path.join(out_dir, "bench-rtb.png")) else ""
        text = (rtb_load.render(results, p.commands, cfg, info, rplot) if not p.error else
                f"{rtb_load.BEGIN}\n**RTB under load failed:** {p.error}\n{rtb_load.END}\n")
        print(text)
        rtb_load.write_section(cfg.output, text)
        if not parts:
            return 1 if p.error else 0
    plot = "bench.png" if report.plot(parts, os.path.join(out_dir, "bench.png")) else ""
    text = report.render(cfg, info, parts, configs, said, time.monotonic() - t_start, plot)
    print(text)
    report.write_section(cfg.output, text)
    log(f"bench: wrote {cfg.output}" + (f" and {os.path.join(out_dir, plot)}" if plot else ""))
    return 1 if any(p.error for p in parts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
