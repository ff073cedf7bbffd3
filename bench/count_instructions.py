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


def instructions(requests: int, parser: str) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, os.path.join(HERE, "hotpath_inproc.py"), "--requests", str(requests),
         "--parser", parser],
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
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("count_instructions: valgrind is missing (apt-get install valgrind)")
    small = instructions(args.small, args.parser)
    large = instructions(args.large, args.parser)
    per = (large - small) / (args.large - args.small)
    print(f"parser {args.parser}: {per:,.0f} instructions of Python per proxied request "
          f"(valgrind; {args.small:,} and {args.large:,} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
