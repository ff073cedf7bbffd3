"""Small process helpers shared by the master's worker and helper supervision."""

from __future__ import annotations

import ctypes
import math
import os
import resource
import sys

from httptp.logs import error_logger

PR_SET_PDEATHSIG = 1

# A worker exits with this when it cannot boot (everything before it serves:
# importing its code, opening the access log, building its proxy, installing
# its signal handlers).  gunicorn's WORKER_BOOT_ERROR: the master stops instead
# of respawning a configuration that never booted (see Arbiter.on_exit).
WORKER_BOOT_ERROR = 3


class Backoff:
    """Respawn delay of one supervised child: at once after a child that lived
    ``stable_after`` seconds, else ``first``, doubling up to ``maximum``."""

    __slots__ = ("stable_after", "first", "maximum", "failures")

    def __init__(self, stable_after: float, first: float, maximum: float):
        self.stable_after, self.first, self.maximum = stable_after, first, maximum
        self.failures = 0

    def next(self, lived: float) -> float:
        if lived >= self.stable_after:
            self.failures = 0
            return 0.0
        delay = min(self.first * 2 ** self.failures, self.maximum)
        self.failures += 1
        return delay


def kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass   # exited, not reaped yet: the loop will reap it


def flush_std() -> None:
    """Flush before fork (no duplicated output) and before ``os._exit`` (no lost output)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def die_with_parent(signum: int) -> None:
    """In a forked child: have the kernel send ``signum`` when the master dies,
    even by SIGKILL (Linux prctl PR_SET_PDEATHSIG).  A worker then drains (TERM)
    instead of living on as an orphan; the caller still checks getppid() once,
    for a master that died before this call."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass    # not Linux: workers still notice through their heartbeat


def raise_open_files(concurrency: int, workers: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does for
    the original httptp); forked workers inherit it.  Returns a warning when a
    worker's share of ``-concurrency`` still needs more descriptors than that:
    past the limit accept() fails with EMFILE and clients wait unanswered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return None
    share = math.ceil(concurrency / max(1, workers))
    if share + 64 <= soft:
        return None
    return (f"the open-file limit is {soft:,} per process, but each worker may hold "
            f"{share:,} client connections (-concurrency={concurrency:,} over "
            f"{workers} workers) plus its upstream connections; past the limit new "
            f"connections wait unanswered.  Raise it (LimitNOFILE= in the systemd unit, "
            f"minfds= for supervisord, ulimit -n) or lower -concurrency")


def report_boot_error(slot: int, generation: int, exc: BaseException, log_format: str) -> None:
    """In a worker that cannot boot: its one line on stderr, naming it and the
    cause, before it exits with ``WORKER_BOOT_ERROR``."""
    error_logger(f"worker {slot}", log_format, "error")(
        f"cannot boot: {type(exc).__name__}: {_one_line(exc)} (pid {os.getpid()}, gen {generation})")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "(no message)"
