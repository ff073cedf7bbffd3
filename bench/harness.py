"""The machinery under bench/suite.py: processes, nginx, wrk, /proc, /expvar.

Every child is started by a ``Group`` in its own session, with a parent-death
signal, and ``Group.close()`` stops them all (each with its own fast-stop
signal, then SIGKILL to the whole process group), so nothing outlives the
bench: not on an error, not on Ctrl-C, not even when the bench is killed.
Traffic stays on 127.0.0.0/8; every wrk run is bounded by ``-d`` and a timeout.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HTTPTP = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
CLK_TCK = os.sysconf("SC_CLK_TCK")

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when the bench dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --------------------------------------------------------------------------- processes

class Group:
    """The children of one part of the bench; ``close()`` stops every one."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen, int]] = []
        self.servers: list[Server] = []         # what start_httptp() and start_script() started

    def spawn(self, argv: list[str], stop_signal: int = signal.SIGTERM, **popen) -> subprocess.Popen:
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **popen)
        self.procs.append((proc, stop_signal))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """Ask ``proc`` to stop with its signal; SIGKILL its process group after ``timeout``."""
        sig = next(s for p, s in self.procs if p is proc)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)     # workers or helpers left behind, if any
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(5)

    def close(self) -> None:
        while self.procs:
            proc, _ = self.procs[-1]                # the last started first (clients before servers)
            self.stop(proc)
            self.procs.pop()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a scan of /proc/*/stat)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(name))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` in seconds.  /proc/PID/stat's second field (comm)
    may contain spaces and parentheses, so the fields are split after the last ')'."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])       # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) summed over ``pids``, in KiB, from /proc/PID/smaps_rollup.
    PSS splits pages shared between workers (forked from one master) fairly."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss


def raise_nofile(want: int) -> tuple[int, str]:
    """Raise RLIMIT_NOFILE towards ``want`` (children inherit it): soft and hard
    up to /proc/sys/fs/nr_open when we may (root with CAP_SYS_RESOURCE), else the
    soft limit up to the hard one.  Returns the soft limit now in force and, when
    it is below ``want``, why."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft, ""
    why = ""
    if hard < want:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, nr_open),) * 2)
            return min(want, nr_open), "" if want <= nr_open else f"fs.nr_open is {nr_open:,}"
        except (ValueError, OSError):
            why = f"the hard limit is {hard:,}, and without CAP_SYS_RESOURCE the bench may not raise it"
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return min(want, hard), why


# --------------------------------------------------------------------------- httptp and friends

# Lines httptp prints in normal operation; anything else (warnings, errors) is kept.
_ROUTINE = re.compile(r"httptp: (listening on|stats on|stats helper|worker \d+ \(pid|ready:|graceful stop|"
                      r"fast stop|stopped:)")
_WORKER = re.compile(r"worker \d+ \(pid (\d+), gen \d+\) ready")


@dataclass
class Server:
    """A started proxy: where it listens, which pids do its work, what it said."""

    name: str
    proc: subprocess.Popen
    argv: list[str]
    port: int
    workers: list[int]
    stats: str = ""                                    # http://HOST:PORT of /expvar, if enabled
    notes: list[str] = field(default_factory=list)     # unexpected output lines
    reader: threading.Thread | None = None

    def said(self) -> list[str]:
        """The unexpected lines it printed (call after it was stopped: waits for its last words)."""
        if self.reader:
            self.reader.join(2)
        return self.notes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def command(self) -> str:
        """The command line as a reader would type it (ports the bench chose stay as they were)."""
        args = [os.path.basename(a) if a in (HTTPTP, sys.executable, NGINX) else a for a in self.argv]
        if args[0] == os.path.basename(sys.executable):
            args[0] = "python"
            args[1] = os.path.relpath(args[1], REPO)
        return " ".join(args)


def _pump(stream, lines: queue.Queue, ready: str, notes: list[str], routine: re.Pattern) -> None:
    """Read ``stream`` to EOF: the lines up to the first one holding ``ready`` to
    ``lines`` (then None), the unexpected ones (capped) to ``notes``."""
    starting = True
    for line in stream:
        line = line.rstrip("\n")
        if starting:
            lines.put(line)
            starting = ready not in line
        if line and not routine.search(line) and len(notes) < 50:
            notes.append(line)
    lines.put(None)


def start_httptp(group: Group, name: str, *flags: str, timeout: float = 20.0,
                 command: list[str] | None = None, env: dict | None = None) -> Server:
    """Start ``httptp -in=127.0.0.1:0 FLAGS`` and wait until all its workers are ready.

    Without a ``-concurrency`` flag it gets one that fits RLIMIT_NOFILE: the
    load is 64 connections, and httptp rightly warns when the default 100,000
    cannot fit under the open-file limit.  ``command`` replaces ``httptp``
    (e.g. ``python -m httptp`` with another tree in ``env``'s PYTHONPATH)."""
    if not any(f.startswith("-concurrency=") for f in flags):
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        flags = (*flags, f"-concurrency={max(1000, min(100000, nofile - 1000))}")
    argv = [*(command or [HTTPTP]), "-in=127.0.0.1:0", *flags]
    proc = group.spawn(argv, signal.SIGQUIT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=env)
    lines: queue.Queue = queue.Queue()
    server = Server(name, proc, argv, 0, [])
    server.reader = threading.Thread(target=_pump, daemon=True,
                                     args=(proc.stderr, lines, "httptp: ready", server.notes, _ROUTINE))
    server.reader.start()
    group.servers.append(server)
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            raise RuntimeError(f"{name}: httptp did not become ready: " + " | ".join(server.notes[-5:]))
        if m := re.search(r"listening on \S+:(\d+) pid=", line):
            server.port = int(m.group(1))
        elif m := re.search(r"stats on (http://\S+?)/expvar", line):
            server.stats = m.group(1)
        elif m := _WORKER.search(line):
            server.workers.append(int(m.group(1)))
        elif line.startswith("httptp: ready"):
            return server


def start_script(group: Group, name: str, script: str, *args: str, timeout: float = 15.0) -> Server:
    """Start ``python bench/SCRIPT ARGS``; it prints ``listening on HOST:PORT`` when ready.
    Its own process is the one that does the work."""
    argv = [sys.executable, os.path.join(HERE, script), *args]
    proc = group.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    server = Server(name, proc, argv, 0, [proc.pid])
    server.reader = threading.Thread(target=_pump, daemon=True,
                                     args=(proc.stdout, lines, "listening on", server.notes,
                                           re.compile("listening on")))
    server.reader.start()
    group.servers.append(server)
    try:
        line = lines.get(timeout=timeout) or ""
    except queue.Empty:
        line = ""
    if not (m := re.search(r"listening on \S+:(\d+)", line)):
        raise RuntimeError(f"{name} did not start: {line} " + " | ".join(server.notes[-5:]))
    server.port = int(m.group(1))
    return server


def expvar(server: Server) -> dict:
    with urllib.request.urlopen(server.stats + "/expvar", timeout=5) as r:
        return json.load(r)


# --------------------------------------------------------------------------- nginx

BODY_2K = ('{"id":"%s","seatbid":[{"bid":[{"id":"1","impid":"1","price":0.42,"adm":"%s"}]}]}'
           % ("a" * 32, "x" * 1900))

# A bid of ~530 bytes whose ids vary with every answer ($request_id: 32 random hex
# digits), as a real bidder's do; ~60% of bid requests get 204 no-bid instead.
BID = ('{"id":"$request_id","seatbid":[{"seat":"bidder-1","bid":[{"id":"$request_id-0","impid":"1",'
       '"price":0.8123,"adm":"<a href=\\"https://click.acme-shoes.com/c?s=news.example&amp;cr=cr-$msec\\">'
       '<img src=\\"https://cdn.acme-shoes.com/300x250/cr-$connection_requests.jpg\\" width=\\"300\\" '
       'height=\\"250\\"></a>","adomain":["acme-shoes.com"],"crid":"cr-$connection_requests","w":300,'
       '"h":250,"nurl":"https://win.bidder.example/n?id=$request_id&t=$msec"}]}],"cur":"USD",'
       '"bidid":"$request_id"}')

_NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/{name}.pid;
error_log stderr error;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 15m;
    client_body_temp_path {prefix}/{name}-body;
    proxy_temp_path {prefix}/{name}-proxy;
    fastcgi_temp_path {prefix}/{name}-fcgi;
    uwsgi_temp_path {prefix}/{name}-uwsgi;
    scgi_temp_path {prefix}/{name}-scgi;
{http}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{server}
    }}
}}
"""

UPSTREAM_HTTP = """\
    split_clients "$request_id" $nobid { 60% 1; * ""; }"""
UPSTREAM_SERVER = """\
        default_type application/json;
        location / { return 200 '%s'; }
        location /openrtb2/ { if ($nobid) { return 204; } return 200 '%s'; }
        location /nobid { return 204; }""" % (BODY_2K, BID)
PROXY_HTTP = """\
    upstream up { server 127.0.0.1:%d; keepalive 64; }"""
PROXY_SERVER = """\
        location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }"""


def start_nginx(group: Group, prefix: str, name: str, http: str, server: str) -> Server:
    """nginx with 1 worker on a free 127.0.0.1 port; its worker is the pid to watch."""
    port = free_port()
    conf = os.path.join(prefix, f"{name}.conf")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with open(conf, "w") as f:
        f.write(_NGINX_CONF.format(prefix=prefix, name=name, port=port, http=http, server=server,
                                   nofile=nofile, conns=min(16384, nofile - 100)))
    err = os.path.join(prefix, f"{name}.err")
    argv = [NGINX, "-p", prefix, "-c", conf, "-e", "stderr"]
    with open(err, "w") as f:
        proc = group.spawn(argv, stdout=subprocess.DEVNULL, stderr=f)
    try:
        wait_port(port, proc)
    except RuntimeError as e:
        with open(err) as f:
            raise RuntimeError(f"{name}: {e}: {f.read()[-500:]}") from None
    deadline = time.monotonic() + 5
    while not (workers := children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Server(name, proc, argv, port, workers)


def nginx_upstream(group: Group, prefix: str) -> Server:
    """The upstream of every target: ~2 KB JSON for any GET, and for POST /openrtb2/...
    a 204 no-bid (~60%) or a ~530 B bid, all from memory: never the bottleneck."""
    return start_nginx(group, prefix, "upstream", UPSTREAM_HTTP, UPSTREAM_SERVER)


def nginx_proxy(group: Group, prefix: str, upstream: Server) -> Server:
    """The reference: nginx, 1 worker, reverse proxy with a keep-alive upstream pool."""
    return start_nginx(group, prefix, "nginx-proxy", PROXY_HTTP % upstream.port, PROXY_SERVER)


# --------------------------------------------------------------------------- wrk

@dataclass
class Wrk:
    requests: int
    seconds: float
    rps: float
    p50: float          # ms
    p99: float          # ms
    errors: str         # "" or what wrk reported (socket errors, non-2xx)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency(out: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> Wrk:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise RuntimeError("wrk printed no result:\n" + out[-500:])
    requests, seconds = int(m.group(1)), float(m.group(2)) * _UNIT_MS[m.group(3)] / 1000
    errors = []
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += [f"{what} {n}" for what, n in zip(("connect", "read", "write", "timeout"), m.groups())
                   if n != "0"]
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"non-2xx {m.group(1)}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return Wrk(requests, seconds, rps, _latency(out, "50"), _latency(out, "99"), ", ".join(errors))


def wrk_command(url: str, seconds: float, conns: int, threads: int = 2, script: str = "") -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if script:
        argv += ["-s", script]
    return argv + [url]


def wrk(url: str, seconds: float, conns: int = 64, threads: int = 2, script: str = "") -> Wrk:
    out = subprocess.run(wrk_command(url, seconds, conns, threads, script), capture_output=True,
                         text=True, timeout=seconds + 30, preexec_fn=_die_with_parent)
    return parse_wrk(out.stdout + out.stderr)


def lua_post(path: str, bodies_file: str, headers: dict[str, str], stride: str = "997") -> str:
    """A wrk script that POSTs the bodies of ``bodies_file`` (one per line) in turn;
    wrk thread k starts at body k * ``stride`` (a Lua expression: it may use ``#bodies``)."""
    hdr = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    return f"""\
wrk.method = "POST"
{hdr}
local bodies = {{}}
for line in io.lines("{bodies_file}") do bodies[#bodies + 1] = line end
local next_thread = 0
function setup(thread) thread:set("thread_index", next_thread); next_thread = next_thread + 1 end
local i
function request()
    i = ((i or thread_index * {stride}) % #bodies) + 1
    return wrk.format(nil, "{path}", nil, bodies[i])
end
"""


def lua_delay(ms: int) -> str:
    """A wrk script that waits ``ms`` between a response and the next request on a connection."""
    return f"function delay() return {ms} end\n"


# --------------------------------------------------------------------------- the machine

def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import gevent
    nginx = _first_line([NGINX, "-v"]).rpartition("/")[2]
    wrk_v = _first_line(["wrk", "-v"]).split()
    commit = _first_line(["git", "-C", REPO, "describe", "--always", "--dirty"])
    return {"cpu": model, "cores": str(os.cpu_count()), "kernel": platform.release(),
            "python": platform.python_version(), "gevent": gevent.__version__, "nginx": nginx,
            "wrk": wrk_v[1] if len(wrk_v) > 1 else "?", "commit": commit}
