"""The report of bench/suite.py: a Markdown section, the Targets table, a plot.

The section sits between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``;
``write_section`` replaces what is between the markers (or appends the section
when the file has none), so the hand-written history around it is kept.
"""

from __future__ import annotations

import math
import os
import time

import harness
import memory

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TITLES = {"http": "1. http → http (GET)", "teleport": "2. Teleport chain (GET)",
          "post": "3. RTB-like POST", "idle": "4. Idle keep-alive connections",
          "latency": "5. Latency at ~1K req/s", "memory": "6. Memory with big bodies"}
MiB = 1 << 20


def _n(x: float, digits: int = 0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, l or r."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- the targets

def _rows(part) -> list:
    return part.rows if part and not part.error else []


def targets(parts: dict) -> list[list[str]]:
    """Issue 6's targets as rows [target, measured, status]; "not run" when the
    part that measures one was not run or failed."""
    out = []

    def add(target: str, measured: str | None, met: bool = False, note: str = "") -> None:
        out.append([target, measured or "–", "not run" if measured is None else
                    ("met" if met else "missed") + note])

    w2 = next((r for r in _rows(parts.get("http")) if r.name == "httptp -workers=2 httptools"), None)
    goal = "http → http, -workers=2: req/s ≥ 0.40x nginx (stretch 0.50x)"
    goal_p99 = "http → http, -workers=2: p99 ≤ 3x nginx p99"
    if w2:
        stretch = "" if w2.rps_ratio < 0.40 else " (stretch met)" if w2.rps_ratio >= 0.50 else " (stretch missed)"
        add(goal, f"{w2.rps_ratio:.3f}x", w2.rps_ratio >= 0.40, stretch)
        add(goal_p99, f"{w2.p99_ratio:.2f}x", w2.p99_ratio <= 3)
    else:
        add(goal, None)
        add(goal_p99, None)

    zstd = next((r for r in _rows(parts.get("post")) if r.name.startswith("teleport zstd")), None)
    goal = "teleport zstd: req/s ≥ 0.30x nginx (RTB POST)"
    goal_link = "teleport zstd: link ≤ 1/4 of the plain bytes (RTB POST)"
    if zstd:
        add(goal, f"{zstd.rps_ratio:.3f}x ({zstd.name})", zstd.rps_ratio >= 0.30)
        add(goal_link, f"{zstd.link_req / zstd.plain_req:.3f} ({zstd.link_req:,.0f} of "
            f"{zstd.plain_req:,.0f} B/req)", zstd.link_req <= zstd.plain_req / 4)
    else:
        add(goal, None)
        add(goal_link, None)

    idle = parts.get("idle")
    goals = ["100,000 idle keep-alive connections held", "≤ 20 KiB of proxy memory per idle connection",
             "busy req/s beside the idle connections ≥ 80% of without"]
    if idle and not idle.error:
        f = idle.facts
        fewer = f" (at {f['held']:,} connections)" if f["held"] < 100000 else ""
        if f["workers"] != 2:
            fewer += f" (-workers={f['workers']}, not 2)"
        if f["asked"] < 100000:
            out.append([goals[0], f"{f['held']:,}", f"not measured (asked for {f['asked']:,})"])
        else:
            add(goals[0], f"{f['held']:,}", f["held"] >= 100000,
                " (see part 4)" if f.get("limited") else fewer)
        add(goals[1], f"{f['pss_per_conn']:.1f} KiB (PSS)", f["pss_per_conn"] <= 20, fewer)
        add(goals[2], f"{f['busy_ratio']:.0%}", f["busy_ratio"] >= 0.80, fewer)
    else:
        for goal in goals:
            add(goal, None)
    return out


def _memory_outcome(c: dict) -> str:
    """What a memory case's client saw, in a few words."""
    if "status" not in c:
        return c.get("error", "–")
    out = f"{c['status']}"
    if c["key"] == "bomb":
        out += f", {c['bytes'] / MiB:,.0f} MiB plain as {c['wire'] / MiB:,.2f} MiB on the wire"
    elif c["key"] == "upload":
        out += f", {c['bytes'] / MiB:,.0f} MiB sent"
    else:
        out += f", {c['bytes'] / MiB:,.1f} MiB read"
    out += f" in {c['seconds']:.1f} s"
    return out + "".join(f"; {c[k]}" for k in ("note", "error") if c.get(k))


def targets_11(parts: dict) -> list[list[str]]:
    """Issue 11's targets as rows [target, measured, status], as ``targets``."""
    out = []

    def add(target: str, measured: str | None, met: bool = False) -> None:
        out.append([target, measured or "–", "not run" if measured is None else "met" if met else "missed"])

    http = _rows(parts.get("http"))
    w2 = next((r for r in http if r.name == "httptp -workers=2 httptools"), None)
    ngx = http[0] if http else None
    add("http → http, -workers=2: req/s ≥ 0.50x nginx (0.60x compiled)",
        w2 and f"{w2.rps_ratio:.3f}x", bool(w2) and w2.rps_ratio >= 0.50)
    cpu = w2.cpu_10k / ngx.cpu_10k if w2 and ngx and ngx.cpu_10k else None
    add("http → http, -workers=2: CPU per 10K requests ≤ 2.0x nginx's",
        cpu and f"{cpu:.2f}x ({w2.cpu_10k:.2f} against {ngx.cpu_10k:.2f} s)", bool(cpu) and cpu <= 2.0)
    zstd = next((r for r in _rows(parts.get("post")) if r.name.startswith("teleport zstd")), None)
    add("teleport zstd chain, RTB POST: req/s ≥ 0.45x nginx",
        zstd and f"{zstd.rps_ratio:.3f}x ({zstd.name})", bool(zstd) and zstd.rps_ratio >= 0.45)
    idle = parts.get("idle")
    f = idle.facts if idle and not idle.error else None
    add("idle keep-alive connections: ≤ 10 KiB of proxy memory each (PSS)",
        f and f"{f['pss_per_conn']:.1f} KiB (at {f['held']:,} connections)", bool(f) and f["pss_per_conn"] <= 10)
    mem = parts.get("memory")
    cases = {c["key"]: c for c in mem.facts["cases"]} if mem and not mem.error else {}
    for key, title, _ in memory.CASES:
        c = cases.get(key, {})
        add(f"{title}: worker RSS growth ≤ {memory.TARGET // MiB} MiB",
            f"{c['growth'] / MiB:,.1f} MiB" if "growth" in c else None,
            "growth" in c and c["growth"] <= memory.TARGET and "error" not in c)
    return out


# --------------------------------------------------------------------------- the parts

def _ratio_rows(part, with_bytes: bool) -> list[list[str]]:
    rows = []
    for r in part.rows:
        row = [r.name, _n(r.rps), f"{r.rps_ratio:.2f}x", _n(r.p50, 2), _n(r.p99, 2), f"{r.p99_ratio:.1f}x"]
        if with_bytes:
            row += ([_n(r.plain_req), _n(r.link_req), f"{r.link_req / r.plain_req:.3f}"] if r.plain_req
                    else ["–", "–", "–"])
        rows.append(row + [f"{r.cpu_10k:.2f}"])
    return rows


def _errors(part) -> list[str]:
    errs = [f"- wrk reported for {r.name}: {r.errors}" for r in part.rows if r.errors]
    return ["", *errs] if errs else []


def _part_http(part, cfg) -> list[str]:
    head = ["target", "req/s", "vs nginx", "p50 ms", "p99 ms", "p99 vs nginx", "CPU s / 10K req", "CPU vs nginx"]
    ref = part.rows[0].cpu_10k
    rows = [row + [f"{r.cpu_10k / ref:.1f}x" if ref else "–"] for r, row in zip(part.rows, _ratio_rows(part, False))]
    return [f"wrk -t2 -c{cfg.conns}, GET of the ~2 KB JSON body. CPU: the proxy's worker processes "
            "(httptp's workers, nginx's worker, the one process of each bare gevent proxy). The bare "
            "proxies are ceilings for a proxy in Python on gevent: one process each, keep-alive, no "
            "validation, timeouts, balancing or stats. `bench/bare_proxy.py` runs a greenlet per client "
            "connection (httptp's design today) and frames messages by a scan for Content-Length; "
            "`bench/bare_callback_proxy.py` runs callbacks on gevent's loop (`loop.io` watchers on "
            "non-blocking sockets, no greenlet switch per request), parses with httptools, re-serialises, "
            "and keeps a pool of upstream connections (the design of issue 11).", "",
            *_table(head, rows, "lrrrrrrr"), *_errors(part)]


def _part_teleport(part, cfg) -> list[str]:
    head = ["target", "req/s", "vs nginx", "p50 ms", "p99 ms", "p99 vs nginx", "plain B/req", "link B/req",
            "link / plain", "CPU s / 10K req"]
    return [f"wrk -t2 -c{cfg.conns} → A (http → teleport, `-outCompress`, `-outDelay`) → B (teleport → http, "
            f"`-inCompress`, `-inDelay`, same codec and delay) → upstream; `-workers={cfg.chain_workers}` each. "
            "Plain bytes: A's client sockets (`inBytesRead` + `inBytesWritten`); link bytes: A's teleport "
            "socket (`outBytesRead` + `outBytesWritten`), from A's /expvar, per request A answered. The GET "
            "answer is the same body every time, so the link figure is a codec's best case; part 3 has "
            "varied traffic. A delay holds each batch up to that long, on A for requests and on B for "
            f"responses, and wrk's {cfg.conns} connections wait for their answers, so req/s falls to about "
            f"{cfg.conns} / p50. CPU: the workers of A and B.", "",
            *_table(head, _ratio_rows(part, True), "lrrrrrrrrr"), *_errors(part)]


def _part_post(part, cfg) -> list[str]:
    f = part.facts
    head = ["target", "req/s", "vs nginx", "p50 ms", "p99 ms", "p99 vs nginx", "plain B/req", "link B/req",
            "link / plain", "CPU s / 10K req"]
    return [f"wrk -t2 -c{cfg.conns} with a Lua script that POSTs {f['bodies']:,} OpenRTB 2.5 bid requests "
            f"from `bench/rtb.py` (`Traffic(1)`; bodies min {f['min']:,}, median {f['median']:,}, "
            f"mean {f['mean']:,.0f}, max {f['max']:,} bytes) in turn, with an exchange's headers "
            "(`Content-Type: application/json`). The upstream answers like a bidder: 204 to ~60% "
            "(`split_clients` on `$request_id`), else a ~530-byte bid whose ids change with every answer. "
            "Same columns as part 2.", "",
            *_table(head, _ratio_rows(part, True), "lrrrrrrrrr"), *_errors(part)]


def _part_latency(part, cfg) -> list[str]:
    direct = part.rows[0]
    rows = [[r.name, _n(r.rps), _n(r.p50, 3), _n(r.p99, 3),
             "–" if r is direct else f"{r.p50 - direct.p50:+.3f}",
             "–" if r is direct else f"{r.p99 - direct.p99:+.3f}", f"{r.cpu_10k:.2f}"] for r in part.rows]
    head = ["target", "achieved req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU s / 10K req"]
    return [f"wrk -t1 -c10 -d{part.facts['seconds']:g}s with `function delay() return 10 end`: each "
            "connection waits 10 ms between a response and its next request (wrk's latency does not include "
            "the wait). Added: against the upstream direct, medians over the rounds.", "",
            *_table(head, rows, "lrrrrrr"), *_errors(part)]


def _part_idle(part, cfg) -> list[str]:
    f = part.facts
    mib = 1024
    rows = [
        ["idle connections asked / held", f"{f['asked']:,} / {f['held']:,}"
         + (f" ({f['failed']:,} failed: " + ", ".join(f"{k}: {v:,}" for k, v in f["errors"].items()) + ")"
            if f["failed"] else "")],
        ["open client connections httptp counted (`inConns`)", f"{f['in_conns']:,}"],
        ["opened in", f"{f['open_seconds']:.0f} s by {f['holders']} holder process(es), from {f['sources']} "
                      f"source addresses (127.0.0.2 on), at most {f['window']:,} in flight"],
        [f"PSS of httptp's {f['workers']} workers, before → with them",
         f"{f['pss_before'] / mib:,.1f} → {f['pss_with'] / mib:,.1f} MiB"],
        ["**proxy memory per idle connection (PSS)**", f"**{f['pss_per_conn']:.1f} KiB**"],
        ["the same from RSS", f"{f['rss_per_conn']:.1f} KiB"],
        ["busy req/s (wrk -c64) without → beside them",
         f"{f['rps_without']:,.0f} → {f['rps_with']:,.0f} (**{f['busy_ratio']:.0%}**)"],
        ["busy p99 without → beside them", f"{f['p99_without']:.2f} → {f['p99_with']:.2f} ms"],
        ["idle connections httptp closed while they were held", f"{f['closed_by_server']:,}"],
    ]
    lines = [f"`bench/idle_conns.py` (one epoll, no gevent) opens the connections; each sends one GET and reads "
             f"the answer, then stays open. RLIMIT_NOFILE of the bench and its children: {f['nofile']:,}. Memory is the sum over httptp's workers after a "
             "warm-up, before the idle connections and with them. The busy req/s without them is the mean of a "
             "run before they are opened and one after they are released; with them, the median of "
             f"{cfg.rounds} run(s).", ""]
    if f.get("limited"):
        lines[0:0] = [f"**Limited:** {f['limited']}.", ""]
    lines += _table(["", ""], rows, "lr")
    if f["wrk_errors"]:
        lines += ["", f"- wrk reported: {f['wrk_errors']}"]
    return lines


def _part_memory(part, cfg) -> list[str]:
    target = part.facts["target"]
    rows = []
    for c in part.facts["cases"]:
        measured = "growth" in c
        status = ("not measured" if not measured else
                  "met" if c["growth"] <= target and "error" not in c else "missed")
        rows.append([c["title"], c["what"]] +
                    ([f"{c[k] / MiB:,.1f}" for k in ("before", "peak", "after")] + [f"**{c['growth'] / MiB:,.1f}**"]
                     if measured else ["–"] * 4) +
                    [f"≤ {target // MiB}", status, _memory_outcome(c)])
    head = ["case", "the client", "RSS before MiB", "peak MiB", "after MiB", "growth MiB", "target MiB", "status",
            "status code, bytes, time"]
    return ["`bench/memory.py`. Each case runs on a fresh `httptp -workers=1` (http → http; the bomb: "
            "`-inType=teleport -inCompress=flate` → http) in front of a Python upstream on loopback that "
            "serves `GET /bytes/N` from one 1 MiB buffer and reads upload bodies to the end without holding "
            "them. After one small exchange through it, the case runs; its figure is the growth of the "
            "worker's resident memory: the peak during the case (VmRSS of /proc/PID/status sampled every "
            "10 ms, and VmHWM after resetting it with `clear_refs`) minus VmRSS just before. After: VmRSS "
            "once the case is over. The first three cases run with `-inMaxBodySize` and `-outMaxBodySize` "
            "of 1 GiB so that the bodies pass at all; the bomb meets the default limits. Target: issue 11.", "",
            *_table(head, rows, "llrrrrrll")]


RENDER = {"http": _part_http, "teleport": _part_teleport, "post": _part_post, "idle": _part_idle,
          "latency": _part_latency, "memory": _part_memory}


# --------------------------------------------------------------------------- the section

def render(cfg, info: dict, parts: list, configs: dict, said: dict, elapsed: float, plot: str) -> str:
    by_name = {p.name: p for p in parts}
    args = "".join(" " + a for a in cfg.argv)
    lines = [BEGIN, f"## {time.strftime('%Y-%m-%d %H:%M')}: `make bench` (bench/suite.py)", "",
             f"*Generated by `python bench/suite.py{args}` in {elapsed / 60:.0f} min; the next run replaces "
             "this section, between the bench markers.*", "",
             f"**Machine.** {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}, "
             f"gevent {info['gevent']}, nginx {info['nginx']}, wrk {info['wrk']}; httptp at `{info['commit']}`. "
             "wrk, both nginx and the proxies share these cores.", "",
             f"**Method** (parts 1–5; part 6 says its own). Each wrk run lasts {cfg.seconds:g} s (part 5: {2 * cfg.seconds:g} s); {cfg.rounds} "
             "rounds alternate between the targets of a part. A figure is the median over the rounds; a ratio "
             "is the median of the per-round ratios to nginx in the same round. CPU is utime + stime from "
             "/proc/PID/stat over the run, per 10,000 requests wrk completed. **Upstream:** nginx, 1 worker, "
             f"answering from memory (a {len(harness.BODY_2K):,}-byte JSON body to GET). **Reference:** nginx, 1 worker, "
             "`proxy_pass` to the upstream over HTTP/1.1 with `keepalive 64`.", "",
             "### Targets (issue 6)", "", *_table(["target", "measured", "status"], targets(by_name), "lrl"),
             "", "### Targets (issue 11)", "", *_table(["target", "measured", "status"], targets_11(by_name), "lrl")]
    if plot:
        lines += ["", f"![req/s and p99 latency per configuration]({plot})"]
    for p in parts:
        lines += ["", f"### {TITLES[p.name]}", ""]
        lines += [f"**Failed:** {p.error}"] if p.error else RENDER[p.name](p, cfg)
    lines += ["", "### Commands", ""]
    for p in parts:
        for name, cmd in p.commands:
            lines.append(f"- {TITLES[p.name].split('.')[0]}. {name}: `{cmd}`")
    if "teleport" in by_name or "post" in by_name:
        lines += ["- the other chains differ from the one shown only in the codec and the delay"]
    wrk_line = f"wrk -t2 -c{cfg.conns} -d{cfg.seconds:g}s --latency --timeout 5s [-s SCRIPT] http://127.0.0.1:PORT/"
    if any(p.name != "memory" for p in parts):
        lines += [f"- load: `{wrk_line}` (part 5: `-t1 -c10`)"]
    post = by_name.get("post")
    extra = {"post.lua (part 3)": post.facts["script"]} if post and not post.error else {}
    for name, text in {**{f"{k}.conf": v for k, v in configs.items()}, **extra}.items():
        lines += ["", f"<details><summary>{name}</summary>", "", "```", text.rstrip(), "```", "", "</details>"]
    if said:
        lines += ["", "### What the proxies printed besides their routine lines", ""]
        for name, notes in said.items():
            lines += [f"- {name}:"] + [f"  - `{n}`" for n in dict.fromkeys(notes)]
    return "\n".join(lines + [END]) + "\n"


def write_section(path: str, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``text`` (which carries the markers ``begin`` and ``end``) in place of
    the previous generated section of ``path``, or at its end."""
    old = open(path).read() if os.path.exists(path) else ""
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        new = head + text.rstrip("\n") + rest.partition(end)[2]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    with open(path, "w") as f:
        f.write(new)


# --------------------------------------------------------------------------- the plot

def plot(parts: list, path: str) -> bool:
    """req/s (bars, ratio to nginx at the end) and p99 (bars) per configuration of
    parts 1-3, one row of two panels per part.  False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("bench: matplotlib is missing (make bench-deps): no plot", flush=True)
        return False
    shown = [p for p in parts if p.name in ("http", "teleport", "post") and p.rows]
    if not shown:
        return False
    heights = [len(p.rows) for p in shown]
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, 1.2 + 0.42 * sum(heights) + 0.5 * len(shown)),
                             gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]}, squeeze=False)
    for (ax_rps, ax_p99), p in zip(axes, shown):
        names = [r.name for r in p.rows][::-1]
        colors = ["#888888" if n.startswith("nginx") else "#55a868" if n.startswith("bare") else
                  "#dd8452" if n.startswith("teleport") else "#4c72b0" for n in names]
        rps = [r.rps for r in p.rows][::-1]
        ax_rps.barh(names, rps, color=colors)
        for y, r in enumerate(p.rows[::-1]):
            ax_rps.text(r.rps, y, f" {r.rps:,.0f} ({r.rps_ratio:.2f}x)", va="center", fontsize=8)
        ax_rps.set_xlim(0, max(rps) * 1.35)
        ax_rps.set_title(f"{TITLES[p.name]}: req/s (vs nginx)", fontsize=10, loc="left")
        ax_p99.barh(names, [r.p99 for r in p.rows][::-1], color=colors)
        ax_p99.set_yticklabels([])
        for y, r in enumerate(p.rows[::-1]):
            ax_p99.text(r.p99, y, f" {r.p99:.1f}", va="center", fontsize=8)
        ax_p99.set_xlim(0, max(r.p99 for r in p.rows) * 1.25)
        ax_p99.set_title("p99 latency, ms", fontsize=10, loc="left")
        ax_rps.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        for ax in (ax_rps, ax_p99):
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
