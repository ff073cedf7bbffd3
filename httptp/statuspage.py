"""The live status page: ``GET /`` (HTML for people) and ``/status.json``.

Theory of operation
-------------------
Everything on the page comes from one document, ``status(...)``: a dict read
from the shared-memory ``Stats`` map plus a small ``History`` of samples that
the stats helper keeps in its own memory (it is one process, so the ring needs
no shared memory and dies with the helper).  ``/status.json`` is that dict as
JSON; ``render_html`` renders the same dict server-side, so the tables are
there without JavaScript, and the page's inline script polls ``/status.json``
every ``POLL_MS`` and redraws the tables and the chart from it with DOM calls
(``textContent``, never ``innerHTML``: upstream names are operator input).
The page loads nothing else: no CDN, no external file (air-gapped sites);
its Content-Security-Policy allows exactly its own inline script and style
(by hash) and fetches from its own origin.

Health: ``Stats.health(index)`` (the health helper's table); an upstream never
checked shows "–".  Discovery: ``upstream_entries(stats) -> [(index, address,
origin)]`` in ``httptp.discovery`` (or ``httptp.stats``) when it is there;
else every listed name of the upstream table is its own address and origin.

One function, ``upstream_state``, says up / down / ejected / draining.
Sans-IO apart from the clock arguments: no sockets here.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib
import json
import threading
import time
from collections import deque

import httptp
from httptp import stats as stats_mod
from httptp.settings import ADDR_TYPE
from httptp.stats import (IN_CONNS, IN_REQUEST_START, LATENCY_BUCKETS, STATE_BOOTING,
                          STATE_DRAINING, STATE_READY)

POLL_MS = 1500                  # the page's poll interval
SAMPLE_EVERY = 1.0              # seconds between History samples
HISTORY_SAMPLES = 300           # five minutes of chart
P99_WINDOW = 60.0               # p99 over the last minute (since start until there is one)

WORKER_STATES = {STATE_BOOTING: "booting", STATE_READY: "ready", STATE_DRAINING: "draining"}
# Requests httptp answered itself with an error (the reasons of httptp_request_errors).
ERROR_COUNTERS = ("inRequestTimeoutError", "inRequestOtherError", "inRequestBadRequest",
                  "inRequestOverload")
TELEPORT_TYPES = tuple(t.name for t in ADDR_TYPE.values() if t.teleport)


# -- contracts with health checks and discovery (maybe not there) --------------------------

def health_of(stats, index: int) -> dict | None:
    """``{"state": "up"|"down"|"unknown", "checked_at": wall, "code": int}``, or
    None when the upstream was never checked (no -outHealthCheck, or not yet)."""
    try:
        state, checked_at, code = stats.health(index)
    except IndexError:          # an index the health table does not cover
        return None
    if not checked_at and state == stats_mod.HEALTH_UNKNOWN:
        return None
    name = {stats_mod.HEALTH_UP: "up", stats_mod.HEALTH_DOWN: "down"}.get(state, "unknown")
    return {"state": name, "checked_at": checked_at or None, "code": code or None}


def _entries_function():
    for module in ("httptp.discovery", "httptp.stats"):
        try:
            fn = getattr(importlib.import_module(module), "upstream_entries", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


def upstream_entries(stats) -> list[tuple[int, str, str]]:
    """(index, address, origin) of every current upstream: discovery's, else the
    listed names of the upstream table (each its own origin)."""
    fn = _entries_function()
    if fn is not None:
        return [(int(i), str(a), str(o)) for i, a, o in fn(stats)]
    return [(i, name, name) for i, name in sorted(stats.upstream_names().items())]


# -- the one derivation of an upstream's state --------------------------------------------

def upstream_state(*, health: str | None, ejected: bool, current: bool, inflight: int) -> str | None:
    """up / down / ejected / draining, or None for a gone upstream (not current,
    nothing in flight: not shown).

    down: the health checks say so; ejected: the balancer keeps traffic away
    (an ejection deadline in the future in some block, or not yet cleared by a
    successful probe); draining: no longer current (retired by a reload or a
    DNS change) with requests still in flight; else up.
    """
    if health == "down":
        return "down"
    if ejected:
        return "ejected"
    if not current:
        return "draining" if inflight else None
    return "up"


# -- latency percentile from the histogram ----------------------------------------------------

def quantile(q: float, buckets: list[int]) -> float | None:
    """Prometheus' histogram_quantile over non-cumulative ``buckets`` (the
    ``LATENCY_BUCKETS`` then +Inf): linear within a bucket; in +Inf, the last
    bound.  None without samples."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for bound, n in zip((*LATENCY_BUCKETS, None), buckets):
        if n and seen + n >= rank:
            if bound is None:
                return LATENCY_BUCKETS[-1]
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound if bound is not None else lower
    return LATENCY_BUCKETS[-1]


# -- history: the chart's samples, kept in the stats helper ----------------------------------

class History:
    """A ring of (monotonic time, requests, errors, bytes saved) totals, one per
    ``SAMPLE_EVERY``, and per-upstream latency histograms every 10 s for the
    windowed p99.  Thread-safe (the server answers from threads)."""

    def __init__(self, stats, *, size: int = HISTORY_SAMPLES, clock=time.monotonic):
        self.stats = stats
        self.clock = clock
        self.samples: deque = deque(maxlen=size)
        self.histograms: deque = deque(maxlen=int(P99_WINDOW / 10) + 2)
        self.lock = threading.Lock()

    def sample(self) -> None:
        now = self.clock()
        totals = self.stats.totals()
        row = (now, totals["inRequestStart"], sum(totals.get(k, 0) for k in ERROR_COUNTERS),
               bytes_saved(totals))
        with self.lock:
            self.samples.append(row)
            if not self.histograms or now - self.histograms[-1][0] >= 10.0:
                per = self.stats.upstream_totals()
                self.histograms.append((now, {i: list(u["latency_buckets"]) for i, u in per.items()}))

    def run(self, stop: threading.Event, every: float = SAMPLE_EVERY) -> None:
        """Sample until ``stop`` is set (the helper's sampler thread)."""
        while not stop.is_set():
            self.sample()
            stop.wait(every)

    def rates(self) -> list[list[float]]:
        """[[seconds ago, req/s, errors/s, bytes saved/s], ...], oldest first."""
        with self.lock:
            rows = list(self.samples)
        if not rows:
            return []
        last = rows[-1][0]
        out = []
        for (t0, r0, e0, s0), (t1, r1, e1, s1) in zip(rows, rows[1:]):
            dt = t1 - t0
            if dt <= 0:
                continue
            out.append([round(last - t1, 1), _rate(r1 - r0, dt), _rate(e1 - e0, dt),
                        _rate(s1 - s0, dt)])
        return out

    def window_base(self, now: float) -> dict[int, list[int]] | None:
        """Histograms of about ``P99_WINDOW`` ago (the oldest kept younger than
        that plus 10 s), or None while there is none."""
        with self.lock:
            for t, hists in self.histograms:
                if now - t <= P99_WINDOW + 10.0:
                    return hists
        return None


def _rate(delta: float, dt: float) -> float:
    return round(delta / dt, 2)


def bytes_saved(totals: dict) -> int:
    """Teleport payload bytes that did not cross the wire (both directions)."""
    return (totals.get("teleportSentPlainBytes", 0) - totals.get("teleportSentCompressedBytes", 0)
            + totals.get("teleportReceivedPlainBytes", 0)
            - totals.get("teleportReceivedCompressedBytes", 0))


# -- the document ------------------------------------------------------------------------------

def status(stats, info: dict, history: History | None, *, now: float | None = None,
           wall: float | None = None) -> dict:
    """The /status.json document (documented in docs/metrics.md).

    ``info``: ``in``, ``in_type``, ``out`` (list), ``out_type``, ``started``
    (the master's start, wall time) as the stats helper was given them; any
    may be missing.
    """
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    totals = stats.totals()
    started = info.get("started")
    return {
        "version": httptp.__version__,
        "time": round(wall, 3),
        "uptime": round(wall - started, 1) if started else None,
        "in": {"addr": info.get("in"), "type": info.get("in_type")},
        "out": {"addrs": list(info.get("out") or ()), "type": info.get("out_type")},
        "workers": _workers(stats, now),
        "upstreams": _upstreams(stats, history, now),
        "requests": totals["inRequestStart"],
        "errors": sum(totals.get(k, 0) for k in ERROR_COUNTERS),
        "teleport": _teleport(totals, info, stats.compress_levels()),
        "history": {"interval": SAMPLE_EVERY,
                    "columns": ["ago", "requests_per_s", "errors_per_s", "bytes_saved_per_s"],
                    "samples": history.rates() if history else []},
    }


def _workers(stats, now: float) -> list[dict]:
    rows = []
    for block in stats.blocks_in_use():
        info = stats.block_info(block)
        base = stats.block_base(block)
        rows.append({"pid": info["pid"], "slot": info["slot"], "generation": info["generation"],
                     "state": WORKER_STATES.get(info["state"], "unknown"),
                     "heartbeat_age": round(max(now - info["heartbeat"], 0.0), 1),
                     "connections": stats.q[base + IN_CONNS],
                     "requests": stats.q[base + IN_REQUEST_START]})
    rows.sort(key=lambda w: (w["slot"], w["generation"], w["pid"]))
    return rows


_NO_TRAFFIC = {"inflight": 0, "requests": 0, "failures": 0, "ejected": False, "ewma": 0.0,
               "latency_buckets": [0] * (len(LATENCY_BUCKETS) + 1)}


def _upstreams(stats, history: History | None, now: float) -> list[dict]:
    per = stats.upstream_totals()
    base = history.window_base(now) if history else None
    current = upstream_entries(stats)
    seen = {i for i, _, _ in current}
    retired = [(i, u["name"], u["name"]) for i, u in sorted(per.items())
               if i not in seen and u["inflight"]]
    rows = []
    for index, address, origin in current + retired:
        u = per.get(index) or _NO_TRAFFIC    # an index the name table does not list (yet)
        health = health_of(stats, index)
        state = upstream_state(health=health and health["state"], ejected=u["ejected"],
                               current=index in seen, inflight=u["inflight"])
        if state is None:
            continue
        buckets = u["latency_buckets"]
        if base is not None and index in base:
            buckets = [max(a - b, 0) for a, b in zip(buckets, base[index])]
        p99 = quantile(0.99, buckets)
        rows.append({"index": index, "address": address, "origin": origin, "state": state,
                     "inflight": u["inflight"], "requests": u["requests"],
                     "failures": u["failures"], "ewma": round(u["ewma"], 6) or None,
                     "p99": round(p99, 6) if p99 is not None else None, "health": health})
    return rows


def _teleport(totals: dict, info: dict, levels: dict | None = None) -> dict | None:
    """Plain and wire bytes of the teleport link, or None when there is none;
    ``levels``: the mean compression level of the live connections per side
    (``Stats.compress_levels``)."""
    sent = (totals.get("teleportSentPlainBytes", 0), totals.get("teleportSentCompressedBytes", 0))
    recv = (totals.get("teleportReceivedPlainBytes", 0),
            totals.get("teleportReceivedCompressedBytes", 0))
    on_link = info.get("in_type") in TELEPORT_TYPES or info.get("out_type") in TELEPORT_TYPES
    if not on_link and not any(sent + recv):
        return None
    plain, wire = sent[0] + recv[0], sent[1] + recv[1]
    return {"sent": {"plain": sent[0], "wire": sent[1]},
            "received": {"plain": recv[0], "wire": recv[1]},
            "plain": plain, "wire": wire,
            "ratio": round(plain / wire, 3) if wire else None, "saved": plain - wire,
            "levels": {side: round(v, 2) for side, v in (levels or {}).items()}}


def to_json(doc: dict) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


# -- HTML -----------------------------------------------------------------------------------------

def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_count(n) -> str:
    return "–" if n is None else f"{n:,}"


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n}"      # not reached


def fmt_duration(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    parts = [f"{d}d"] * bool(d) + [f"{h}h"] * bool(d or h) + [f"{m}m"] * bool(d or h or m)
    return " ".join(parts + [f"{s % 60}s"])


def fmt_health(h, wall: float) -> str:
    if not h or not h["checked_at"]:
        return "–"
    code = f" {h['code']}" if h["code"] else ""
    return f"{h['state']}{code}, {max(wall - h['checked_at'], 0):.0f} s ago"


WORKER_COLUMNS = (("pid", "pid", str), ("generation", "generation", str),
                  ("state", "state", str), ("connections", "connections", fmt_count),
                  ("requests", "requests", fmt_count))


def _worker_rows(doc: dict) -> str:
    rows = []
    for w in doc["workers"]:
        cells = "".join(f'<td data-col="{key}">{_e(fmt(w[key]))}</td>'
                        for key, _, fmt in WORKER_COLUMNS)
        rows.append(f'<tr data-pid="{_e(w["pid"])}" data-state="{_e(w["state"])}">{cells}</tr>')
    return "".join(rows)


def upstream_cells(u: dict, wall: float) -> list[tuple[str, str]]:
    """(column, text) of one upstream row, in table order."""
    return [("address", u["address"]), ("origin", u["origin"]), ("state", u["state"]),
            ("inflight", fmt_count(u["inflight"])), ("requests", fmt_count(u["requests"])),
            ("failures", fmt_count(u["failures"])), ("ewma", fmt_seconds(u["ewma"])),
            ("p99", fmt_seconds(u["p99"])), ("health", fmt_health(u["health"], wall))]


def _upstream_rows(doc: dict) -> str:
    rows = []
    for u in doc["upstreams"]:
        cells = "".join(f'<td data-col="{col}">{_e(text)}</td>'
                        for col, text in upstream_cells(u, doc["time"]))
        rows.append(f'<tr data-index="{_e(u["index"])}" data-state="{_e(u["state"])}" '
                    f'class="st-{_e(u["state"])}">{cells}</tr>')
    return "".join(rows)


def _teleport_html(doc: dict) -> str:
    """Always the whole table (hidden without a link), so the script can fill it
    when a link appears."""
    t = doc["teleport"]
    zero = {"plain": None, "wire": None}
    sent, recv = (t["sent"], t["received"]) if t else (zero, zero)
    ratio = f"{t['ratio']:.2f}×" if t and t["ratio"] else "–"
    rows = "".join(
        f'<tr data-dir="{d}"><td>{d}</td><td data-col="plain">{_e(fmt_bytes(v["plain"]))}</td>'
        f'<td data-col="wire">{_e(fmt_bytes(v["wire"]))}</td></tr>'
        for d, v in (("sent", sent), ("received", recv)))
    hidden = "" if t else " hidden"
    return (f'<p id="teleport-none"{" hidden" if t else ""}>No teleport link.</p>'
            f'<div id="teleport"{hidden}><table><thead><tr><th></th><th>plain</th><th>wire</th>'
            f'</tr></thead><tbody>{rows}</tbody></table>'
            f'<p>ratio <b id="tp-ratio">{_e(ratio)}</b>, saved '
            f'<b id="tp-saved">{_e(fmt_bytes(t["saved"] if t else None))}</b>, compression '
            f'level <b id="tp-levels">{_e(_levels_text(t["levels"] if t else {}))}</b></p></div>')


def _levels_text(levels: dict) -> str:
    """"in 6, out 4.5" (the mean level of each side's live connections), or "–"."""
    return ", ".join(f"{side} {v:g}" for side, v in levels.items()) or "\u2013"


CHART_W, CHART_H = 300, 60
SERIES = (("req", "req/s", 1), ("err", "errors/s", 2), ("saved", "bytes saved/s", 3))


def chart_points(samples: list, column: int) -> tuple[str, float]:
    """SVG polyline points of one column, newest at the right, and its maximum."""
    values = [s[column] for s in samples]
    top = max(values, default=0) or 1
    n = max(len(values) - 1, 1)
    pts = " ".join(f"{i * CHART_W / n:.1f},{CHART_H - v / top * CHART_H:.1f}"
                   for i, v in enumerate(values))
    return pts, top


def _chart_value(key: str, value: float) -> str:
    if key == "saved":
        return fmt_bytes(value) + "/s"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _chart_html(doc: dict) -> str:
    samples = doc["history"]["samples"]
    parts = []
    for key, label, col in SERIES:
        pts, _ = chart_points(samples, col)
        last = samples[-1][col] if samples else 0
        top = max((row[col] for row in samples), default=0)
        parts.append(
            f'<figure class="chart"><figcaption>{label}: <b id="now-{key}">'
            f'{_e(_chart_value(key, last))}</b> <span class="peak">peak '
            f'<span id="peak-{key}">{_e(_chart_value(key, top))}</span>'
            '</span></figcaption>'
            f'<svg viewBox="0 0 {CHART_W} {CHART_H}" preserveAspectRatio="none" '
            f'width="{CHART_W}" height="{CHART_H}" role="img" aria-label="{label}">'
            f'<polyline id="line-{key}" class="line-{key}" fill="none" points="{pts}"/></svg>'
            '</figure>')
    span = f"{samples[0][0]:.0f} s" if samples else "0 s"
    return ("".join(parts) + f'<p class="meta" id="span-note">the last <span id="span">{span}'
            "</span>, one sample a second, newest on the right</p>")


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2327;background:#fff}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
.meta{color:#555}.meta code{color:#1d2327}
table{border-collapse:collapse;min-width:30em}
th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{background:#f3f4f5;font-weight:600}
#upstreams th:nth-child(-n+3),#upstreams td:nth-child(-n+3),#workers th:nth-child(3),
#workers td:nth-child(3),td:first-child,th:first-child{text-align:left}
tr.st-up td[data-col=state]{color:#0a7d32;font-weight:600}
tr.st-down td[data-col=state],tr.st-ejected td[data-col=state]{color:#b3261e;font-weight:600}
tr.st-draining td[data-col=state]{color:#8a6100;font-weight:600}
.charts{display:flex;gap:1.5em;flex-wrap:wrap}.chart{margin:0}
.chart svg{border:1px solid #ddd;background:#fafafa;display:block}
.line-req{stroke:#1a5fb4;stroke-width:1.5}.line-err{stroke:#b3261e;stroke-width:1.5}
.line-saved{stroke:#0a7d32;stroke-width:1.5}
#live,.peak{color:#777;font-size:.9em}#span-note{width:100%;margin:.2em 0 0}
"""

SCRIPT = r"""
(function(){
"use strict";
var POLL = %(poll)d, W = %(w)d, H = %(h)d, polls = 0;
function count(n){return n === null || n === undefined ? "\u2013" : n.toLocaleString("en-US");}
function secs(s){if (s === null || s === undefined) return "\u2013";
  return s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s";}
function bytes(n){if (n === null || n === undefined) return "\u2013";
  var sign = n < 0 ? "-" : "", u = ["B","KiB","MiB","GiB","TiB"], i = 0; n = Math.abs(n);
  while (n >= 1024 && i < u.length - 1){n /= 1024; i++;}
  return sign + (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];}
function dur(s){if (s === null || s === undefined) return "\u2013"; s = Math.floor(s);
  var d = Math.floor(s / 86400), h = Math.floor(s / 3600) %% 24, m = Math.floor(s / 60) %% 60, p = [];
  if (d) p.push(d + "d"); if (d || h) p.push(h + "h"); if (d || h || m) p.push(m + "m");
  p.push(s %% 60 + "s"); return p.join(" ");}
function health(h, now){if (!h || !h.checked_at) return "\u2013";
  return h.state + (h.code ? " " + h.code : "") + ", " + Math.max(now - h.checked_at, 0).toFixed(0) + " s ago";}
function text(id, t){var e = document.getElementById(id); if (e) e.textContent = t;}
function row(cells, attrs){var tr = document.createElement("tr"), k;
  for (k in attrs) tr.setAttribute(k, attrs[k]);
  cells.forEach(function(c){var td = document.createElement("td");
    td.setAttribute("data-col", c[0]); td.textContent = c[1]; tr.appendChild(td);});
  return tr;}
function fill(id, rows){var tb = document.getElementById(id);
  while (tb.firstChild) tb.removeChild(tb.firstChild); rows.forEach(function(r){tb.appendChild(r);});}
function chart(samples){[["req",1],["err",2],["saved",3]].forEach(function(s){
  var v = samples.map(function(r){return r[s[1]];}), top = Math.max.apply(null, v.concat([0])) || 1,
      n = Math.max(v.length - 1, 1);
  document.getElementById("line-" + s[0]).setAttribute("points", v.map(function(x, i){
    return (i * W / n).toFixed(1) + "," + (H - x / top * H).toFixed(1);}).join(" "));
  var last = v.length ? v[v.length - 1] : 0, peak = Math.max.apply(null, v.concat([0])), fmt = function(x){
    return s[0] === "saved" ? bytes(x) + "/s" : x.toFixed(Math.abs(x) >= 100 ? 0 : 1);};
  text("now-" + s[0], fmt(last)); text("peak-" + s[0], fmt(peak));});
  text("span", (samples.length ? samples[0][0].toFixed(0) : "0") + " s");}
function teleport(t){var tab = document.getElementById("teleport"), none = document.getElementById("teleport-none");
  if (!t){if (none) none.hidden = false; tab.hidden = true; return;}
  if (none) none.hidden = true; tab.hidden = false;
  ["sent","received"].forEach(function(d){var tr = tab.querySelector("tr[data-dir=" + d + "]");
    if (!tr) return; tr.querySelector("[data-col=plain]").textContent = bytes(t[d].plain);
    tr.querySelector("[data-col=wire]").textContent = bytes(t[d].wire);});
  text("tp-ratio", t.ratio ? t.ratio.toFixed(2) + "\u00d7" : "\u2013"); text("tp-saved", bytes(t.saved));
  var lv = Object.keys(t.levels || {}).map(function(k){return k + " " + t.levels[k];});
  text("tp-levels", lv.length ? lv.join(", ") : "\u2013");}
function render(doc){
  text("uptime", dur(doc.uptime)); text("requests", count(doc.requests)); text("errors", count(doc.errors));
  fill("workers-body", doc.workers.map(function(w){
    return row([["pid", String(w.pid)], ["generation", String(w.generation)], ["state", w.state],
                ["connections", count(w.connections)], ["requests", count(w.requests)]],
               {"data-pid": w.pid, "data-state": w.state});}));
  fill("upstreams-body", doc.upstreams.map(function(u){
    return row([["address", u.address], ["origin", u.origin], ["state", u.state],
                ["inflight", count(u.inflight)], ["requests", count(u.requests)],
                ["failures", count(u.failures)], ["ewma", secs(u.ewma)], ["p99", secs(u.p99)],
                ["health", health(u.health, doc.time)]],
               {"data-index": u.index, "data-state": u.state, "class": "st-" + u.state});}));
  teleport(doc.teleport); chart(doc.history.samples);
  polls++; document.body.setAttribute("data-polls", polls);
  text("live", "live: updated " + new Date(doc.time * 1000).toLocaleTimeString());}
function poll(){fetch("status.json", {cache: "no-store"}).then(function(r){
    if (!r.ok) throw new Error("HTTP " + r.status); return r.json();})
  .then(render).catch(function(e){text("live", "not updating: " + e.message);})
  .then(function(){setTimeout(poll, POLL);});}
poll();
})();
""" % {"poll": POLL_MS, "w": CHART_W, "h": CHART_H}


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# Only the page's own inline script and style, and fetches from its own origin.
CSP = (f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


def render_html(doc: dict) -> bytes:
    """The whole page, tables and chart rendered server-side (works without JS)."""
    out = doc["out"]
    ins = doc["in"]
    worker_heads = "".join(f"<th>{label}</th>" for _, label, _ in WORKER_COLUMNS)
    up_heads = "".join(f"<th>{h}</th>" for h in (
        "address", "from", "state", "in flight", "requests", "failures", "latency EWMA",
        "p99 (1 min)", "last health check"))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>httptp status</title><style>{STYLE}</style></head>
<body data-polls="0">
<h1>httptp {_e(doc["version"])}</h1>
<p class="meta">up <b id="uptime">{_e(fmt_duration(doc["uptime"]))}</b> ·
<code id="in">{_e(ins["addr"] or "–")}</code> ({_e(ins["type"] or "–")}) →
<code id="out">{_e(", ".join(out["addrs"]) or "–")}</code> ({_e(out["type"] or "–")}) ·
requests <b id="requests">{_e(fmt_count(doc["requests"]))}</b> ·
errors <b id="errors">{_e(fmt_count(doc["errors"]))}</b>
· <span id="live">static page (JavaScript off): reload to update</span></p>
<h2>Last minutes</h2><div class="charts">{_chart_html(doc)}</div>
<h2>Upstreams</h2>
<table id="upstreams"><thead><tr>{up_heads}</tr></thead>
<tbody id="upstreams-body">{_upstream_rows(doc)}</tbody></table>
<h2>Teleport link</h2>{_teleport_html(doc)}
<h2>Workers</h2>
<table id="workers"><thead><tr>{worker_heads}</tr></thead>
<tbody id="workers-body">{_worker_rows(doc)}</tbody></table>
<p class="meta">JSON: <a href="status.json">status.json</a> · <a href="expvar">expvar</a> ·
<a href="prometheus">prometheus</a> · <a href="healthz">healthz</a></p>
<script>{SCRIPT}</script>
</body></html>
"""
    return page.encode("utf-8")
