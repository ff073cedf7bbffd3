"""Instructions per proxied request, counted by valgrind: a figure the machine's load cannot move.

Timings on shared cores move by ±20% from one run to the next; the number of
instructions the CPU runs for the same work does not.  This runs
``bench/hotpath_inproc.py`` (the hot path's Python, no syscalls) twice under
``valgrind --tool=cachegrind`` with two request counts and divides the
difference in instructions by the difference in requests, so start-up and
warm-up cancel out.  Compare it before and after a change to the hot path:
fewer instructions is faster on any machine, give or take cache effects
(which the wrk benchmarks see).

    python bench/count_instructions.py [--parser httptools|h11] [--small N] [--large N]
                                       [--sockets]

``--sockets`` counts ``bench/hotpath.py`` instead: a real worker object with
its transports on the hub's loop, over unix sockets, less the same client and
upstream talking directly: everything of the proxy in user space but the
kernel's share (about 4 minutes).

Needs valgrind (Debian package ``valgrind``); about 40 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def instructions(requests: int, parser: str, only: str | None = None) -> int:
    """Instructions of one run: hotpath_inproc.py, or with ``only`` hotpath.py's
    proxied or direct exchanges over real sockets."""
    script = ["hotpath_inproc.py"] if only is None else ["hotpath.py", "--only", only]
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, os.path.join(HERE, script[0]), *script[1:], "--requests",
         str(requests), "--parser", parser],
        capture_output=True, text=True, check=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if m is None:
        raise SystemExit("count_instructions: no instruction count in valgrind's output:\n"
                         + out.stderr[-2000:])
    return int(m.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parser", default="httptools")
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=7000)
    ap.add_argument("--sockets", action="store_true",
                    help="the whole worker over unix sockets (transports, the loop; not the kernel)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("count_instructions: valgrind is missing (apt-get install valgrind)")
    if args.sockets:
        per = {}
        for only in ("proxied", "direct"):
            small = instructions(args.small, args.parser, only)
            large = instructions(args.large, args.parser, only)
            per[only] = (large - small) / (args.large - args.small)
        print(f"parser {args.parser}: {per['proxied'] - per['direct']:,.0f} instructions per "
              f"proxied request in user space, over unix sockets (valgrind; client and upstream "
              f"{per['direct']:,.0f} subtracted)")
        return 0
    small = instructions(args.small, args.parser)
    large = instructions(args.large, args.parser)
    per = (large - small) / (args.large - args.small)
    print(f"parser {args.parser}: {per:,.0f} instructions of Python per proxied request "
          f"(valgrind; {args.small:,} and {args.large:,} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
