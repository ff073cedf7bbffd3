"""httptp at another revision against the working tree and nginx, interleaved.

Figures from different days or hours of a shared machine are not comparable
(nginx itself moved from 21K to 33K req/s between two runs of one day here).
This runs the three side by side, alternating wrk runs between them, so
that each round sees the same machine: nginx (1 worker, the bench's
reference proxy), httptp from ``REV`` (``git archive`` into a temporary
directory, run with this venv's packages) and httptp from the working tree,
each in front of the same nginx upstream (part 1's ~2 KB GET).

    python bench/compare_revs.py REV [--rounds N] [--seconds S] [--workers W]

Prints, per target, the median req/s and CPU per request (the workers' utime
+ stime over each run) and the medians of the per-round ratios to nginx.
Needs wrk and nginx, as `make bench`.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

import harness as h


def _tree_at(rev: str, into: str) -> str:
    """The repository's files at ``rev``, extracted under ``into``."""
    data = subprocess.run(["git", "-C", h.REPO, "archive", "--format=tar", rev],
                          capture_output=True, check=True).stdout
    root = os.path.join(into, "rev")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="a git revision, e.g. HEAD~3 or a commit id")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=1, help="-workers of both httptp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="httptp-revs-") as tmp, h.Group() as group:
        old_tree = _tree_at(args.rev, tmp)
        upstream = h.nginx_upstream(group, tmp)
        flags = ("-outType=http", f"-out=127.0.0.1:{upstream.port}", f"-workers={args.workers}",
                 "-expvarAddr=")
        targets = [
            h.nginx_proxy(group, tmp, upstream),
            h.start_httptp(group, f"httptp {args.rev}", *flags,
                           command=[sys.executable, "-P", "-m", "httptp"],   # -P: not ./httptp
                           env={**os.environ, "PYTHONPATH": old_tree}),
            h.start_httptp(group, "httptp (working tree)", *flags),
        ]
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(args.rounds):
            for t in targets:
                before = h.cpu_seconds(t.workers)
                result = h.wrk(t.url, args.seconds)
                used = h.cpu_seconds(t.workers) - before
                rps[t.name].append(result.rps)
                cpu[t.name].append(used / max(1, result.requests) * 1e6)
                print(f"round {r + 1}/{args.rounds}  {t.name:28} {result.rps:9,.0f} req/s  "
                      f"{cpu[t.name][-1]:6.1f} us CPU/req  {result.errors}", flush=True)
        ref = targets[0].name
        print("\n| target | req/s | vs nginx | CPU µs/req | CPU vs nginx |\n|---|--:|--:|--:|--:|")
        for t in targets:
            ratio = statistics.median(a / b for a, b in zip(rps[t.name], rps[ref]))
            cost = statistics.median(a / b for a, b in zip(cpu[t.name], cpu[ref]))
            print(f"| {t.name} | {statistics.median(rps[t.name]):,.0f} | {ratio:.2f}x | "
                  f"{statistics.median(cpu[t.name]):.0f} | {cost:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
