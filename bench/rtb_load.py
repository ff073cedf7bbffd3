"""Part 7 of `make bench`, "RTB under load": what each codec and level costs and saves.

    wrk (POST, seeded OpenRTB-like bodies) → A (http → teleport) → B (teleport → http) → nginx 204

For each configuration (a codec and a level, or ``auto``, the same on both
ends: -outCompress/-outCompressLevel on A, -inCompress/-inCompressLevel on
B) one chain is started, warmed up, measured ``rounds`` times and stopped
(one chain at a time: sixteen idle chains would hold ~100 processes on a
small machine).  Reported per configuration:

- req/s (median over the rounds);
- the link ratio: A's in-side socket bytes over its out-side socket bytes
  (plain HTTP per byte on the teleport link, both directions), from /expvar;
- the CPU per request of A and B together (utime + stime of their workers
  and masters over the run, over the requests wrk completed);
- for ``auto``, the level A's upstream link was at when the run ended.

Bodies: ``BODIES`` distinct requests (bench/rtb.py, seed 7), each wrk thread
starting at its own offset (``#bodies / threads`` apart), so that no body
repeats within any codec's window during a run (zstd 12 keeps 8 MiB, about
5,800 bodies).  The section goes into docs/benchmarks.md between its own
markers (the rest of the generated section is left alone), with the plot
``bench-rtb.png`` (link ratio against CPU per request) beside it.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import harness as h
import report
import rtb

BODIES = 20000
PATH = "/nobid"                      # the upstream answers 204 (harness.UPSTREAM_SERVER)
BEGIN, END = "<!-- bench-rtb:begin -->", "<!-- bench-rtb:end -->"
CONFIGS = [("none", ""), ("snappy", ""), ("flate", "1"), ("flate", "6"), ("flate", "9"),
           ("flate", "auto"), ("zstd", "1"), ("zstd", "3"), ("zstd", "6"), ("zstd", "9"),
           ("zstd", "12"), ("zstd", "auto"), ("brotli", "5"), ("brotli", "9")]
QUICK_CONFIGS = [("none", ""), ("flate", "1"), ("flate", "6"), ("flate", "9"), ("flate", "auto"),
                 ("zstd", "3"), ("zstd", "6"), ("zstd", "9"), ("zstd", "12"), ("zstd", "auto"),
                 ("brotli", "5")]
WARMUP = 3.0                         # seconds; auto has moved up to 3 steps by then


@dataclass
class Result:
    name: str
    rps: float = 0.0
    ratio: float = 0.0               # plain bytes per link byte
    cpu_us: float = 0.0              # CPU µs per request, A + B
    level: str = ""                  # A's out-side level at the end (auto)
    errors: list[str] = field(default_factory=list)


def lua(bodies_file: str, threads: int) -> str:
    """POST the bodies in turn; thread k starts at k * #bodies / threads."""
    return h.lua_post(PATH, bodies_file, rtb.HEADERS, stride=f"math.floor(#bodies / {threads})")


def name_of(codec: str, level: str) -> str:
    return f"{codec}-{level}" if level else codec


def _counters(server: h.Server) -> tuple[int, int, int, str]:
    v = h.expvar(server)
    level = v.get("teleportCompressLevelOut")
    return (v["inBytesRead"] + v["inBytesWritten"], v["outBytesRead"] + v["outBytesWritten"],
            v["inRequestSuccess"] + v["inRequestNon200"], "" if level is None else f"{level:g}")


def measure(upstream_port: int, codec: str, level: str, script: str, seconds: float,
            rounds: int, conns: int, workers: int) -> tuple[Result, list[tuple[str, str]]]:
    name = name_of(codec, level)
    with h.Group() as g:
        b_flags = ["-inType=teleport", f"-inCompress={codec}", "-outType=http",
                   f"-out=127.0.0.1:{upstream_port}", f"-workers={workers}", "-expvarAddr="]
        a_flags = ["-outType=teleport", f"-outCompress={codec}", f"-workers={workers}",
                   "-expvarAddr=127.0.0.1:0"]
        if level:
            b_flags.append(f"-inCompressLevel={level}")
            a_flags.append(f"-outCompressLevel={level}")
        tb = h.start_httptp(g, f"{name} (B)", *b_flags)
        ta = h.start_httptp(g, f"{name} (A)", f"-out=127.0.0.1:{tb.port}", *a_flags)
        h.wrk(ta.url, WARMUP, conns=conns, script=script)
        pids = lambda: [ta.proc.pid, tb.proc.pid, *ta.workers, *tb.workers]     # noqa: E731
        rps, plain, link, cpu, done = [], 0, 0, 0.0, 0
        result = Result(name)
        for _ in range(rounds):
            c0, b0 = h.cpu_seconds(pids()), _counters(ta)
            w = h.wrk(ta.url, seconds, conns=conns, script=script)
            time.sleep(0.2)                  # the last batches are counted
            c1, b1 = h.cpu_seconds(pids()), _counters(ta)
            rps.append(w.rps)
            plain += b1[0] - b0[0]
            link += b1[1] - b0[1]
            cpu += c1 - c0
            done += w.requests
            result.level = b1[3]
            if w.errors:
                result.errors.append(w.errors)
        result.rps = statistics.median(rps)
        result.ratio = plain / link if link else 0.0
        result.cpu_us = cpu / max(done, 1) * 1e6
        commands = [(s.name, s.command) for s in (ta, tb)]
    return result, commands


def run(upstream_port: int, tmp: str, cfg, log) -> tuple[list[Result], list[tuple[str, str]]]:
    traffic = rtb.Traffic(7)
    bodies = [traffic.request() for _ in range(BODIES)]
    path = os.path.join(tmp, "rtb-bodies.txt")
    with open(path, "wb") as f:
        f.write(b"\n".join(bodies) + b"\n")
    script = os.path.join(tmp, "rtb-load.lua")
    with open(script, "w") as f:
        f.write(lua(path, 2))
    results, commands = [], []
    for codec, level in (QUICK_CONFIGS if cfg.quick else CONFIGS):
        r, cmds = measure(upstream_port, codec, level, script, cfg.seconds, cfg.rounds, cfg.conns,
                          cfg.chain_workers)
        results.append(r)
        commands = commands or cmds
        log(f"  rtbload {r.name:12} {r.rps:9,.0f} req/s  ratio {r.ratio:5.2f}  "
            f"{r.cpu_us:6.0f} us/req" + (f"  level {r.level}" if r.level else "")
            + (f"  ({'; '.join(r.errors)})" if r.errors else ""))
    return results, commands


def render(results: list[Result], commands, cfg, info: dict, plot: str) -> str:
    lines = [BEGIN, f"### {time.strftime('%Y-%m-%d %H:%M')}: RTB under load "
             "(`make bench BENCH_ARGS=\"--only rtbload\"`, bench/rtb_load.py)", "",
             f"*Generated; the next run of the part replaces it.* {info['cpu']}, {info['cores']} "
             "cores, **shared with other work while measured**: read the figures as relative "
             f"to each other. wrk -t2 -c{cfg.conns}, {cfg.seconds:g} s × {cfg.rounds} rounds per "
             f"configuration after a {WARMUP:g} s warm-up, {BODIES:,} distinct OpenRTB-like "
             "bodies, nginx answering 204; each httptp -workers="
             f"{cfg.chain_workers}; the same codec and level on both ends.", "",
             "| codec-level | req/s | link ratio (plain ÷ link bytes) | CPU µs/req, A+B | "
             "level at the end |", "|---|--:|--:|--:|--:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.rps:,.0f} | ×{r.ratio:.2f} | {r.cpu_us:,.0f} | "
                     f"{r.level or '–'} |" + (f" ({'; '.join(r.errors)})" if r.errors else ""))
    if plot:
        lines += ["", f"![link ratio against CPU per request]({plot})"]
    lines += [""] + [f"- {n}: `{c}`" for n, c in commands]
    lines += ["- the other configurations differ only in the codec and the level", END, ""]
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> bool:
    """Link ratio (y) against CPU per request (x), one labelled point per configuration."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"none": "#888888", "snappy": "#8172b3", "flate": "#4c72b0", "zstd": "#dd8452",
              "brotli": "#55a868"}
    for r in results:
        codec = r.name.split("-")[0]
        ax.scatter(r.cpu_us, r.ratio, color=colors.get(codec, "k"),
                   marker="*" if r.name.endswith("auto") else "o", s=80 if r.name.endswith("auto") else 40)
        ax.annotate(r.name, (r.cpu_us, r.ratio), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("CPU µs per request, A + B")
    ax.set_ylabel("link ratio: plain HTTP bytes ÷ teleport bytes")
    ax.set_title("RTB under load: what each codec and level buys (shared 2-core machine)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_section(path: str, text: str) -> None:
    """Put ``text`` in place of this part's previous section of ``path``, or at its end."""
    report.write_section(path, text, BEGIN, END)
