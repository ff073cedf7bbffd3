"""``process_*`` numbers of a whole httptp: the master and its children.

The stats helper reads them from /proc at each scrape: the master (its
parent), then the master's children (workers and helpers, itself included),
found in ``/proc/<master>/task/<tid>/children`` or, on a kernel without that
file, by the parent pid in every ``/proc/<pid>/stat``.  Linux only: elsewhere
``sample`` returns None and no ``process_*`` metric is shown.

* CPU seconds: user + system time of every live process, plus the time of
  the children each one has reaped (``cutime``, ``cstime``), so a worker that
  died still counts through its master.  A process reaped between the
  master's read and its own would count nowhere for one scrape; ``CpuClock``
  keeps the sum from going back (a counter never does).
* Resident and virtual memory: summed.  Pages shared copy-on-write between
  the master and its forked children count once per process, so the sum is
  more than the memory used (what ``ps`` adds up, too).
* Open fds: summed (a process whose /proc/<pid>/fd cannot be read, another
  user's, counts 0).  The limit is the master's soft ``RLIMIT_NOFILE``.
* Start time: the master's, in Unix seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"


@dataclass
class Sample:
    processes: int = 0
    cpu_seconds: float = 0.0
    resident_bytes: int = 0
    virtual_bytes: int = 0
    open_fds: int = 0
    max_fds: int | None = None
    start_time: float | None = None


def _stat_fields(pid: int, proc: str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command, which may hold
    spaces and parentheses); None when the process is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode("ascii", "replace").split()


def children(pid: int, proc: str = PROC) -> list[int]:
    """Pids of ``pid``'s live children."""
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
        found = []
        for tid in tids:
            with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        return found
    except FileNotFoundError:           # no such file on this kernel: scan every process
        pass
    except OSError:
        return []
    found = []
    for name in os.listdir(proc):
        if name.isdigit():
            fields = _stat_fields(int(name), proc)
            if fields is not None and len(fields) > 1 and fields[1] == str(pid):
                found.append(int(name))
    return found


def _boot_time(proc: str) -> float | None:
    try:
        with open(f"{proc}/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _max_fds(pid: int, proc: str) -> int | None:
    try:
        with open(f"{proc}/{pid}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max open files"):
                    soft = line.split()[3]
                    return None if soft == b"unlimited" else int(soft)
    except (OSError, IndexError, ValueError):
        pass
    return None


def _open_fds(pid: int, proc: str) -> int:
    try:
        return len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        return 0


def sample(master: int, proc: str = PROC) -> Sample | None:
    """The sums over ``master`` and its children; None when /proc does not
    have ``master`` (not Linux, or the master is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    first = _stat_fields(master, proc)      # the master first: see the module doc
    if first is None:
        return None
    out = Sample(max_fds=_max_fds(master, proc))
    boot = _boot_time(proc)
    for pid, fields in [(master, first)] + [(c, _stat_fields(c, proc))
                                            for c in children(master, proc)]:
        if fields is None or len(fields) < 22:
            continue
        out.processes += 1
        # utime, stime, cutime, cstime: fields 14..17 (indexes 11..14 here)
        out.cpu_seconds += sum(int(x) for x in fields[11:15]) / ticks
        out.virtual_bytes += int(fields[20])
        out.resident_bytes += int(fields[21]) * page
        out.open_fds += _open_fds(pid, proc)
        if pid == master and boot is not None:
            out.start_time = boot + int(fields[19]) / ticks
    return out


class CpuClock:
    """The CPU-seconds sum, never going back (module doc)."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, seconds: float) -> float:
        self.last = max(self.last, seconds)
        return self.last
