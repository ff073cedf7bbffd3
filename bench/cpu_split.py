"""User and kernel CPU per request, and syscalls per request, under wrk: nginx, httptp, the bare callback proxy.

The question this answers: of a proxy's CPU per request, how much is its own
code (user time) and how much the kernel's (system time), and does it make
more syscalls than nginx?  Each target is a single process in front of the
same nginx upstream (part 1 of bench/suite.py: GET of the ~2 KB body):
nginx with 1 worker, ``httptp -workers=1``, and bench/bare_callback_proxy.py.
Per round and target, one wrk run (-t2 -c64); user and system time come from
/proc/PID/stat over the run, syscalls from ``perf stat`` on the kernel's
syscall tracepoints (skipped, with a note, when perf cannot trace).

    python bench/cpu_split.py [--rounds N] [--seconds S]

Prints, per target, the median over the rounds of req/s, user and system
µs per request and their sum against nginx's, and sendto, recvfrom,
epoll_wait and all syscalls per request.  Needs wrk and nginx, as
`make bench`.  Nothing leaves 127.0.0.1; each run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

EVENTS = {"raw_syscalls:sys_enter": "syscalls", "syscalls:sys_enter_sendto": "sendto",
          "syscalls:sys_enter_recvfrom": "recvfrom", "syscalls:sys_enter_epoll_wait": "epoll_wait"}
_TICK = os.sysconf("SC_CLK_TCK")


def _times(pid: int) -> tuple[float, float]:
    """utime and stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _perf_works() -> bool:
    if not shutil.which("perf"):
        return False
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "true"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and "not supported" not in probe.stderr


def measure(url: str, pid: int, seconds: float, perf: bool) -> dict:
    """One wrk run against ``url``, with ``pid``'s CPU and syscalls over it."""
    counter = None
    if perf:
        counter = subprocess.Popen(["perf", "stat", "-x,", "-p", str(pid), "-e", ",".join(EVENTS)],
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)                 # perf attached before the load starts
    u0, s0 = _times(pid)
    run = h.wrk(url, seconds, 64)
    u1, s1 = _times(pid)
    n = max(1, run.requests)
    out = {"rps": run.rps, "user": (u1 - u0) / n * 1e6, "sys": (s1 - s0) / n * 1e6,
           "errors": run.errors}
    if counter is not None:
        counter.send_signal(2)
        for line in counter.communicate(timeout=10)[1].splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2] in EVENTS and parts[0].replace(".", "").isdigit():
                out[EVENTS[parts[2]]] = float(parts[0]) / n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    perf = _perf_works()
    if not perf:
        print("cpu_split: perf cannot trace syscalls here; CPU only", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="httptp-cpusplit-")
    try:
        with h.Group() as g:
            up = h.nginx_upstream(g, tmp)
            targets = [h.nginx_proxy(g, tmp, up),
                       h.start_httptp(g, "httptp -workers=1", f"-out=127.0.0.1:{up.port}",
                                      "-outType=http", "-workers=1", "-expvarAddr="),
                       h.start_script(g, "bare callback proxy", "bare_callback_proxy.py",
                                      str(up.port))]
            results: dict[str, list[dict]] = {t.name: [] for t in targets}
            for t in targets:
                h.wrk(t.url, 1, 64)                                 # warm up
            for _ in range(args.rounds):
                for t in targets:
                    r = measure(t.url, t.workers[0], args.seconds, perf)
                    if r["errors"]:
                        raise SystemExit(f"cpu_split: {t.name}: wrk said {r['errors']}")
                    results[t.name].append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, key: str) -> float:
        values = [r[key] for r in results[name] if key in r]
        return statistics.median(values) if values else float("nan")

    ref = next(iter(results))                  # nginx, the first target
    ref_cpu = med(ref, "user") + med(ref, "sys")
    print(f"{args.rounds} rounds of wrk -t2 -c64 {args.seconds:g} s; medians, per request")
    print(f"{'target':22} {'req/s':>8} {'user µs':>8} {'sys µs':>8} {'CPU vs nginx':>13}"
          f" {'sendto':>7} {'recvfrom':>9} {'epoll_wait':>11} {'syscalls':>9}")
    for name in results:
        cpu = med(name, "user") + med(name, "sys")
        print(f"{name:22} {med(name, 'rps'):8,.0f} {med(name, 'user'):8.1f} {med(name, 'sys'):8.1f}"
              f" {cpu / ref_cpu:12.2f}x {med(name, 'sendto'):7.2f} {med(name, 'recvfrom'):9.2f}"
              f" {med(name, 'epoll_wait'):11.3f} {med(name, 'syscalls'):9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
