"""How many CPUs this process may use: what ``-workers=auto`` starts.

``os.cpu_count()`` counts the machine's CPUs.  A process confined by
``taskset``/``CPUAffinity=`` (its affinity mask) or by a container's CPU limit
(cgroup v2 ``cpu.max``: a quota of microseconds per period) gets less, and
one worker per machine CPU would only make the workers take turns.  So:
the CPUs of the affinity mask, lowered to the tightest ``cpu.max`` quota of
our cgroup and its ancestors, rounded up (a quota of 1.5 CPUs gives 2
workers), and at least 1.

cgroup v1 (its ``cpu.cfs_quota_us``) is not read: Debian, Docker and
Kubernetes default to v2.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def available_cpus(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """The CPUs this process may use (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_limit(cgroup_root: str = CGROUP_ROOT,
                     proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The tightest cgroup v2 ``cpu.max`` quota (in CPUs) of our cgroup and its
    ancestors up to ``cgroup_root``; None when there is none or it cannot be read."""
    path = _own_cgroup(proc_cgroup)
    if path is None:
        return None
    limits = []
    parts = [p for p in path.split("/") if p]
    if ".." in parts:       # outside our cgroup namespace: only its root is ours to read
        parts = []
    for depth in range(len(parts), -1, -1):      # our cgroup first, the root last
        limit = parse_cpu_max(_read(os.path.join(cgroup_root, *parts[:depth], "cpu.max")))
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def parse_cpu_max(text: str | None) -> float | None:
    """``"150000 100000"`` → 1.5 CPUs; ``"max 100000"``, "" or junk → None."""
    if not text:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroup(proc_cgroup: str) -> str | None:
    """The cgroup v2 path of ``/proc/self/cgroup`` (its ``0::/path`` line)."""
    text = _read(proc_cgroup)
    for line in (text or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            return path
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None
