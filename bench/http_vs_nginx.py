"""wrk → httptp → upstream against wrk → nginx (1 worker) → the same upstream.

One run, alternating rounds, printed as req/s, p99 and the ratio to nginx.
The upstream is nginx itself (a ~2 KB JSON body from memory) so it is never the
bottleneck.  Needs wrk and nginx (Debian packages); `make bench` runs it.
Traffic stays on 127.0.0.1; every wrk run is bounded by -d.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BODY = ('{"id":"%s","seatbid":[{"bid":[{"id":"1","impid":"1","price":0.42,"adm":"%s"}]}]}'
        % ("a" * 32, "x" * 1900))

NGINX_CONF = """
daemon off;
worker_processes {workers};
pid {prefix}/nginx-{name}.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body-{name};
    proxy_temp_path {prefix}/proxy-{name};
    fastcgi_temp_path {prefix}/fcgi-{name};
    uwsgi_temp_path {prefix}/uwsgi-{name};
    scgi_temp_path {prefix}/scgi-{name};
    upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        {location}
    }}
}}
"""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on {port}")


def start_nginx(prefix, name, port, location, up_port=0, workers=1):
    conf = os.path.join(prefix, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(prefix=prefix, name=name, port=port, up_port=up_port or port,
                                  location=location, workers=workers))
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", prefix, "-c", conf,
                             "-e", "stderr"], stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


def wrk(port, seconds, conns, threads=2) -> tuple[float, float]:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  wrk reported: {errors.group(0)}", file=sys.stderr)
    return rps, p99


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--parsers", default="httptools")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            raise SystemExit(f"bench: {tool} is missing (apt-get install wrk nginx-light)")
    prefix = tempfile.mkdtemp(prefix="httptp-bench-")
    up_port, ng_port = free_port(), free_port()
    procs = [start_nginx(prefix, "upstream", up_port,
                         "location / { default_type application/json; return 200 '%s'; }" % BODY)]
    procs.append(start_nginx(prefix, "proxy", ng_port,
                             "location / { proxy_pass http://up; proxy_http_version 1.1; "
                             "proxy_set_header Connection \"\"; }", up_port=up_port))
    httptp = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
    targets = {"nginx (1 worker)": ng_port}
    for w in args.workers.split(","):
        for parser in args.parsers.split(","):
            port = free_port()
            procs.append(subprocess.Popen([httptp, f"-in=127.0.0.1:{port}", f"-out=127.0.0.1:{up_port}",
                                           "-outType=http", f"-workers={w}", f"-httpParser={parser}",
                                           "-expvarAddr="],
                                          stderr=subprocess.DEVNULL))
            wait_port(port)
            targets[f"httptp -workers={w} {parser}"] = port
    try:
        for port in targets.values():
            wrk(port, 1, args.conns)  # warm up
        results = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, port in targets.items():
                results[name].append(wrk(port, args.seconds, args.conns))
        ref_rps = max(r for r, _ in results["nginx (1 worker)"])
        ref_p99 = min(p for _, p in results["nginx (1 worker)"])
        print(f"\nwrk -t2 -c{args.conns} -d{args.seconds}s, best of {args.rounds} alternating rounds, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
        print("| target | req/s | p99 ms | req/s vs nginx | p99 vs nginx |")
        print("|---|---:|---:|---:|---:|")
        for name, rs in results.items():
            rps = max(r for r, _ in rs)
            p99 = min(p for _, p in rs)
            print(f"| {name} | {rps:,.0f} | {p99:.2f} | {rps / ref_rps:.2f}x | {p99 / ref_p99:.1f}x |")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM if "httptp" in str(p.args) else signal.SIGQUIT)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(prefix, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
